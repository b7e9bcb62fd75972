"""Typed configuration: dataclasses loaded from YAML, validated, with dotted CLI overrides.

A run is described by one YAML file in ``configs/`` with three sections (``data``, ``model``,
``train``). Any field can be overridden on the command line as ``--section.field=value``
(``--data.max_seq_len=1024``, ``--model.heads.next_instrument=0.5``). Values given on the
command line are parsed as YAML scalars, so ``--train.lr=3e-4`` is a float and
``--model.track_embeddings=false`` a bool. A mapping given whole replaces the file's mapping
(``--model.heads={next_token: 1.0}`` trains without the auxiliary heads), while a dotted key
changes one entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOKENIZATIONS = ("remi", "cpword")
REMI_HEADS = ("next_token", "next_instrument", "next_type")
# A CPWord compound's fields, in column order; a CPWord model has one head per field.
CPWORD_FIELDS = ("family", "position", "pitch", "velocity", "duration", "program", "tempo", "meter")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""


@dataclass
class DataConfig:
    """Where the data lives and how MIDI files become training windows."""

    dataset_dir: str = "data/dev"  # output of `python -m polyphony.data.prepare`
    tokenization: str = "remi"  # remi | cpword
    max_seq_len: int = 1024  # tokens per training window, instrument header included
    bar_aligned_windows: bool = True  # start windows on a Bar token where possible
    transpose_semitones: int = 5  # augmentation: uniform shift in [-n, n] for pitched tracks
    velocity_shift: int = 8  # augmentation: velocity offset in [-n, n], in whole bins of 4
    # Ablations only (docs/ablations.md). note_order (prepare): "canonical" (header order, then
    # pitch, at every onset) or "file" (the file's track order, as miditok alone gives).
    # track_densities (windows): false announces every part with density bin 0.
    note_order: str = "canonical"
    track_densities: bool = True
    # Share of training windows rearranged for infilling (data/fim.py): header, prefix, MASK,
    # suffix, SEP, middle bars, EOS. Evaluation windows are never rearranged.
    fim_rate: float = 0.0
    # Per-source sampling weights; a source is the first folder below the MIDI root
    # (corpus/music21/..., corpus/band/...). Missing sources weigh 1.0.
    source_weights: dict[str, float] = field(default_factory=dict)
    # prepare: isolation and validation of untrusted MIDI
    workers: int = 2
    file_timeout_s: float = 60.0
    max_memory_mb: int = 3072
    max_bars: int = 2000
    max_notes: int = 200_000
    max_tokens_per_note: float = 40.0
    # Refuse files with out-of-range velocity or controller bytes instead of clamping them.
    strict: bool = False
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    # Per-source override of both fractions above, e.g. {band: 0.1}: a source with few pieces
    # holds out a larger share so its evaluations rest on enough music.
    source_held_out: dict[str, float] = field(default_factory=dict)
    # At least this many validation pieces (fine-tuning on a handful of files); 0: none forced.
    min_validation_pieces: int = 0


@dataclass
class ModelConfig:
    """The decoder's shape; ``vocab_sizes`` and ``token_types`` are filled from the tokenizer."""

    tokenization: str = "remi"
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_seq_len: int = 1024
    rope_base: float = 10_000.0
    track_embeddings: bool = True
    tie_embeddings: bool = True  # REMI only: the LM head shares the token embedding
    # Loss weight per head. REMI: next_token, next_instrument, next_type.
    # CPWord: family, position, pitch, velocity, duration, program, tempo, meter.
    heads: dict[str, float] = field(
        default_factory=lambda: {"next_token": 1.0, "next_instrument": 0.5}
    )
    vocab_sizes: list[int] = field(default_factory=list)  # REMI: [V]; CPWord: one per field
    token_types: list[int] = field(default_factory=list)  # REMI: token id -> token family id
    n_token_types: int = 0
    n_tracks: int = 130  # 0..127 GM programs, 128 drums, 129 global (structure tokens)


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing."""

    out_dir: str = "runs/default"
    seed: int = 1337
    batch_size: int = 16  # per process
    grad_accum_steps: int = 1
    max_steps: int = 10_000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's names)
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    num_workers: int = 0  # DataLoader workers
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    # Fine-tuning: a release directory (checkpoints/polyphony-mini, runs/*/release) whose
    # weights and model config start the run; the optimizer starts fresh. "": random weights.
    init_from: str = ""
    # Stop when this many evaluations in a row have not beaten the best validation loss, and
    # export the best step; 0 trains to max_steps.
    patience: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        if self.data.tokenization not in TOKENIZATIONS:
            raise ConfigError(
                f"data.tokenization={self.data.tokenization!r}: expected one of {TOKENIZATIONS}"
            )
        if self.model.tokenization != self.data.tokenization:
            # One source of truth: the data decides how pieces are tokenized.
            self.model.tokenization = self.data.tokenization
        if self.model.tokenization == "cpword" and set(self.model.heads) <= set(REMI_HEADS):
            # REMI head names mean nothing to CPWord: one head per compound field instead.
            self.model.heads = {field: 1.0 for field in CPWORD_FIELDS} | {"next_instrument": 0.5}
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(
                f"model.d_model={self.model.d_model} is not divisible by model.n_heads={self.model.n_heads}"
            )
        kv = self.model.n_kv_heads or self.model.n_heads
        if self.model.n_heads % kv:
            raise ConfigError(
                f"model.n_heads={self.model.n_heads} is not a multiple of model.n_kv_heads={kv}"
            )
        fractions = {"": (self.data.validation_fraction, self.data.test_fraction)}
        fractions |= {source: (f, f) for source, f in self.data.source_held_out.items()}
        for source, (validation, test) in fractions.items():
            if min(validation, test) < 0 or validation + test >= 1:
                where = f"data.source_held_out.{source}" if source else "data.*_fraction"
                raise ConfigError(
                    f"{where}: held-out fractions {validation}, {test} leave nothing to train on; "
                    f"use values >= 0 that sum below 1"
                )
        if self.train.patience < 0:
            raise ConfigError(f"train.patience={self.train.patience}: expected >= 0 (0 = off)")
        if self.train.keep_last < 2:
            raise ConfigError(
                f"train.keep_last={self.train.keep_last}: must be >= 2 so a crash mid-save keeps one"
            )
        if self.train.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(
                f"train.mixed_precision={self.train.mixed_precision!r}: expected no, bf16 or fp16"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_type(tp: Any) -> Any:
    """Strip Optional[...] so values can be checked against the underlying type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp = _resolve_type(tp)
    if value is None or tp is Any:
        return value
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` (mixed_precision) as False
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, val_tp = typing.get_args(tp) or (Any, Any)
            return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown key '{where}{key}'.{hint} Valid keys: {', '.join(sorted(valid))}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(key, names, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr=3e-4", "--data.max_seq_len", "512"]`` -> nested dict of YAML-parsed values."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"cannot parse override {arg!r}: expected --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key, WholeMapping(value) if isinstance(value, dict) else value)
    return tree


class WholeMapping(dict):
    """A mapping given whole on the command line: it replaces, rather than merges into, the
    file's mapping of the same key."""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if (
            isinstance(value, dict)
            and not isinstance(value, WholeMapping)
            and isinstance(out.get(key), dict)
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    merged = _merge(values or {}, overrides or {})
    return _build(Config, merged, "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML), apply ``--section.key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (see configs/ for the shipped ones)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping with data/model/train sections")
    return config_from_dict(values, parse_overrides(overrides or []))


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from a checkpoint's config.json, rejecting unknown keys."""
    return _build(ModelConfig, values, "model.")
