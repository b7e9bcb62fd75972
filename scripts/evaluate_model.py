"""Generate pieces with a model and compare them to the real validation pieces.

    python scripts/evaluate_model.py --checkpoint checkpoints/polyphony-mini \\
        --dataset data/dev --corpus corpus --pieces 100 --bars 8 --nll --out runs/eval-mini

Writes ``OUT/generated/*.mid`` (each carries its request marker), links the dataset's validation
pieces into ``OUT/reference/``, prints ``python -m polyphony.evaluate`` of the two side by side
and saves it as ``OUT/metrics.json``. ``--requests random`` (default) draws instrument lists
with a fixed seed (``polyphony.evaluate.random_request``: 1 to 4 common instruments, drums in
about half); ``--requests validation`` asks for the validation pieces' own instrument sets. With
``--nll`` it also scores the checkpoint on the validation split (``OUT/nll.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polyphony.evaluate import evaluate_model, format_nll, format_table, validation_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--corpus", type=Path, required=True, help="MIDI root it was prepared from")
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", choices=["random", "validation"], default="random")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--nll", action="store_true", help="also score the validation split")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    report = evaluate_model(
        args.checkpoint, args.dataset, args.corpus, args.out, args.pieces, args.bars, args.seed,
        args.requests, sampling,
    )  # fmt: skip
    print(format_table(report))
    summary = {
        **report["protocol"],
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
