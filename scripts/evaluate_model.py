"""Generate pieces from random instrument lists with a model and compare them to real pieces.

    python scripts/evaluate_model.py --checkpoint checkpoints/polyphony-mini \
        --dataset data/dev --corpus corpus --pieces 100 --bars 8 --out runs/eval-mini

Writes ``OUT/generated/*.mid`` (each carries its request marker), links the dataset's validation
pieces into ``OUT/reference/``, then prints ``python -m polyphony.evaluate`` of the two side by
side and saves it as ``OUT/metrics.json``. With ``--nll`` it also scores the checkpoint on the
validation split (``OUT/nll.json``). Instrument lists are drawn with a fixed seed: 1 to 4
instruments from the pool below, drums in about half of them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from polyphony.evaluate import evaluate, format_nll, format_table, validation_nll
from polyphony.generation import generate, load_checkpoint, write_midi
from polyphony.instruments import DRUMS

# Instruments the development corpus has plenty of (docs/data.md): the lists a user asks for
# most, rather than all 129, most of which the corpus barely holds.
POOL = [
    0,
    4,
    19,
    24,
    25,
    27,
    29,
    30,
    32,
    33,
    38,
    40,
    41,
    42,
    48,
    52,
    56,
    57,
    60,
    65,
    71,
    73,
    80,
    81,
    89,
]


def random_request(rng: random.Random) -> list[int]:
    pitched = rng.sample(POOL, rng.randint(1, 3))
    return pitched + [DRUMS] if rng.random() < 0.5 else pitched + rng.sample(POOL, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--corpus", type=Path, required=True, help="MIDI root it was prepared from")
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nll", action="store_true", help="also score the validation split")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    generated, reference = args.out / "generated", args.out / "reference"
    generated.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(args.checkpoint)
    rng = random.Random(args.seed)
    for index in range(args.pieces):
        request = sorted(set(random_request(rng)))
        score = generate(
            instruments=[str(i) for i in request],
            bars=args.bars,
            seed=args.seed * 100_000 + index,
            checkpoint=checkpoint,
            progress=False,
        )
        write_midi(score, generated / f"piece_{index:03d}.mid")
    pieces = (args.dataset / "validation" / "pieces.jsonl").read_text().splitlines()
    for line in pieces:
        relative = json.loads(line)["path"]
        link = reference / relative.replace("/", "__")
        if not link.exists():
            link.symlink_to((args.corpus / relative).resolve())

    report = evaluate(generated, reference, progress=False)
    print(format_table(report))
    summary = {
        "checkpoint": str(args.checkpoint),
        "pieces": args.pieces,
        "bars": args.bars,
        "seed": args.seed,
        "generated": report["generated"]["metrics"],
        "reference": report["reference"]["metrics"],
        "gap_percent": report["gap_percent"],
        "fidelity": report["generated"].get("fidelity"),
    }
    if args.nll:
        nll = validation_nll(args.checkpoint, args.dataset)
        print(format_nll(nll))
        (args.out / "nll.json").write_text(json.dumps(nll, indent=2) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
