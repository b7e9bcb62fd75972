"""A trained model ready to generate: weights, tokenizer and density statistics, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..densities import DensityError, DensityStats
from ..model import PolyphonyGPT
from ..tokenizer import (
    TOKENIZER_FILE,
    PolyTokenizer,
)
from .common import DEFAULT_CHECKPOINT, GenerationError


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer (pass it as ``checkpoint=`` to reuse across calls)."""

    model: PolyphonyGPT
    tokenizer: PolyTokenizer
    densities: DensityStats  # the training data's notes per bar: defaults and levels
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(path: str | Path | None = None, device: str | None = None) -> Checkpoint:
    """``model.safetensors`` + ``config.json`` + ``tokenizer.json`` from ``path`` (default: the
    shipped checkpoints/polyphony-mini), checked against each other."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_dir():
        raise GenerationError(
            f"{path}: checkpoint directory not found. Train a model with `python train.py "
            f"--config configs/small.yaml`, export it with `python train.py --config "
            f"configs/small.yaml --export {path}`, or pass --checkpoint DIR (a directory with "
            "model.safetensors, config.json and tokenizer.json)"
        )
    if not (path / TOKENIZER_FILE).is_file():
        raise GenerationError(
            f"{path / TOKENIZER_FILE}: not found; a generation checkpoint holds "
            "model.safetensors, config.json and tokenizer.json (model.save_pretrained(dir, tokenizer))"
        )
    try:
        tokenizer = PolyTokenizer.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise GenerationError(
            f"{path / TOKENIZER_FILE}: cannot load the tokenizer ({err})"
        ) from err
    device = device or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise GenerationError(f"--device {device!r}: {err}") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise GenerationError(f"--device {device}: MPS is not available here; use --device cpu")
    model = PolyphonyGPT.from_pretrained(path, device=device)
    config = model.config
    same_vocabulary = list(config.vocab_sizes) == list(tokenizer.vocab_sizes) and (
        not config.token_types or list(config.token_types) == list(tokenizer.token_types)
    )
    if config.tokenization != tokenizer.kind or not same_vocabulary:
        raise GenerationError(
            f"{path}: tokenizer mismatch: config.json describes a {config.tokenization} model "
            f"with vocabulary {list(config.vocab_sizes)}, but tokenizer.json is {tokenizer.kind} "
            f"with {list(tokenizer.vocab_sizes)}; save the model together with the tokenizer it "
            "was trained with"
        )
    try:
        densities = DensityStats.load(path)
    except DensityError as err:
        raise GenerationError(str(err)) from err
    return Checkpoint(model=model, tokenizer=tokenizer, densities=densities, path=path)
