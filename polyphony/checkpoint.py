"""Training checkpoints that survive crashes: atomic save, verified load, safetensors + JSON only.

A checkpoint is a directory ``<run_dir>/checkpoints/step_000500`` holding

    model.safetensors                  weights (every state-dict key; tied tensors stored twice)
    optimizer.safetensors + .json      optimizer tensors + everything else (param groups, steps)
    rng.safetensors + rng.json         RNG states of python, numpy, torch (+ CUDA), one per rank
    state.json                         step, epoch, position in the epoch, hashes, losses, ...
    config.json                        the full run config (data, model, train)
    <extra files>                      e.g. tokenizer.json, so a checkpoint exports on its own
    manifest.json                      sha256 and size of every file above, written last

It is written into a temporary directory next to the others, every file is fsynced, the manifest
last, then the directory is renamed into place and the parent fsynced; only then are older
checkpoints beyond ``keep_last`` removed (renamed away first, so a kill while deleting leaves no
half-deleted checkpoint behind a valid name). A kill at any instant therefore leaves the previous
checkpoints intact, and at worst a ``.tmp-*`` directory that the next save removes.

accelerate's ``save_state`` is not used: it writes in place, deletes the oldest checkpoint
*before* writing the new one, and loads its RNG / custom-object pickles without checks
(LIBRARY_NOTES §6 items 8-10). Nothing here ever unpickles: a file that is not listed in the
manifest (a stray ``optimizer.bin``, a planted ``.pkl``) is never opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .model import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MANIFEST = "manifest.json"
FORMAT = "polyphony-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint directory whose manifest is missing or does not match its files."""


@dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue exactly where it stopped."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_states: list[dict[str, Any]]  # one per rank, from capture_rng_state()
    state: dict[str, Any]  # JSON: epoch, position, hashes, losses, wall time, ...
    config: dict[str, Any]  # JSON: the run config
    path: Path | None = None  # set when loaded
    extra_files: dict[str, bytes] = field(default_factory=dict)  # names written as they are


