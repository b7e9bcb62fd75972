"""The training loop, on Hugging Face Accelerate: one CPU, one GPU, DDP or FSDP, one code path.

It reads top to bottom like accelerate's ``complete_nlp_example.py`` and nanoGPT's ``train.py``:
``train()`` sets up (accelerator, data, model, optimizer, resume), runs the loop (accumulate
micro-batches, step, log, evaluate, checkpoint) and exports a release directory at the end.

Three choices make the numbers trustworthy:

* **Loss normalised by the global token count.** Windows are right-padded, so every rank and
  every micro-batch holds a different number of targets. Each head's summed cross-entropy is
  divided by that head's target count over the *whole* optimizer step (all ranks, all
  accumulation micro-batches), so 2 processes x batch 8 compute the same gradient as
  1 process x batch 16, and the weighted total equals the model's own loss on one process.
* **Exact resume.** Data order comes from accelerate's seedable sampler (reseeded per epoch),
  windows and augmentation are pure functions of (seed, epoch, index) (``set_epoch``), a resumed
  epoch skips the batches already seen (``skip_first_batches``) and RNG states are restored
  after the resumed loader iterator exists (LIBRARY_NOTES §6.7). The loss curve of an
  interrupted-and-resumed run equals the uninterrupted one.
* **Crash-safe checkpoints** written by ``polyphony.checkpoint`` (safetensors + JSON, atomic
  rename, verified on load), not ``accelerator.save_state`` (LIBRARY_NOTES §6.8-10).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    gather_object,
    set_seed,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import Config, DataConfig, TrainConfig, model_config_from_dict
from .data.dataset import MANIFEST_FILE, DatasetError, WindowDataset, tokenizer_of
from .densities import DENSITY_FILE, DensityStats
from .model import PolyphonyGPT
from .tokenizer import PolyTokenizer

RELEASE_DIR = "release"  # <out_dir>/release: the exported model, loadable by from_pretrained
METRICS_FILE = "metrics.csv"
DATA_CACHE_DIR = "data-cache"  # <out_dir>/../data-cache/<name>: raw MIDI folders prepared here
MIDI_SUFFIXES = (".mid", ".midi", ".kar")


class ResumeError(ValueError):
    """A run directory whose checkpoints cannot be continued with this config."""


class LaunchError(RuntimeError):
    """Processes that did not form the process group the launcher asked for."""


# ----------------------------------------------------------------------------- set-up pieces
def build_accelerator(cfg: TrainConfig, trackers: list | None = None) -> Accelerator:
    """The Accelerator for a run; precision and accumulation come from the config.

    ``cpu=True`` when there is no GPU: then ``accelerate launch --multi_gpu --num_processes N``
    gives N gloo processes (DDP on CPU), where a plain ``Accelerator()`` would silently start N
    independent single-process runs (LIBRARY_NOTES §3).
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        # We hand accumulate() exactly grad_accum_steps micro-batches per step; the end of the
        # dataloader must not force an early sync.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=trackers or None,
        project_dir=cfg.out_dir,
    )


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse a launch whose process group is not the one the launcher asked for."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"the launcher started {expected} processes (WORLD_SIZE) but they formed a group of "
            f"{accelerator.num_processes}; every rank would train alone and write the same run "
            "directory. On a machine without GPUs launch with "
            "`accelerate launch --multi_gpu --num_processes N train.py ...` "
            "(`--cpu --num_processes N` silently runs one process)."
        )


