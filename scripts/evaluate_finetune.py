"""Does a fine-tuned model write more like its style than the model it started from?

    python scripts/evaluate_finetune.py --base checkpoints/polyphony-mini \
        --tuned runs/mma/release --held-out HELD_OUT_MIDI_DIR --out runs/mma

On MIDI files of the style that neither model trained on (``--held-out``), for each model:

* NLL per note of the token stream, teacher-forced over every window of those files;
* 16-bar excerpts (every 8 bars, up to ``--per-piece`` per file), each generated with its own
  instrument set at the model's default densities: per-family median notes per bar, PCE, SC
  and GC against the real excerpts (polyphony/parts/), and the gap of each to real.

Prints a table and writes ``OUT/style.json`` (the numbers in docs/training.md#fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from symusic import Score

from polyphony import parts
from polyphony.config import DataConfig
from polyphony.data.prepare import prepare_dataset
from polyphony.evaluate import validation_nll
from polyphony.generation import load_checkpoint
from polyphony.tokenizer import PolyTokenizer


def nll_per_note(checkpoint: Path, midi_dir: Path) -> float:
    """Every window of every file (one split holding them all), body only, no augmentation."""
    tokenizer = PolyTokenizer.load(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        data = DataConfig(tokenization=tokenizer.kind, validation_fraction=0, test_fraction=0)
        prepare_dataset(midi_dir, tmp, data, progress=False, tokenizer=tokenizer)
        return validation_nll(checkpoint, tmp, split="train")["stream_nll_per_note"]


def excerpts_of(midi_dir: Path, per_piece: int) -> list[tuple[str, Score]]:
    found = []
    for path in sorted(midi_dir.rglob("*.mid")):
        score = Score(str(path))
        for k in range(per_piece):
            cut = parts.excerpt(score, 8 * k, 16)
            if cut is not None:
                found.append((f"{path.name}@{8 * k}", cut))
    return found


def gaps(figures: dict) -> dict[str, float]:
    """Relative gap to real of each family median and music metric."""
    generated, real = figures["generated"], figures["real"]
    out = {}
    for family, value in real["median_per_family"].items():
        mine = generated["median_per_family"].get(family)
        if value and mine is not None:
            out[family] = mine / value - 1
    for name in parts.MUSIC_METRICS:
        if real[name]:
            out[name] = generated[name] / real[name] - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, required=True)
    parser.add_argument("--held-out", type=Path, required=True, help="MIDI files of the style")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-piece", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    report = {"held_out": str(args.held_out), "models": {}}
    for name, path in (("base", args.base), ("tuned", args.tuned)):
        checkpoint = load_checkpoint(path)
        excerpts = excerpts_of(args.held_out, args.per_piece)  # fresh: requests trim them
        figures = parts.requests_from_excerpts(checkpoint, excerpts, 16, args.seed)
        report["models"][name] = {
            "checkpoint": str(path),
            "nll_per_note": nll_per_note(path, args.held_out),
            "excerpts": len(excerpts),
            "figures": figures,
            "gaps": gaps(figures),
        }
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    print(f"{report['held_out']}: {base['excerpts']} excerpts")
    print(f"{'':22}{'base':>10}{'tuned':>10}{'real':>10}")
    change = tuned["nll_per_note"] / base["nll_per_note"] - 1
    print(
        f"{'NLL per note':22}{base['nll_per_note']:>10.3f}{tuned['nll_per_note']:>10.3f}"
        f"{'':>10}  ({change:+.1%})"
    )
    real = base["figures"]["real"]
    for family, value in real["median_per_family"].items():
        row = [m["figures"]["generated"]["median_per_family"].get(family) for m in (base, tuned)]
        cells = "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in row)
        print(f"{family + ' /bar':22}{cells}{value:>10.2f}")
    for name in parts.MUSIC_METRICS:
        row = [m["figures"]["generated"][name] for m in (base, tuned)]
        print(f"{name:22}{row[0]:>10.3f}{row[1]:>10.3f}{real[name]:>10.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "style.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
