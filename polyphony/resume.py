"""A run's state on disk: training checkpoints, resuming, starting from a trained model
(``train.init_from``) and exporting a release directory.

The checkpoint *format* (safetensors + JSON, atomic, verified) is ``polyphony.checkpoint``;
this module decides what a training run puts in it and how a run continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .checkpoint import (
    CHECKPOINTS_DIR,
    TrainingCheckpoint,
    capture_rng_state,
    checkpoint_dir,
    find_latest_checkpoint,
    load_training_checkpoint,
    save_checkpoint,
)
from .config import Config, ModelConfig, model_config_from_dict
from .densities import DENSITY_FILE
from .model import PolyphonyGPT
from .tokenizer import PolyTokenizer


class ResumeError(ValueError):
    """A run directory whose checkpoints cannot be continued with this config."""


class InitError(ValueError):
    """A ``train.init_from`` model that this run cannot start from."""


# ----------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    tokens_seen: int = 0  # positions processed (padding included: the compute was spent)
    wall_time_s: float = 0.0  # summed over every session of the run
    train_losses: dict[str, float] = field(default_factory=dict)  # last logged
    eval_losses: dict[str, float] = field(default_factory=dict)  # last evaluation
    # Early stopping (train.patience): the best validation loss so far, its step, and how many
    # evaluations since have not beaten it.
    best_val_loss: float | None = None
    best_step: int = 0
    evals_since_best: int = 0

    def advance(self, steps_per_epoch: int, tokens: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.tokens_seen += tokens
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def record_validation(self, loss: float) -> None:
        if self.best_val_loss is None or loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.evals_since_best = loss, self.step, 0
        else:
            self.evals_since_best += 1


# ----------------------------------------------------------------------------- start
def base_model_config(directory: str | Path) -> ModelConfig:
    """The model config of the release at ``directory``: a run started from it has its
    architecture and loss heads, whatever the run's own ``model:`` section says."""
    path = Path(directory) / "config.json"
    try:
        return model_config_from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise InitError(
            f"train.init_from={directory}: cannot read {path.name} ({err}); give a release "
            "directory (checkpoints/polyphony-mini or a run's release/)"
        ) from err