def resolve_dataset_dir(data: DataConfig, out_dir: str, accelerator: Accelerator) -> Path:
    """A prepared dataset directory for ``data.dataset_dir``.

    A directory with a manifest is used as it is. A folder of MIDI files is prepared (on the
    main process, incrementally: only new files are tokenized) into
    ``<out_dir>/../data-cache/<folder>-<tokenization>-<path hash>``, shared by the runs next to
    ``out_dir``. Anything else is left to ``WindowDataset`` to report.
    """
    root = Path(data.dataset_dir)
    if not root.is_dir() or (root / MANIFEST_FILE).is_file():
        return root
    has_midi = any(p.suffix.lower() in MIDI_SUFFIXES for p in root.rglob("*") if p.is_file())
    if not has_midi:
        raise DatasetError(
            f"{root}: neither a prepared dataset (no {MANIFEST_FILE}) nor a folder of MIDI files "
            f"({', '.join(MIDI_SUFFIXES)}); set data.dataset_dir to one of those"
        )
    from .data.prepare import prepare_dataset  # only needed for raw MIDI folders

    path_hash = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    cache = (
        Path(out_dir).parent
        / DATA_CACHE_DIR
        / f"{root.resolve().name}-{data.tokenization}-{path_hash}"
    )
    if accelerator.is_main_process:
        summary = prepare_dataset(root, cache, data, progress=True)
        print(summary.format())
    accelerator.wait_for_everyone()
    return cache


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only. Norm gains, biases and embedding tables (a tied head
    included) are not decayed: shrinking them toward zero changes scale, not complexity."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # a tied parameter is listed once
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps`` (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def describe_hardware(accelerator: Accelerator | None = None) -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    processes = accelerator.num_processes if accelerator is not None else 1
    return f"{processes} x {device}"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CSVTracker(GeneralTracker):
    """An accelerate tracker writing one CSV row per logged step (``<out_dir>/metrics.csv``).

    Columns are fixed up front (step, then the given keys); a value not logged at a step is
    left empty. Rows at or after the first step this process logs are dropped when the file is
    opened, so the table of a resumed run reads like the uninterrupted run's.
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path, columns: list[str]):
        super().__init__()
        self.path = Path(path)
        self.columns = ["step", *columns]
        self._file = None
        self._writer = None

    @property
    def tracker(self):
        return self._writer

    def log(self, values: dict, step: int | None = None, **kwargs):
        unknown = sorted(set(values) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: no column for {unknown}; columns are {self.columns}")
        if self._file is None:
            self._open(step)
        self._writer.writerow({"step": step, **values})
        self._file.flush()

    def _open(self, first_step: int) -> None:
        kept = []
        if self.path.is_file():
            with open(self.path, newline="") as old:
                kept = [row for row in csv.DictReader(old) if int(row["step"]) < first_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="") as new:
            writer = csv.DictWriter(new, self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.columns, restval="")

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as floats (empty cells left out)."""
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


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

    def advance(self, steps_per_epoch: int, tokens: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.tokens_seen += tokens
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def micro_batch_groups(accelerator, loader, dataset, progress: Progress, accumulation: int):
    """Yield the ``accumulation`` micro-batches of each optimizer step, from ``progress`` on,
    epoch after epoch. An epoch holds a whole number of steps (see ``train``)."""
    epoch, done = progress.epoch, progress.step_in_epoch
    while True:
        dataset.set_epoch(epoch)  # windows and augmentation of this epoch
        loader.set_epoch(epoch)  # the sampler's shuffle
        epoch_loader = (
            accelerator.skip_first_batches(loader, done * accumulation) if done else loader
        )
        group = []
        for batch in epoch_loader:
            group.append(batch)
            if len(group) == accumulation:
                yield group
                group = []
        epoch, done = epoch + 1, 0


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model, loader, accelerator, heads: list[str], weights: torch.Tensor
) -> dict[str, float]:
    """Loss and perplexity per head on the validation windows, normalised like training."""
    model.eval()
    counter = accelerator.unwrap_model(model).target_counts
    sums = torch.zeros(len(heads), device=accelerator.device)
    counts = torch.zeros(len(heads), device=accelerator.device, dtype=torch.long)
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        output = model(**batch)
        count = counter(batch["labels"], batch["label_track_ids"])
        sums += torch.stack([output.losses[h].float() for h in heads]) * count
        counts += count
    model.train()
    sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    means = (sums / counts.clamp(min=1)).tolist()
    values = {"val/loss": float((weights.cpu() * torch.tensor(means)).sum())}
    for head, mean in zip(heads, means, strict=True):
        values[f"val/loss_{head}"] = mean
        values[f"val/ppl_{head}"] = math.exp(min(mean, 50.0))  # exp(50) already means "untrained"
    return values


def evaluation_loader(dataset: WindowDataset, cfg: TrainConfig, accelerator) -> DataLoader:
    """The first ``eval_batches`` global batches of validation windows, split across ranks by
    hand (not ``prepare``): accelerate pads uneven shards with repeated windows, which would
    change the loss; here every rank gets the same number of distinct windows."""
    world = accelerator.num_processes
    n_windows = min(len(dataset), cfg.eval_batches * cfg.batch_size * world)
    n_windows -= n_windows % world
    shard = Subset(dataset, range(accelerator.process_index, n_windows, world))
    # Its own generator: iterating must not draw from the global RNG, or evaluating (at the
    # stop step of an interrupted run, say) would change the dropout of the steps after it.
    return DataLoader(
        shard, batch_size=cfg.batch_size, num_workers=cfg.num_workers, generator=torch.Generator()
    )


# ----------------------------------------------------------------------------- checkpoints
def _state_dict_options(**kwargs) -> StateDictOptions:
    # Full (unsharded) tensors, so one checkpoint format serves single, DDP and FSDP runs.
    return StateDictOptions(full_state_dict=True, **kwargs)


def find_resume_checkpoint(run_dir: Path, required: bool, accelerator) -> Checkpoint | None:
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
    return load_checkpoint(path) if path is not None else None


def check_resumable(
    checkpoint: Checkpoint, cfg: Config, tokenizer_hash: str, data_hash: str
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
        checkpoint = Checkpoint(
            step=progress.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            rng_states=rng_states,
            state={**run_info, "progress": dataclasses.asdict(progress)},
            config=cfg.to_dict(),
            extra_files=extra_files,
        )
        save_checkpoint(cfg.train.out_dir, checkpoint, keep_last=cfg.train.keep_last)
    accelerator.wait_for_everyone()


def restore_training_state(
    accelerator, model, optimizer, checkpoint: Checkpoint, run_info: dict
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
    checkpoint = load_checkpoint(checkpoint_path)
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


def export_latest(run_dir: str | Path, out_dir: str | Path) -> Path:
    """``train.py --export DIR``: export the newest verified checkpoint of ``run_dir``."""
    path, skipped = find_latest_checkpoint(run_dir)
    for reason in skipped:
        warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
    if path is None:
        raise ResumeError(f"{Path(run_dir) / CHECKPOINTS_DIR}: no verified checkpoint to export")
    return export_release(path, out_dir)


# ----------------------------------------------------------------------------- the loop
def train(
    cfg: Config, resume: bool = False, dry_run: bool = False, stop_at: int | None = None
) -> Progress:
    """Train (or continue) the run ``cfg.train.out_dir``; returns where it stopped.

    ``resume``: require a checkpoint to continue from (a run directory that has checkpoints is
    always continued). ``dry_run``: build everything, take one step, write nothing.
    ``stop_at``: stop after this global step, saving a checkpoint; the learning-rate schedule
    still spans ``train.max_steps`` (so a run stopped and resumed equals one that was not).
    """
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    heads = list(cfg.model.heads)
    columns = ["train/loss", *(f"train/loss_{h}" for h in heads), "lr", "tokens_per_s", "val/loss"]
    columns += [f"val/{kind}_{h}" for h in heads for kind in ("loss", "ppl")]
    trackers = None if dry_run else [t for t in tc.trackers if t != "csv"]
    if not dry_run and "csv" in tc.trackers:
        trackers.append(CSVTracker(run_dir / METRICS_FILE, columns))
    accelerator = build_accelerator(tc, trackers)
    check_world_size(accelerator)

    # Data: the tokenizer of the dataset decides the model's vocabulary.
    dataset_dir = resolve_dataset_dir(cfg.data, tc.out_dir, accelerator)
    data_cfg = dataclasses.replace(cfg.data, dataset_dir=str(dataset_dir))
    tokenizer = tokenizer_of(dataset_dir)
    cfg.model.vocab_sizes = list(tokenizer.vocab_sizes)
    cfg.model.token_types = list(tokenizer.token_types)
    cfg.model.n_token_types = int(tokenizer.n_token_types)
    train_set = WindowDataset.from_config(data_cfg, "train", seed=tc.seed)
    val_set = WindowDataset.from_config(data_cfg, "validation", seed=tc.seed)
    samples_per_step = tc.batch_size * accelerator.num_processes * tc.grad_accum_steps
    steps_per_epoch = len(train_set) // samples_per_step
    if steps_per_epoch == 0:
        raise DatasetError(
            f"{dataset_dir}: {len(train_set)} training windows per epoch, fewer than one "
            f"optimizer step takes ({tc.batch_size} per process x {accelerator.num_processes} "
            f"processes x {tc.grad_accum_steps} accumulation steps); add data or lower "
            "train.batch_size / train.grad_accum_steps"
        )
    run_info = {
        "tokenizer_hash": tokenizer.hash,
        "data_manifest_hash": file_sha256(dataset_dir / MANIFEST_FILE),
        "samples_per_step": samples_per_step,
        "steps_per_epoch": steps_per_epoch,
        "world_size": accelerator.num_processes,
        "hardware": describe_hardware(accelerator),
        "mixed_precision": tc.mixed_precision,
    }
    checkpoint = find_resume_checkpoint(run_dir, resume, accelerator)
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, run_info["tokenizer_hash"], run_info["data_manifest_hash"])

    # Model and optimizer: identical initial weights on every rank and in every run.
    set_seed(tc.seed)
    model = PolyphonyGPT(cfg.model)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2)
    )
    # Whole steps per epoch, so every epoch starts on a step boundary. The loader draws its
    # worker seeds from its own generator: creating an iterator never moves the global RNG.
    train_loader = DataLoader(
        Subset(train_set, range(steps_per_epoch * samples_per_step)),
        batch_size=tc.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=tc.num_workers,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    val_loader = evaluation_loader(val_set, tc, accelerator)
    weights = torch.tensor([cfg.model.heads[h] for h in heads], device=accelerator.device)

    progress = Progress()
    if checkpoint is not None:
        progress = restore_training_state(accelerator, model, optimizer, checkpoint, run_info)
        accelerator.print(f"resuming {run_dir} from step {progress.step} ({checkpoint.path.name})")
    # Per-rank streams for dropout (replaced by the saved ones when resuming).
    set_seed(tc.seed, device_specific=True)
    n_params = accelerator.unwrap_model(model).num_parameters()
    counter = accelerator.unwrap_model(model).target_counts
    accelerator.print(
        f"{n_params / 1e6:.2f}M parameters | {accelerator.num_processes} process(es) on "
        f"{accelerator.device} | {samples_per_step} windows x {data_cfg.max_seq_len} tokens per "
        f"step | {steps_per_epoch} steps per epoch | mixed precision {tc.mixed_precision}"
    )
    if not dry_run:
        accelerator.init_trackers(
            "logs", init_kwargs={"tensorboard": {"purge_step": progress.step + 1}}
        )
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    # Saved with every checkpoint: what generation needs beside the weights.
    extra_files = {
        "tokenizer.json": (dataset_dir / "tokenizer.json").read_bytes(),
        DENSITY_FILE: DensityStats.of_pieces(tokenizer, train_set.whole_pieces())
        .to_json()
        .encode(),
    }

    last_step = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    if dry_run:
        last_step = progress.step + 1
    groups = micro_batch_groups(accelerator, train_loader, train_set, progress, tc.grad_accum_steps)
    # Each micro-batch's loss below is already its share of the whole step's loss; undo the
    # division by A that accelerator.backward applies and the mean over W ranks that DDP takes.
    scale = tc.grad_accum_steps * accelerator.num_processes
    tokens_per_step = samples_per_step * data_cfg.max_seq_len
    window_sums = torch.zeros(len(heads), device=accelerator.device)
    window_counts = torch.zeros(len(heads), device=accelerator.device, dtype=torch.long)
    window_steps, window_time = 0, 0.0
    bar = tqdm(
        total=last_step, initial=progress.step, unit="step", dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )  # fmt: skip
    model.train()
    resumed_rng = checkpoint.rng_states if checkpoint is not None else None
    while progress.step < last_step:
        step_start = time.perf_counter()
        micro_batches = next(groups)
        if resumed_rng is not None:
            # Only now that the resumed iterator exists (LIBRARY_NOTES §6.7): creating it must
            # not consume the restored state.
            if len(resumed_rng) == accelerator.num_processes:
                restore_rng_state(resumed_rng[accelerator.process_index])
            elif accelerator.is_main_process:
                warnings.warn(
                    f"checkpoint has RNG states of {len(resumed_rng)} processes, this run has "
                    f"{accelerator.num_processes}: dropout will not repeat the interrupted run",
                    stacklevel=2,
                )
            resumed_rng = None

        lr = learning_rate(progress.step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        counts = [counter(b["labels"], b["label_track_ids"]) for b in micro_batches]
        global_counts = accelerator.reduce(torch.stack(counts).sum(0), "sum")
        for batch, count in zip(micro_batches, counts, strict=True):
            with accelerator.accumulate(model):
                output = model(**batch)
                head_losses = torch.stack([output.losses[h].float() for h in heads])
                # This micro-batch's share of the step loss: its summed losses over all targets.
                loss = (weights * head_losses * count / global_counts.clamp(min=1)).sum()
                accelerator.backward(loss * scale)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_sums += head_losses.detach() * count
        window_counts += global_counts
        progress.advance(steps_per_epoch, tokens_per_step)
        window_steps += 1
        window_time += time.perf_counter() - step_start
        bar.update(1)

        step = progress.step
        values = {}
        if step % tc.log_every == 0 or step == last_step:
            sums = accelerator.reduce(window_sums, "sum")
            means = (sums / window_counts.clamp(min=1)).tolist()
            values["train/loss"] = float((weights.cpu() * torch.tensor(means)).sum())
            values.update({f"train/loss_{h}": m for h, m in zip(heads, means, strict=True)})
            values["lr"] = lr
            values["tokens_per_s"] = window_steps * tokens_per_step / max(window_time, 1e-9)
            progress.train_losses = {k: v for k, v in values.items() if k.startswith("train/")}
            bar.set_postfix(
                loss=f"{values['train/loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}"
            )
            window_sums.zero_()
            window_counts.zero_()
            window_steps, window_time = 0, 0.0
        if not dry_run and len(val_loader) and (step % tc.eval_every == 0 or step == last_step):
            progress.eval_losses = evaluate(model, val_loader, accelerator, heads, weights)
            values.update(progress.eval_losses)
            if accelerator.is_main_process:
                bar.write(f"step {step}: val loss {progress.eval_losses['val/loss']:.4f}")
        if values and not dry_run:
            accelerator.log(values, step=step)
        progress.wall_time_s += time.perf_counter() - step_start
        if not dry_run and (step % tc.save_every == 0 or step == last_step):
            save_training_checkpoint(
                accelerator, model, optimizer, progress, cfg, run_info, extra_files
            )
    bar.close()

    if dry_run:
        accelerator.print(
            f"dry run: one step, loss {progress.train_losses['train/loss']:.4f}; nothing written"
        )
    else:
        if accelerator.is_main_process:
            release = export_latest(run_dir, run_dir / RELEASE_DIR)
            accelerator.print(f"exported {release}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return progress
