"""The training loop, on Hugging Face Accelerate: one CPU, one GPU, DDP or FSDP, one code path.

It reads top to bottom like nanoGPT's ``train.py``: :func:`setup` builds a :class:`Run`
(accelerator, data, model, optimizer, resumed or started from a trained model), then
:func:`train` loops over its phases (:func:`optimizer_step`, :func:`log_if_due`,
:func:`evaluate_if_due`, :func:`save_if_due`) and exports a release directory at the end.
Saving, resuming, ``train.init_from`` and export are ``polyphony.resume``.

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

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .checkpoint import restore_rng_state
from .config import Config, DataConfig, TrainConfig
from .data.dataset import DatasetError, WindowDataset, tokenizer_of
from .data.midi_input import MIDI_SUFFIXES
from .data.shards import MANIFEST_FILE
from .densities import DENSITY_FILE, DensityStats
from .model import PolyphonyGPT
from .resume import (
    Progress,
    base_model_config,
    check_resumable,
    export_latest,
    find_resume_checkpoint,
    load_base_model,
    restore_training_state,
    save_training_checkpoint,
)
from .tracking import METRICS_FILE, CSVTracker

RELEASE_DIR = "release"  # <out_dir>/release: the exported model, loadable by from_pretrained
DATA_CACHE_DIR = "data-cache"  # <out_dir>/../data-cache/<name>: raw MIDI folders prepared here


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
    """``eval_batches`` global batches of validation windows spread evenly over the split (the
    first ones would be the first pieces by hash only: measured here, 0.98 nats against 1.93 over
    every window), split across ranks by hand (not ``prepare``): accelerate pads uneven shards
    with repeated windows, which would change the loss; here every rank gets the same number of
    distinct windows."""
    world = accelerator.num_processes
    n_windows = min(len(dataset), cfg.eval_batches * cfg.batch_size * world)
    n_windows -= n_windows % world
    spread = [len(dataset) * i // max(n_windows, 1) for i in range(n_windows)]
    shard = Subset(dataset, spread[accelerator.process_index :: world])
    # Its own generator: iterating must not draw from the global RNG, or evaluating (at the
    # stop step of an interrupted run, say) would change the dropout of the steps after it.
    return DataLoader(
        shard, batch_size=cfg.batch_size, num_workers=cfg.num_workers, generator=torch.Generator()
    )


# ----------------------------------------------------------------------------- the run
@dataclass
class LossWindow:
    """Summed losses and target counts per head since the last log line, and the time spent."""

    sums: torch.Tensor
    counts: torch.Tensor
    steps: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()
        self.steps, self.seconds = 0, 0.0


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: Config
    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    batches: Iterator[list[dict[str, torch.Tensor]]]  # the micro-batches of each step
    val_loader: DataLoader
    heads: list[str]
    weights: torch.Tensor  # loss weight per head
    progress: Progress
    run_info: dict[str, Any]  # saved with every checkpoint; a resume is checked against it
    extra_files: dict[str, bytes]  # what generation needs beside the weights
    last_step: int
    dry_run: bool
    resumed_rng: list | None  # restored once the data iterator exists
    window: LossWindow

    @property
    def stopped_early(self) -> bool:
        patience = self.cfg.train.patience
        return patience > 0 and self.progress.evals_since_best >= patience


def setup(
    cfg: Config, resume: bool = False, dry_run: bool = False, stop_at: int | None = None
) -> Run:
    """Accelerator, data, model and optimizer of the run ``cfg.train.out_dir``: continued from
    its newest checkpoint, else started from ``train.init_from`` or from random weights."""
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    if tc.init_from:  # the trained model's architecture and heads, not the config's
        cfg.model = base_model_config(tc.init_from)
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
    base = load_base_model(tc.init_from, tokenizer) if tc.init_from else None
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
        "init_from": tc.init_from,
    }
    checkpoint = find_resume_checkpoint(run_dir, resume, accelerator)
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, run_info["tokenizer_hash"], run_info["data_manifest_hash"])

    # Model and optimizer: identical initial weights on every rank and in every run.
    set_seed(tc.seed)
    model = PolyphonyGPT(cfg.model)
    if base is not None:
        model.load_state_dict(base.state_dict())
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

    progress = Progress()
    if checkpoint is not None:
        progress = restore_training_state(accelerator, model, optimizer, checkpoint, run_info)
        accelerator.print(f"resuming {run_dir} from step {progress.step} ({checkpoint.path.name})")
    elif base is not None:
        accelerator.print(f"starting from {tc.init_from}")
    # Per-rank streams for dropout (replaced by the saved ones when resuming).
    set_seed(tc.seed, device_specific=True)
    n_params = accelerator.unwrap_model(model).num_parameters()
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
    densities = DensityStats.of_pieces(
        tokenizer, train_set.whole_pieces(), weights=train_set.piece_weights()
    )
    if tc.init_from:  # instruments this data lacks keep the trained model's defaults
        densities = densities.falling_back_to(DensityStats.load(tc.init_from))
    last_step = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        batches=micro_batch_groups(
            accelerator, train_loader, train_set, progress, tc.grad_accum_steps
        ),
        val_loader=evaluation_loader(val_set, tc, accelerator),
        heads=heads,
        weights=torch.tensor([cfg.model.heads[h] for h in heads], device=accelerator.device),
        progress=progress,
        run_info=run_info,
        extra_files={
            "tokenizer.json": (dataset_dir / "tokenizer.json").read_bytes(),
            DENSITY_FILE: densities.to_json().encode(),
        },
        last_step=progress.step + 1 if dry_run else last_step,
        dry_run=dry_run,
        resumed_rng=checkpoint.rng_states if checkpoint is not None else None,
        window=LossWindow(
            torch.zeros(len(heads), device=accelerator.device),
            torch.zeros(len(heads), device=accelerator.device, dtype=torch.long),
        ),
    )


# ----------------------------------------------------------------------------- the phases
def restore_rng_once(run: Run) -> None:
    """Only once the resumed data iterator exists (LIBRARY_NOTES §6.7): creating it must not
    consume the restored state."""
    saved, accelerator = run.resumed_rng, run.accelerator
    if saved is None:
        return
    if len(saved) == accelerator.num_processes:
        restore_rng_state(saved[accelerator.process_index])
    elif accelerator.is_main_process:
        warnings.warn(
            f"checkpoint has RNG states of {len(saved)} processes, this run has "
            f"{accelerator.num_processes}: dropout will not repeat the interrupted run",
            stacklevel=2,
        )
    run.resumed_rng = None


def optimizer_step(run: Run, micro_batches: list[dict], lr: float) -> None:
    """Accumulate the micro-batches' gradients and take one optimizer step at ``lr``."""
    accelerator, model, optimizer, tc = run.accelerator, run.model, run.optimizer, run.cfg.train
    for group in optimizer.param_groups:
        group["lr"] = lr
    counter = accelerator.unwrap_model(model).target_counts
    counts = [counter(b["labels"], b["label_track_ids"]) for b in micro_batches]
    global_counts = accelerator.reduce(torch.stack(counts).sum(0), "sum")
    # Each micro-batch's loss below is already its share of the whole step's loss; undo the
    # division by A that accelerator.backward applies and the mean over W ranks that DDP takes.
    scale = tc.grad_accum_steps * accelerator.num_processes
    for batch, count in zip(micro_batches, counts, strict=True):
        with accelerator.accumulate(model):
            output = model(**batch)
            head_losses = torch.stack([output.losses[h].float() for h in run.heads])
            loss = (run.weights * head_losses * count / global_counts.clamp(min=1)).sum()
            accelerator.backward(loss * scale)
            if accelerator.sync_gradients and tc.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run.window.sums += head_losses.detach() * count
    run.window.counts += global_counts


