"""Training checkpoints: exact round trip, verification, pruning, kills mid-save, no unpickling."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from polyphony.checkpoint import (
    CHECKPOINT_MANIFEST,
    CorruptCheckpoint,
    TrainingCheckpoint,
    capture_rng_state,
    checkpoint_dir,
    find_latest_checkpoint,
    load_training_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)


class TiedModel(nn.Module):
    """Embedding + norm + linear head sharing the embedding matrix (as the REMI model does)."""

    def __init__(self, vocab: int = 32, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids):
        return self.head(torch.relu(self.hidden(self.norm(self.embedding(ids)))))


def train_steps(model, optimizer, steps: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 32, (4, 8), generator=generator)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    return model, optimizer


def snapshot(model, optimizer, step: int, **state) -> TrainingCheckpoint:
    return TrainingCheckpoint(
        step=step,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        rng_states=[capture_rng_state()],
        state={"epoch": 0, **state},
        config={"model": {"width": 16}},
    )


def test_round_trip_continues_training_exactly(tmp_path):
    model, optimizer = make_run()
    train_steps(model, optimizer, 3)
    path = save_checkpoint(tmp_path, snapshot(model, optimizer, 3, note="x"))
    expected_losses = train_steps(model, optimizer, 4, seed=1)

    fresh_model, fresh_optimizer = make_run(seed=99)  # different init: everything must come back
    checkpoint = load_training_checkpoint(path)
    fresh_model.load_state_dict(checkpoint.model_state)
    fresh_optimizer.load_state_dict(checkpoint.optimizer_state)
    assert fresh_model.head.weight is fresh_model.embedding.weight  # loading kept the tie
    assert checkpoint.step == 3 and checkpoint.state == {"epoch": 0, "note": "x", "step": 3}
    assert checkpoint.config == {"model": {"width": 16}}
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert train_steps(fresh_model, fresh_optimizer, 4, seed=1) == expected_losses


def test_rng_states_are_restored_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    restore_rng_state(state)
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(3).tolist(),
        np.random.randn(),
    ) == expected


def test_rng_states_survive_the_files(tmp_path):
    model, optimizer = make_run()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = save_checkpoint(tmp_path, snapshot(model, optimizer, 1))
    expected = (random.random(), np.random.randn(), torch.rand(2).tolist())
    restore_rng_state(load_training_checkpoint(path).rng_states[0])
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == expected


def test_only_tensors_and_json_can_be_stored(tmp_path):
    model, optimizer = make_run()
    checkpoint = snapshot(model, optimizer, 1)
    checkpoint.state["callback"] = object()
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, checkpoint)
    assert find_latest_checkpoint(tmp_path) == (None, [])


def test_keep_last_prunes_old_checkpoints_and_leaves_no_temporaries(tmp_path):
    model, optimizer = make_run()
    for step in range(1, 6):
        save_checkpoint(tmp_path, snapshot(model, optimizer, step), keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, snapshot(model, optimizer, 6), keep_last=1)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "delete_manifest"])
def test_damaged_newest_checkpoint_is_skipped_with_a_reason(tmp_path, damage):
    model, optimizer = make_run()
    save_checkpoint(tmp_path, snapshot(model, optimizer, 1))
    newest = save_checkpoint(tmp_path, snapshot(model, optimizer, 2))
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_file":
        (newest / "rng.safetensors").unlink()
    else:
        (newest / CHECKPOINT_MANIFEST).unlink()

    with pytest.raises(CorruptCheckpoint):
        verify_checkpoint(newest)
    path, skipped = find_latest_checkpoint(tmp_path)
    assert path == checkpoint_dir(tmp_path, 1)
    assert len(skipped) == 1 and "step_000002" in skipped[0]
    assert load_training_checkpoint(path).step == 1


def test_saving_after_resuming_from_an_older_step_replaces_the_bad_newer_one(tmp_path):
    model, optimizer = make_run()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, snapshot(model, optimizer, step), keep_last=3)
    (checkpoint_dir(tmp_path, 3) / CHECKPOINT_MANIFEST).unlink()  # step 3 never finished
    assert find_latest_checkpoint(tmp_path)[0] == checkpoint_dir(tmp_path, 2)
    # The resumed run reaches step 3 again: the unfinished directory is replaced, not kept.
    save_checkpoint(tmp_path, snapshot(model, optimizer, 3), keep_last=3)
    assert find_latest_checkpoint(tmp_path) == (checkpoint_dir(tmp_path, 3), [])


class Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_poisoned_pickles_in_a_checkpoint_are_never_executed(tmp_path):
    model, optimizer = make_run()
    path = save_checkpoint(tmp_path / "run", snapshot(model, optimizer, 1))
    marker = tmp_path / "pwned"
    poison = pickle.dumps(Payload(str(marker)))
    # Where accelerate's save_state would have put pickles, plus a torch-style weights file.
    for name in (
        "optimizer.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
        "pytorch_model.bin",
    ):
        (path / name).write_bytes(poison)
    # Even a pickle listed in the manifest (so it verifies) is only ever read as bytes.
    manifest = json.loads((path / CHECKPOINT_MANIFEST).read_text())
    (path / "extra.pkl").write_bytes(poison)
    manifest["files"]["extra.pkl"] = {
        "sha256": hashlib.sha256(poison).hexdigest(),
        "bytes": len(poison),
    }
    (path / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))

    found, skipped = find_latest_checkpoint(tmp_path / "run")
    checkpoint = load_training_checkpoint(found)
    fresh, _ = make_run(seed=5)
    fresh.load_state_dict(checkpoint.model_state)
    assert found == path and skipped == []
    assert checkpoint.extra_files == {"extra.pkl": poison}
    assert torch.equal(fresh.hidden.weight, model.hidden.weight)
    assert not marker.exists()


# ----------------------------------------------------------------------------- kills mid-save
def filled_checkpoint(step: int) -> TrainingCheckpoint:
    """A checkpoint whose every tensor holds ``step``, so a loaded one can be checked exactly.
    Large enough (about 2 MB) that a save takes a while and kills land inside it."""
    model = nn.Linear(256, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        optimizer_tensors = [t for state in optimizer.state.values() for t in state.values()]
        for tensor in [*model.state_dict().values(), *optimizer_tensors]:
            tensor.fill_(step)
    return TrainingCheckpoint(
        step, model.state_dict(), optimizer.state_dict(), [capture_rng_state()], {}, {}
    )


def save_forever(run_dir: str, first_step: int) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    step = first_step
    while True:
        save_checkpoint(run_dir, filled_checkpoint(step), keep_last=2)
        step += 1


def test_kills_at_random_points_of_saving_always_leave_a_verified_checkpoint(tmp_path):
    save_checkpoint(tmp_path, filled_checkpoint(0))
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    latest_step, interrupted_saves = 0, 0
    for _ in range(24):
        # "Resume": continue from the newest verified checkpoint, as training does.
        child = context.Process(target=save_forever, args=(str(tmp_path), latest_step + 1))
        child.start()
        time.sleep(rng.uniform(0.0, 0.5))  # a save takes 0.1-0.2 s here (fsyncs)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGKILL

        leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
        path, skipped = find_latest_checkpoint(tmp_path)
        interrupted_saves += bool(skipped) or any(name.startswith(".") for name in leftovers)
        assert path is not None, leftovers
        checkpoint = load_training_checkpoint(path)
        assert checkpoint.step >= latest_step
        values = [*checkpoint.model_state.values()]
        values += [t for s in checkpoint.optimizer_state["state"].values() for t in s.values()]
        assert all(torch.all(t == checkpoint.step) for t in values)
        latest_step = checkpoint.step
    # The kills really did land inside saves (temporary, half-renamed or half-pruned state).
    assert interrupted_saves >= 5
    assert latest_step >= 5  # and the runs made progress between kills