# ----------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- tensor trees
def _split_tensors(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able copy of ``tree`` with every tensor moved into ``tensors`` under its path.

    Optimizer state dicts and RNG states mix tensors with ints, floats, tuples and dicts whose
    keys may be ints; each is tagged so that ``_join_tensors`` rebuilds exactly the same types.
    """
    if isinstance(tree, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors would be stored under the same key {path!r}")
        # A copy: safetensors refuses tensors that share memory (tied weights, views).
        tensors[path] = tree.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(tree, dict):
        if all(isinstance(key, str) for key in tree):
            return {
                key: _split_tensors(value, tensors, f"{path}/{key}") for key, value in tree.items()
            }
        return {
            "__items__": [
                [key, _split_tensors(value, tensors, f"{path}/{key}")]
                for key, value in tree.items()
            ]
        }
    if isinstance(tree, tuple):
        return {
            "__tuple__": [_split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
        }
    if isinstance(tree, list):
        return [_split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(
        f"{path}: cannot store a {type(tree).__name__} in a checkpoint (tensors and JSON only)"
    )


def _join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {key: _join_tensors(value, tensors) for key, value in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(_join_tensors(v, tensors) for v in tree["__tuple__"])
        return {key: _join_tensors(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    return tree


def _tree_files(name: str, tree: Any) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(tree, tensors, "")
    return {f"{name}.safetensors": save_safetensors(tensors), f"{name}.json": _json_bytes(skeleton)}


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def checkpoint_files(checkpoint: TrainingCheckpoint) -> dict[str, bytes]:
    """The files of a checkpoint, serialised (manifest excluded)."""
    model_tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in checkpoint.model_state.items()
    }
    files = {
        "model.safetensors": save_safetensors(model_tensors, metadata={"format": "pt"}),
        **_tree_files("optimizer", checkpoint.optimizer_state),
        **_tree_files("rng", checkpoint.rng_states),
        "state.json": _json_bytes({**checkpoint.state, "step": checkpoint.step}),
        "config.json": _json_bytes(checkpoint.config),
    }
    clash = sorted(set(checkpoint.extra_files) & (set(files) | {CHECKPOINT_MANIFEST}))
    if clash:
        raise ValueError(f"extra checkpoint files {clash} would overwrite the checkpoint's own")
    return {**files, **checkpoint.extra_files}


# ----------------------------------------------------------------------------- durable writes
def _write_synced(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _discard(path: Path, root: Path) -> None:
    """Delete a directory so that no partial copy is left under a checkpoint name: rename to a
    hidden trash name (atomic), then remove."""
    trash = root / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    _fsync_dir(root)
    shutil.rmtree(trash)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    checkpoint: TrainingCheckpoint,
    keep_last: int = 2,
    keep_step: int | None = None,
) -> Path:
    """Write ``checkpoint`` atomically under ``run_dir/checkpoints/``; returns its directory.
    Older ones beyond ``keep_last`` are deleted, except step ``keep_step`` (the best so far,
    when the run stops early and exports it).

    Call from one process only (rank 0): it is the single writer of the run directory.
    """
    if keep_last < 2:
        raise ValueError(
            f"keep_last={keep_last}: keep at least 2 so that a crash mid-save leaves one"
        )
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of saves or deletions that a previous process did not finish.
    for stale in root.iterdir():
        if stale.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(stale, ignore_errors=True)

    final = checkpoint_dir(run_dir, checkpoint.step)
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    temporary.mkdir()
    entries = {
        name: _write_synced(temporary / name, data)
        for name, data in checkpoint_files(checkpoint).items()
    }
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": checkpoint.step,
        "files": entries,
    }
    _write_synced(temporary / CHECKPOINT_MANIFEST, _json_bytes(manifest))
    _fsync_dir(temporary)
    if final.exists():  # an unverifiable leftover of a run that crashed after this step
        _discard(final, root)
    os.rename(temporary, final)
    _fsync_dir(root)

    for stale in _stale_checkpoints(root, checkpoint.step, keep_last):
        if stale != checkpoint_dir(run_dir, keep_step if keep_step is not None else -1):
            _discard(stale, root)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every ``step_N`` directory, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _stale_checkpoints(root: Path, step: int, keep_last: int) -> list[Path]:
    """Checkpoints beyond ``keep_last``, and any *after* ``step``: those belong to a run that
    was resumed from an earlier step because they failed verification."""
    dirs = _step_dirs(root)
    later = [path for s, path in dirs if s > step]
    kept_or_older = [path for s, path in dirs if s <= step]
    return later + kept_or_older[keep_last:]


# ----------------------------------------------------------------------------- verified reads
def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise CorruptCheckpoint."""
    path = Path(path)
    manifest_path = path / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{path}: no {CHECKPOINT_MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not isinstance(files, dict):
            raise ValueError(f"not a {FORMAT} manifest")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpoint(f"{manifest_path}: unreadable manifest ({err})") from err
    if manifest["version"] > FORMAT_VERSION:
        raise CorruptCheckpoint(
            f"{path}: checkpoint format {manifest['version']} is newer than this polyphony "
            f"reads ({FORMAT_VERSION}); upgrade polyphony"
        )
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != manifest.get("step"):
        raise CorruptCheckpoint(f"{path}: manifest is for step {manifest.get('step')}")
    for name, entry in files.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise CorruptCheckpoint(f"{file}: listed in the manifest but missing")
        data = file.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptCheckpoint(
                f"{file}: {len(data)} bytes whose sha256 does not match the manifest "
                f"({entry['bytes']} bytes expected); the file was truncated or modified"
            )
    return manifest


def find_latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies, and a reason for each newer one
    that was skipped."""
    skipped = []
    for _, path in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR):
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint as err:
            skipped.append(str(err))
            continue
        return path, skipped
    return None, skipped


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Verify, then read a checkpoint directory (tensors on the CPU)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    known = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
             "rng.json", "state.json", "config.json"}  # fmt: skip
    missing = sorted(known - set(manifest["files"]))
    if missing:
        raise CorruptCheckpoint(f"{path}: the manifest lists no {', '.join(missing)}")
    try:
        model_state = load_safetensors((path / "model.safetensors").read_bytes())
        optimizer_state = _join_tensors(
            json.loads((path / "optimizer.json").read_text()),
            load_safetensors((path / "optimizer.safetensors").read_bytes()),
        )
        rng_states = _join_tensors(
            json.loads((path / "rng.json").read_text()),
            load_safetensors((path / "rng.safetensors").read_bytes()),
        )
        state = json.loads((path / "state.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (SafetensorError, json.JSONDecodeError, KeyError) as err:
        # Checksums matched, so the writer itself produced this: a bug, not a crash.
        raise CorruptCheckpoint(f"{path}: verified but unreadable ({err})") from err
    extra = {name: (path / name).read_bytes() for name in manifest["files"] if name not in known}
    return TrainingCheckpoint(
        step=int(manifest["step"]),
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_states=rng_states,
        state=state,
        config=config,
        path=path,
        extra_files=extra,
    )