def log_if_due(run: Run, lr: float, bar) -> dict[str, float]:
    """Training losses over the steps since the last log line, on log steps."""
    step, tc, window = run.progress.step, run.cfg.train, run.window
    if step % tc.log_every and step != run.last_step:
        return {}
    sums = run.accelerator.reduce(window.sums, "sum")
    means = (sums / window.counts.clamp(min=1)).tolist()
    values = {"train/loss": float((run.weights.cpu() * torch.tensor(means)).sum())}
    values.update({f"train/loss_{h}": m for h, m in zip(run.heads, means, strict=True)})
    values["lr"] = lr
    tokens_per_step = run.run_info["samples_per_step"] * run.cfg.data.max_seq_len
    values["tokens_per_s"] = window.steps * tokens_per_step / max(window.seconds, 1e-9)
    run.progress.train_losses = {k: v for k, v in values.items() if k.startswith("train/")}
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
    window.reset()
    return values


def evaluate_if_due(run: Run, bar) -> dict[str, float]:
    """Validation losses on evaluation steps; they also feed early stopping."""
    step, tc = run.progress.step, run.cfg.train
    if run.dry_run or not len(run.val_loader):
        return {}
    if step % tc.eval_every and step != run.last_step:
        return {}
    losses = evaluate(run.model, run.val_loader, run.accelerator, run.heads, run.weights)
    run.progress.eval_losses = losses
    run.progress.record_validation(losses["val/loss"])
    if run.accelerator.is_main_process:
        bar.write(f"step {step}: val loss {losses['val/loss']:.4f}")
    return losses


