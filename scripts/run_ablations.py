"""The ablation study of docs/ablations.md: same data, token budget and seed, one change each.

    python scripts/run_ablations.py --remi data/dev --cpword data/cpword --corpus corpus \\
        --out runs/ablation

Trains ``configs/ablation.yaml`` once per variant (``python train.py`` with one override):
the full model; without track embeddings; without the auxiliary heads; CPWord instead of REMI
with ``d_model`` chosen for the parameter count nearest the full model's. Each is scored on the
validation split (the token stream's NLL per note makes REMI and CPWord comparable), then
generates ``--pieces`` pieces from the same random instrument lists, measured against the real
validation pieces. Prints a markdown table and writes ``OUT/ablations.json``. A variant whose
run finished is not trained again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from polyphony.config import load_config
from polyphony.data.dataset import tokenizer_of
from polyphony.evaluate import evaluate_model, validation_nll
from polyphony.model import PolyphonyGPT

CONFIG = "configs/ablation.yaml"
METRICS = ("pitch_class_entropy", "scale_consistency", "groove_consistency", "note_density")


def parameter_count(dataset: Path, overrides: list[str]) -> int:
    cfg = load_config(CONFIG, overrides).model
    tokenizer = tokenizer_of(dataset)
    cfg.vocab_sizes = list(tokenizer.vocab_sizes)
    cfg.token_types = list(tokenizer.token_types)
    cfg.n_token_types = int(tokenizer.n_token_types)
    return sum(p.numel() for p in PolyphonyGPT(cfg).parameters())


def matching_width(remi: Path, cpword: Path) -> int:
    """The CPWord d_model (even head size) whose parameter count is nearest the full REMI one."""
    target = parameter_count(remi, [f"--data.dataset_dir={remi}"])
    shape = load_config(CONFIG).model
    step = 2 * shape.n_heads
    cpword_overrides = ["--data.tokenization=cpword", f"--data.dataset_dir={cpword}"]
    return min(
        range(step, 2 * shape.d_model, step),
        key=lambda d: abs(
            parameter_count(cpword, [*cpword_overrides, f"--model.d_model={d}"]) - target
        ),
    )


def variants(remi: Path, cpword: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (dataset, overrides)."""
    width = matching_width(remi, cpword)
    return {
        "full": (remi, []),
        "no_track_embeddings": (remi, ["--model.track_embeddings=false"]),
        "no_aux_heads": (remi, ["--model.heads={next_token: 1.0}"]),
        "cpword": (cpword, ["--data.tokenization=cpword", f"--model.d_model={width}"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remi", type=Path, required=True, help="REMI dataset")
    parser.add_argument("--cpword", type=Path, required=True, help="CPWord dataset, same corpus")
    parser.add_argument("--corpus", type=Path, required=True, help="MIDI root of both")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--pieces", type=int, default=30)
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's)")
    args = parser.parse_args()

    results = {}
    results_file = args.out / "ablations.json"
    if results_file.exists():
        results = json.loads(results_file.read_text())
    for name, (dataset, overrides) in variants(args.remi, args.cpword).items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / name
        if args.seed is not None:
            overrides = [*overrides, f"--train.seed={args.seed}"]
        command = [sys.executable, "train.py", "--config", CONFIG, f"--data.dataset_dir={dataset}",
                   f"--train.out_dir={run_dir}", *overrides]  # fmt: skip
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        release = run_dir / "release"
        nll = validation_nll(release, dataset)
        report = evaluate_model(release, dataset, args.corpus, run_dir / "eval", args.pieces,
                                args.bars)  # fmt: skip
        training = json.loads((release / "training.json").read_text())
        results[name] = {
            "overrides": overrides,
            "parameters": parameter_count(dataset, [f"--data.dataset_dir={dataset}", *overrides]),
            "tokens_seen": training.get("tokens_seen"),
            "wall_time_s": training.get("wall_time_s"),
            "stream_nll_per_note": nll["stream_nll_per_note"],
            "heads": nll["heads"],
            "metrics": {m: report["generated"]["metrics"][m]["mean"] for m in METRICS},
            "reference": {m: report["reference"]["metrics"][m]["mean"] for m in METRICS},
            "fidelity": report["generated"]["fidelity"]["micro"],
        }
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    print("\n| variant | parameters | stream NLL / note | next-token NLL / token | "
          + " | ".join(METRICS) + " |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * len(METRICS))
    for name, row in results.items():
        token_head = row["heads"].get("next_token", {}).get("nll")
        token = f"{token_head:.3f}" if token_head is not None else "-"
        cells = [f"{row['metrics'][m]:.3f}" for m in METRICS]
        print(f"| {name} | {row['parameters']:,} | {row['stream_nll_per_note']:.3f} | {token} | "
              + " | ".join(cells) + " |")  # fmt: skip
    print(f"\nwrote {results_file}")


if __name__ == "__main__":
    main()
