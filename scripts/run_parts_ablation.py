"""The full-parts ablation of docs/ablations.md: note order and per-track densities, on band music.

    python scripts/run_parts_ablation.py --corpus corpus --out runs/parts-ablation

Prepares the band pieces of ``--corpus`` twice (canonical note order, and the file's order with
``--data.note_order=file``), then trains ``configs/ablation.yaml`` three times, same data, steps
and seed, one change at a time:

* ``file_order``: the file's track order at each onset, no densities (every header entry has
  density bin 0, so the header only lists who plays);
* ``canonical``: canonical order, no densities;
* ``canonical_densities``: canonical order and per-track density bins (the shipped recipe).

Each is scored on the band validation split (stream NLL per note, next-instrument NLL), then
generates the held-out band excerpts' own instrument sets (16 bars; polyphony/parts/) at its
default densities (bin 0 for the variants without them). Prints a markdown table and writes
``OUT/parts_ablation.json``. A variant whose run finished is not trained again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from polyphony import parts
from polyphony.evaluate import validation_nll
from polyphony.generation import load_checkpoint

CONFIG = "configs/ablation.yaml"
VARIANTS = {
    "file_order": ("band-file", ["--data.track_densities=false"]),
    "canonical": ("band", ["--data.track_densities=false"]),
    "canonical_densities": ("band", []),
}


def prepare(corpus: Path, out: Path, order: str) -> Path:
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "polyphony.data.prepare", str(corpus / "band"), "--out",
             str(out), "--config", CONFIG, f"--data.note_order={order}"],
            check=True,
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="MIDI root with band/")
    parser.add_argument("--out", type=Path, default=Path("runs/parts-ablation"))
    parser.add_argument("--per-piece", type=int, default=3, help="excerpts per held-out piece")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    datasets = {
        "band": prepare(args.corpus, args.out / "data-band", "canonical"),
        "band-file": prepare(args.corpus, args.out / "data-band-file", "file"),
    }
    results_file = args.out / "parts_ablation.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, (data, overrides) in VARIANTS.items():
        dataset, run_dir = datasets[data], args.out / name
        command = [sys.executable, "train.py", "--config", CONFIG, f"--data.dataset_dir={dataset}",
                   "--data.source_weights={}", f"--train.out_dir={run_dir}", *overrides]  # fmt: skip
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        release = run_dir / "release"
        flat = "--data.track_densities=false" in overrides
        nll = validation_nll(release, dataset, track_densities=not flat)
        checkpoint = load_checkpoint(release, "cpu")
        excerpts = parts.band_excerpts(
            dataset, args.corpus / "band", 16, args.per_piece, stride=16, source=None
        )
        figures = parts.requests_from_excerpts(
            checkpoint, excerpts, 16, args.seed, asked="flat" if flat else "default"
        )
        results[name] = {
            "overrides": overrides,
            "dataset": str(dataset),
            "stream_nll_per_note": nll["stream_nll_per_note"],
            "heads": nll["heads"],
            "requests": len(excerpts),
            "parts": figures,
        }
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    families = ("drums", "bass", "piano/keys", "guitar", "strings", "brass/reed", "synth")
    print("\n| variant | stream NLL / note | next-instrument NLL | thin parts | "
          + " | ".join(f"{f} /bar" for f in families) + " |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * len(families))
    rows = [(name, row["parts"]["generated"]) for name, row in results.items()]
    rows.append(("real excerpts", next(iter(results.values()))["parts"]["real"]))
    for name, figures in rows:
        row = results.get(name, {})
        nll = f"{row['stream_nll_per_note']:.3f}" if row else ""
        instrument = row.get("heads", {}).get("next_instrument", {}).get("nll") if row else None
        medians = figures["median_per_family"]
        cells = [f"{medians[f]:.2f}" if medians.get(f) is not None else "-" for f in families]
        print(f"| {name} | {nll} | {'' if instrument is None else f'{instrument:.3f}'} | "
              f"{figures['thin_fraction']:.1%} | " + " | ".join(cells) + " |")  # fmt: skip
    print(f"\nwrote {results_file}")


if __name__ == "__main__":
    main()