def save_if_due(run: Run, evaluated: bool) -> None:
    """A checkpoint every ``save_every`` steps and at the last; with early stopping also after
    every evaluation, so the best step has one to export."""
    step, tc = run.progress.step, run.cfg.train
    due = step % tc.save_every == 0 or step == run.last_step or run.stopped_early
    if run.dry_run or not (due or (tc.patience and evaluated)):
        return
    save_training_checkpoint(
        run.accelerator, run.model, run.optimizer, run.progress, run.cfg, run.run_info,
        run.extra_files,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the loop
def train(
    cfg: Config, resume: bool = False, dry_run: bool = False, stop_at: int | None = None
) -> Progress:
    """Train (or continue) the run ``cfg.train.out_dir``; returns where it stopped.

    ``resume``: require a checkpoint to continue from (a run directory that has checkpoints is
    always continued). ``dry_run``: build everything, take one step, write nothing.
    ``stop_at``: stop after this global step, saving a checkpoint; the learning-rate schedule
    still spans ``train.max_steps`` (so a run stopped and resumed equals one that was not).
    With ``train.patience`` the run also stops when validation has not improved for that many
    evaluations, and the best step is exported.
    """
    run = setup(cfg, resume, dry_run, stop_at)
    progress, accelerator = run.progress, run.accelerator
    bar = tqdm(
        total=run.last_step, initial=progress.step, unit="step", dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )  # fmt: skip
    tokens_per_step = run.run_info["samples_per_step"] * cfg.data.max_seq_len
    run.model.train()
    while progress.step < run.last_step and not run.stopped_early:
        started = time.perf_counter()
        micro_batches = next(run.batches)
        restore_rng_once(run)
        lr = learning_rate(progress.step, cfg.train)
        optimizer_step(run, micro_batches, lr)
        progress.advance(run.run_info["steps_per_epoch"], tokens_per_step)
        run.window.steps += 1
        run.window.seconds += time.perf_counter() - started
        bar.update(1)
        values = log_if_due(run, lr, bar)
        losses = evaluate_if_due(run, bar)
        if (values or losses) and not dry_run:
            accelerator.log(values | losses, step=progress.step)
        progress.wall_time_s += time.perf_counter() - started
        save_if_due(run, evaluated=bool(losses))
    bar.close()

    if dry_run:
        accelerator.print(
            f"dry run: one step, loss {progress.train_losses['train/loss']:.4f}; nothing written"
        )
        return progress
    if run.stopped_early:
        accelerator.print(
            f"stopped at step {progress.step}: validation loss has not improved for "
            f"{cfg.train.patience} evaluations; exporting step {progress.best_step}"
        )
    if accelerator.is_main_process:
        best = progress.best_step if cfg.train.patience else None
        release = export_latest(cfg.train.out_dir, Path(cfg.train.out_dir) / RELEASE_DIR, best)
        accelerator.print(f"exported {release}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return progress
