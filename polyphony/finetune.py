"""Fine-tune a trained model on a folder of your own MIDI files, in one command:

    python -m polyphony.finetune MY_MIDI_DIR --from checkpoints/polyphony-mini --out runs/mine

1. **prepare** the folder with the base model's vocabulary into ``OUT/data`` (every file
   validated as always; a broken one is skipped and named). A small folder still gets a
   validation split: at least ``data.min_validation_pieces`` pieces.
2. **train** from the base model's weights (``train.init_from``) with ``configs/finetune.yaml``:
   a fresh optimizer, low learning rate, short warm-up, few steps, stopping when validation has
   not improved for ``train.patience`` evaluations and exporting the best step. Checkpoints and
   exact resume work as in any run: run the same command again after an interruption.
3. **report** files used and skipped, steps, validation NLL per note of the base model and of
   the fine-tuned one on the same held-out pieces, and where the model is (``OUT/release``,
   what ``generate.py --checkpoint`` loads).

Any ``--section.key=value`` overrides the config (e.g. ``--train.max_steps=200``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, load_config
from .data.dataset import DatasetError
from .data.prepare import REPORT_FILE, PrepareError, PrepareSummary, prepare_dataset
from .evaluate import validation_nll
from .model import CheckpointError
from .resume import InitError, ResumeError, base_model_config
from .tokenizer import PolyTokenizer
from .training import RELEASE_DIR, train

FINETUNE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"
DATA_DIR = "data"  # OUT/data: the prepared folder


@dataclass
class FinetuneResult:
    prepared: PrepareSummary
    steps: int
    best_step: int | None  # the exported step when the run stopped early
    nll_before: float  # NLL per note of the base model on OUT/data's validation pieces
    nll_after: float  # the same for the fine-tuned model
    release: Path

    def format(self) -> str:
        change = (self.nll_after - self.nll_before) / self.nll_before
        stopped = f", best at step {self.best_step}" if self.best_step is not None else ""
        return "\n".join(
            [
                f"files      {self.prepared.files_found} found: {self.prepared.ok} used, "
                f"{sum(self.prepared.skipped.values())} skipped"
                + (
                    f" (see {self.prepared.out_dir / REPORT_FILE})" if self.prepared.skipped else ""
                ),
                f"pieces     train {self.prepared.pieces['train']}, "
                f"validation {self.prepared.pieces['validation']}",
                f"steps      {self.steps}{stopped}",
                f"NLL/note   {self.nll_before:.3f} -> {self.nll_after:.3f} nats on the "
                f"validation pieces ({change:+.1%})",
                f"model      {self.release}  (python generate.py --checkpoint {self.release} ...)",
            ]
        )


def finetune(
    midi_dir: str | Path,
    base: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Prepare ``midi_dir`` with ``base``'s vocabulary, fine-tune ``base`` on it into ``out``,
    export ``out/release`` and measure both models on the held-out pieces."""
    base, out = Path(base), Path(out)
    config = Path(config) if config is not None else FINETUNE_CONFIG
    if not config.is_file():
        raise ConfigError(f"{config}: fine-tuning config not found; pass --config FILE")
    if not (base / "tokenizer.json").is_file():
        raise InitError(
            f"--from {base}: no tokenizer.json there; give a release directory "
            "(checkpoints/polyphony-mini or a run's release/)"
        )
    tokenizer = PolyTokenizer.load(base)
    cfg = load_config(
        config,
        [
            *(overrides or []),
            f"--data.tokenization={tokenizer.kind}",
            f"--data.dataset_dir={out / DATA_DIR}",
            # Windows as long as the base model reads.
            f"--data.max_seq_len={base_model_config(base).max_seq_len}",
            f"--train.out_dir={out}",
            f"--train.init_from={base}",
        ],
    )
    prepared = prepare_dataset(
        midi_dir, out / DATA_DIR, cfg.data, progress=progress, tokenizer=tokenizer
    )
    if progress:
        print(prepared.format())
    if prepared.pieces["train"] == 0 or prepared.pieces["validation"] == 0:
        raise DatasetError(
            f"{midi_dir}: {prepared.ok} usable MIDI file(s); fine-tuning needs at least 2 "
            "(one to train on, one to validate)"
        )
    nll_before = validation_nll(base, out / DATA_DIR)["stream_nll_per_note"]
    state = train(cfg)
    release = out / RELEASE_DIR
    nll_after = validation_nll(release, out / DATA_DIR)["stream_nll_per_note"]
    return FinetuneResult(
        prepared=prepared,
        steps=state.step,
        best_step=state.best_step if cfg.train.patience else None,
        nll_before=nll_before,
        nll_after=nll_after,
        release=release,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyphony.finetune",
        description="Fine-tune a trained polyphony model on a folder of MIDI files.",
        epilog="Any --section.key=value overrides the config (configs/finetune.yaml).",
        allow_abbrev=False,
    )
    parser.add_argument("midi_dir", type=Path, help="your MIDI files (a folder, recursive)")
    parser.add_argument(
        "--from", dest="base", type=Path, required=True, help="the model to start from"
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    parser.add_argument("--config", type=Path, help=f"default: {FINETUNE_CONFIG.name}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = parser.parse_known_args(argv)
    try:
        result = finetune(
            args.midi_dir, args.base, args.out, args.config, overrides, not args.no_progress
        )
    except (
        ConfigError,
        PrepareError,
        DatasetError,
        CheckpointError,
        InitError,
        ResumeError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