def load_base_model(directory: str | Path, tokenizer: PolyTokenizer) -> PolyphonyGPT:
    """The release at ``directory`` to start a run from (fine-tuning). Its weights and model
    config are taken as they are; the dataset must use its vocabulary, or every token id would
    mean something else."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise InitError(
            f"train.init_from={directory}: no tokenizer.json there; give a release directory "
            "(checkpoints/polyphony-mini or a run's release/)"
        )
    base_tokenizer = PolyTokenizer.load(directory)
    if base_tokenizer.hash != tokenizer.hash:
        raise InitError(
            f"train.init_from={directory}: the model's vocabulary ({base_tokenizer.hash}) is not "
            f"the dataset's ({tokenizer.hash}); prepare the data with it: "
            f"`python -m polyphony.data.prepare MIDI_DIR --out DATASET --tokenizer {directory}`"
        )
    return PolyphonyGPT.from_pretrained(directory)


def _state_dict_options(**kwargs) -> StateDictOptions:
    # Full (unsharded) tensors, so one checkpoint format serves single, DDP and FSDP runs.
    return StateDictOptions(full_state_dict=True, **kwargs)


def find_resume_checkpoint(run_dir: Path, required: bool, accelerator) -> TrainingCheckpoint | None:
    """The newest verified checkpoint of ``run_dir`` (warning about skipped ones), or None for a
    fresh run. Refuses to start over when checkpoints exist but none verifies."""
    path, skipped = find_latest_checkpoint(run_dir)
    for reason in skipped:
        if accelerator.is_main_process:
            warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
    if path is None and skipped:
        raise ResumeError(
            f"{run_dir / CHECKPOINTS_DIR}: none of the {len(skipped)} checkpoints verifies; "
            "move them away to start this run afresh, or set train.out_dir to a new directory"
        )
    if path is None and required:
        raise ResumeError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR} to resume from")
    return load_training_checkpoint(path) if path is not None else None


def check_resumable(
    checkpoint: TrainingCheckpoint, cfg: Config, tokenizer_hash: str, data_hash: str
) -> None:
    if checkpoint.state.get("tokenizer_hash") != tokenizer_hash:
        raise ResumeError(
            f"{checkpoint.path}: trained with tokenizer {checkpoint.state.get('tokenizer_hash')}, "
            f"but the dataset's tokenizer is {tokenizer_hash}: token ids would mean other things. "
            "Use the dataset the run was trained on, or set train.out_dir to a new directory."
        )
    saved_model = checkpoint.config.get("model", {})
    current = dataclasses.asdict(cfg.model)
    changed = sorted(
        k for k in set(saved_model) | set(current) if saved_model.get(k) != current.get(k)
    )
    if changed:
        details = "; ".join(
            f"model.{k}: {saved_model.get(k)!r} -> {current.get(k)!r}" for k in changed
        )
        raise ResumeError(
            f"{checkpoint.path}: the run was trained with another model config ({details}). "
            "Resume with the config it was trained with, or set train.out_dir to a new directory."
        )
    if checkpoint.state.get("data_manifest_hash") != data_hash:
        warnings.warn(
            f"{checkpoint.path}: the dataset changed since this checkpoint (manifest hash "
            f"{checkpoint.state.get('data_manifest_hash')} -> {data_hash}); training continues, "
            "but the data order will differ from the interrupted run",
            stacklevel=2,
        )


def save_training_checkpoint(
    accelerator,
    model,
    optimizer,
    progress: Progress,
    cfg: Config,
    run_info: dict,
    extra_files: dict[str, bytes],
) -> None:
    """Collect the full state on every rank (collective under FSDP), write it from rank 0."""
    options = _state_dict_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    rng_states = gather_object([capture_rng_state()])  # rank order
    if accelerator.is_main_process:
        checkpoint = TrainingCheckpoint(
            step=progress.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            rng_states=rng_states,
            state={**run_info, "progress": dataclasses.asdict(progress)},
            config=cfg.to_dict(),
            extra_files=extra_files,
        )
        best = progress.best_step if cfg.train.patience else None
        save_checkpoint(cfg.train.out_dir, checkpoint, cfg.train.keep_last, keep_step=best)
    accelerator.wait_for_everyone()


def restore_training_state(
    accelerator, model, optimizer, checkpoint: TrainingCheckpoint, run_info: dict
) -> Progress:
    """Load weights and optimizer state; return where the run stood. RNG is restored later,
    once the data iterator exists."""
    options = _state_dict_options()
    set_model_state_dict(model, checkpoint.model_state, options=options)
    set_optimizer_state_dict(
        model, optimizer.optimizer, checkpoint.optimizer_state, options=options
    )
    progress = Progress(**checkpoint.state["progress"])
    if checkpoint.state.get("samples_per_step") != run_info["samples_per_step"]:
        # The epoch is cut into steps of another size: the saved position means nothing now.
        warnings.warn(
            f"{checkpoint.path}: saved with {checkpoint.state.get('samples_per_step')} windows per "
            f"step, this run takes {run_info['samples_per_step']}; continuing from the start of "
            f"epoch {progress.epoch + 1}",
            stacklevel=2,
        )
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    elif progress.step_in_epoch >= run_info["steps_per_epoch"]:  # the dataset shrank
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    return progress


def export_release(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write a release directory from a training checkpoint: model.safetensors, config.json,
    tokenizer.json (what ``PolyphonyGPT.from_pretrained`` loads) and training.json."""
    checkpoint = load_training_checkpoint(checkpoint_path)
    model = PolyphonyGPT(model_config_from_dict(checkpoint.config["model"]))
    model.load_state_dict(checkpoint.model_state)
    tokenizer = PolyTokenizer.load(checkpoint.path)
    out_dir = Path(out_dir)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, tokenizer)
    densities = checkpoint.path / DENSITY_FILE
    if densities.is_file():  # runs from before per-track densities have none
        shutil.copyfile(densities, temporary / DENSITY_FILE)
    state, progress = checkpoint.state, checkpoint.state["progress"]
    training = {
        "steps": checkpoint.step,
        "epochs": progress["epoch"] + progress["step_in_epoch"] / max(state["steps_per_epoch"], 1),
        "tokens_seen": progress["tokens_seen"],
        "final_losses": {"train": progress["train_losses"], "validation": progress["eval_losses"]},
        "wall_time_s": round(progress["wall_time_s"], 1),
        "hardware": state["hardware"],
        "mixed_precision": state["mixed_precision"],
        "data_manifest_hash": state["data_manifest_hash"],
        "tokenizer_hash": state["tokenizer_hash"],
        "parameters": model.num_parameters(),
        "torch": torch.__version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_config": checkpoint.config["train"],
        "data_config": checkpoint.config["data"],
    }
    (temporary / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)
    return out_dir


def export_latest(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """``train.py --export DIR``: export the newest verified checkpoint of ``run_dir``, or that
    of ``step`` when it is there (the best one of a run that stopped early)."""
    if step is not None and checkpoint_dir(run_dir, step).is_dir():
        return export_release(checkpoint_dir(run_dir, step), out_dir)
    path, skipped = find_latest_checkpoint(run_dir)
    for reason in skipped:
        warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
    if path is None:
        raise ResumeError(f"{Path(run_dir) / CHECKPOINTS_DIR}: no verified checkpoint to export")
    return export_release(path, out_dir)
