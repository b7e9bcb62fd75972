"""Train a polyphony model: ``accelerate launch train.py --config configs/small.yaml [options]``.

    python train.py --config configs/tiny.yaml                        one process
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train.py --config ...
    python train.py --config configs/small.yaml --train.lr=3e-4       any config key, dotted
    python train.py --config configs/small.yaml --max-steps 1000      stop early (schedule kept)
    python train.py --config configs/small.yaml --dry-run             one step, nothing written
    python train.py --config configs/small.yaml --export out/model    release from a checkpoint
    python train.py --config configs/finetune.yaml --init-from checkpoints/polyphony-mini \
        --data.dataset_dir=data/mine --train.out_dir=runs/mine        fine-tune a trained model

A run directory (train.out_dir) that holds checkpoints is continued from its newest verified
one; ``--resume`` makes that a requirement. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

import torch

from polyphony.config import ConfigError, load_config
from polyphony.data.dataset import DatasetError
from polyphony.data.prepare import PrepareError
from polyphony.model import CheckpointError
from polyphony.resume import InitError, ResumeError, export_latest
from polyphony.training import LaunchError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any --section.key=value overrides the config.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="fail unless a checkpoint exists")
    parser.add_argument("--dry-run", action="store_true", help="build all, one step, save nothing")
    parser.add_argument(
        "--max-steps", type=int, metavar="N", help="stop after step N (schedule: train.max_steps)"
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from this release's weights and model config (= --train.init_from=DIR)",
    )
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="write a release from the run's newest checkpoint; no training",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.init_from:
        overrides.append(f"--train.init_from={args.init_from}")
    try:
        cfg = load_config(args.config, overrides)
        if args.export:
            print(f"exported {export_latest(cfg.train.out_dir, args.export)}")
        else:
            train(cfg, resume=args.resume, dry_run=args.dry_run, stop_at=args.max_steps)
    except torch.cuda.OutOfMemoryError as err:
        print(
            f"error: out of GPU memory ({str(err).splitlines()[0]}). Lower --train.batch_size and "
            "raise --train.grad_accum_steps to keep the same batch, or shorten --data.max_seq_len.",
            file=sys.stderr,
        )
        return 1
    except (
        ConfigError,
        DatasetError,
        PrepareError,
        CheckpointError,
        ResumeError,
        InitError,
        LaunchError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
