"""Training: the loss falls, resume is bit-exact (also after SIGKILL), 2 processes equal 1,
accumulation equals a bigger batch, bad resumes and bad inputs are refused with clear messages."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyphony.checkpoint import CHECKPOINT_MANIFEST, checkpoint_dir, load_training_checkpoint
from polyphony.config import Config, ModelConfig, TrainConfig, load_config
from polyphony.data.dataset import WindowDataset
from polyphony.model import PolyphonyGPT
from polyphony.resume import ResumeError
from polyphony.tracking import CSVTracker, read_metrics
from polyphony.training import (
    LaunchError,
    check_world_size,
    learning_rate,
    parameter_groups,
    train,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
TINY = str(REPO / "configs" / "tiny.yaml")
REFERENCE_STEPS = 20


def overrides(dataset: Path, out_dir: Path, **changes) -> list[str]:
    """Command-line overrides for a model of ~40k parameters on 64-token windows (a step takes
    milliseconds on a CPU); ``changes`` use ``__`` for the dot: ``model__dropout=0.1``."""
    values = {
        "data.dataset_dir": dataset, "data.max_seq_len": 64, "model.max_seq_len": 64,
        "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.dropout": 0.0,
        "train.out_dir": out_dir, "train.batch_size": 4, "train.lr": 3e-3, "train.min_lr": 3e-4,
        "train.warmup_steps": 5, "train.max_steps": REFERENCE_STEPS, "train.log_every": 1,
        "train.eval_every": 10, "train.eval_batches": 2, "train.save_every": 5,
        "train.trackers": "[csv]",
    }  # fmt: skip
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"--{key}={value}" for key, value in values.items()]


def run_config(dataset: Path, out_dir: Path, **values) -> Config:
    return load_config(TINY, overrides(dataset, out_dir, **values))


def losses(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run_dir / "metrics.csv")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "release" / "model.safetensors")


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_py_main():
    """train.py's main(), imported in-process (exit codes without a subprocess)."""
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def free_port() -> int:
    """A port for the gloo rendezvous that no other test run on this machine holds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy machine waiting for
    the second one dominates (measured here: 0.43 s vs 0.01 s per backward). Subprocesses get
    OMP_NUM_THREADS=1 for the same reason."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference_run(prepared_remi, tmp_path_factory) -> Path:
    """One process, batch 4, 20 steps, no dropout: what the other runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_config(prepared_remi, run_dir))
    return run_dir


# ----------------------------------------------------------------------------- learning
def test_loss_goes_down_and_the_release_loads(prepared_remi, tmp_path):
    run_dir = tmp_path / "run"
    cfg = run_config(
        prepared_remi, run_dir, train__max_steps=50, train__eval_every=25,
        train__save_every=25, train__trackers="[csv, tensorboard]",
    )  # fmt: skip
    train(cfg)

    rows = read_metrics(run_dir / "metrics.csv")
    curve = [row["train/loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 51))
    assert sum(curve[-5:]) / 5 < 0.75 * sum(curve[:5]) / 5
    assert rows[-1]["val/loss"] < rows[24]["val/loss"]
    logged = rows[0].keys()
    assert {"train/loss_next_token", "train/loss_next_instrument", "lr", "tokens_per_s"} <= logged
    last = rows[-1]
    assert last["val/ppl_next_token"] == pytest.approx(math.exp(last["val/loss_next_token"]))
    assert any((run_dir / "logs").rglob("events.out.tfevents.*"))

    model = PolyphonyGPT.from_pretrained(run_dir / "release")
    training = json.loads((run_dir / "release" / "training.json").read_text())
    assert training["steps"] == 50 and training["tokens_seen"] == 50 * 4 * 64
    assert training["final_losses"]["validation"]["val/loss"] == pytest.approx(rows[-1]["val/loss"])
    assert (
        training["data_manifest_hash"]
        == hashlib.sha256((prepared_remi / "manifest.json").read_bytes()).hexdigest()
    )
    assert (run_dir / "release" / "tokenizer.json").is_file()
    assert model.num_parameters() == training["parameters"]


@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_global_token_normalisation_equals_the_models_loss(kind, request):
    """Two halves of a batch (two ranks, or two micro-batches), each normalised by the global
    target count per head, sum to the model's loss on the whole batch."""
    dataset_dir = request.getfixturevalue(f"prepared_{kind}")
    dataset = WindowDataset(dataset_dir, "train", max_seq_len=64, seed=3)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    tokenizer = dataset.tokenizer
    if kind == "remi":
        heads = {"next_token": 1.0, "next_instrument": 0.5, "next_type": 0.25}
    else:
        heads = dict.fromkeys(
            ("family", "position", "pitch", "velocity", "duration", "program", "tempo", "meter"),
            1.0,
        )
        heads["next_instrument"] = 0.5
    config = ModelConfig(
        tokenization=kind, n_layers=1, d_model=32, n_heads=2, max_seq_len=64, heads=heads,
        vocab_sizes=list(tokenizer.vocab_sizes), token_types=list(tokenizer.token_types),
        n_token_types=tokenizer.n_token_types,
    )  # fmt: skip
    torch.manual_seed(0)
    model = PolyphonyGPT(config)
    names = list(heads)
    weight = torch.tensor([heads[h] for h in names])
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    def counts(part):
        return model.target_counts(part["labels"], part["label_track_ids"])

    global_counts = sum(counts(half) for half in halves)
    assert torch.equal(global_counts, counts(batch))
    # next_token (REMI) / family (CPWord, column 0): every labelled position
    first = batch["labels"][..., 0] if kind == "cpword" else batch["labels"]
    labelled = int((first != -100).sum())
    assert int(global_counts[0]) == labelled > 0
    total = 0.0
    for half in halves:
        output = model(**half)
        head_losses = torch.stack([output.losses[h] for h in names])
        total += (weight * head_losses * counts(half) / global_counts.clamp(min=1)).sum()
    assert total.item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)


def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    tiny = load_config(TINY).model
    tiny.vocab_sizes, tiny.token_types, tiny.n_token_types = [40], [0] * 40, 1
    tiny.heads = {"next_token": 1.0, "next_instrument": 0.5}
    model = PolyphonyGPT(tiny)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attention.qkv.weight" in decayed and "heads.next_instrument.weight" in decayed
    assert not any("embedding" in n or "norm" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    rates = [learning_rate(step, cfg) for step in range(120)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10] == pytest.approx(1.0) and rates[60] == pytest.approx(0.55)
    assert all(rates[i] >= rates[i + 1] for i in range(10, 119))
    assert rates[110:] == [0.1] * 10


# ----------------------------------------------------------------------------- resume
def test_resume_mid_epoch_repeats_the_uninterrupted_run_exactly(
    prepared_remi, tmp_path, monkeypatch
):
    """With dropout (so RNG restore matters) and 6-step epochs (so the stop at step 9 falls in
    the middle of the second epoch and the run crosses into a third). A poisoned pickle planted
    in the checkpoint is never executed."""
    original_len = WindowDataset.__len__
    monkeypatch.setattr(
        WindowDataset, "__len__", lambda self: 24 if self.is_train else original_len(self)
    )
    settings = dict(
        model__dropout=0.1, train__max_steps=16, train__save_every=4, train__eval_every=5
    )
    train(run_config(prepared_remi, tmp_path / "whole", **settings))

    interrupted = tmp_path / "interrupted"
    progress = train(run_config(prepared_remi, interrupted, **settings), stop_at=9)
    assert (progress.step, progress.epoch, progress.step_in_epoch) == (9, 1, 3)
    marker = tmp_path / "pwned"
    poison = pickle.dumps(_Payload(str(marker)))
    for name in ("random_states_0.pkl", "optimizer.bin", "evil.pkl"):
        (checkpoint_dir(interrupted, 9) / name).write_bytes(poison)
    train(run_config(prepared_remi, interrupted, **settings))

    assert not marker.exists()
    whole, resumed = losses(tmp_path / "whole"), losses(interrupted)
    assert len(whole) == len(resumed) == 16
    assert max(abs(a - b) for a, b in zip(whole, resumed, strict=True)) <= 1e-6
    assert max_weight_difference(weights(tmp_path / "whole"), weights(interrupted)) <= 1e-6


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def kill_after_checkpoint(train_args: list[str], run_dir: Path, step: int) -> None:
    """Run ``train.py train_args`` in a subprocess and SIGKILL it once the checkpoint of
    ``step`` is on disk."""
    command = [sys.executable, "train.py", *train_args]
    child = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = checkpoint_dir(run_dir, step) / CHECKPOINT_MANIFEST
    deadline = time.monotonic() + 120
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]


def test_resume_after_sigkill_repeats_the_uninterrupted_run(prepared_remi, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint(["--config", TINY, *overrides(prepared_remi, run_dir)], run_dir, 5)
    assert not (run_dir / "release").exists()  # it was killed mid-run, not after finishing

    progress = train(run_config(prepared_remi, run_dir))
    assert progress.step == REFERENCE_STEPS
    reference = losses(reference_run)
    assert max(abs(a - b) for a, b in zip(reference, losses(run_dir), strict=True)) <= 1e-6
    assert len(losses(run_dir)) == REFERENCE_STEPS
    assert max_weight_difference(weights(reference_run), weights(run_dir)) <= 1e-6


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_refuses_another_model_config(prepared_remi, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    with pytest.raises(ResumeError, match=r"model\.d_model: 32 -> 48.*train\.out_dir"):
        train(run_config(prepared_remi, run_dir, model__d_model=48, train__max_steps=25))


def test_resume_refuses_another_tokenizer(prepared_remi, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    # A checkpoint (consistent with its manifest) from a dataset with another vocabulary.
    newest = checkpoint_dir(run_dir, REFERENCE_STEPS)
    state = json.loads((newest / "state.json").read_text())
    state["tokenizer_hash"] = "0123456789abcdef"
    data = (json.dumps(state) + "\n").encode()
    (newest / "state.json").write_bytes(data)
    manifest = json.loads((newest / CHECKPOINT_MANIFEST).read_text())
    manifest["files"]["state.json"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (newest / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match="tokenizer 0123456789abcdef"):
        train(run_config(prepared_remi, run_dir, train__max_steps=25))


def test_corrupt_newest_checkpoint_is_skipped_and_the_older_one_resumed(
    prepared_remi, reference_run, tmp_path
):
    run_dir = copy_run(reference_run, tmp_path)
    newest = checkpoint_dir(run_dir, REFERENCE_STEPS) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="step_000020.*model.safetensors"):
        progress = train(run_config(prepared_remi, run_dir), stop_at=16)
    assert progress.step == 16  # resumed from step 15 (the older checkpoint), not from scratch
    reference = losses(reference_run)[:16]
    assert max(abs(a - b) for a, b in zip(reference, losses(run_dir), strict=True)) <= 1e-6


def test_export_writes_a_release_from_the_newest_checkpoint(reference_run, tmp_path, capsys):
    main = train_py_main()
    code = main(
        ["--config", TINY, f"--train.out_dir={reference_run}", "--export", f"{tmp_path}/out"]
    )
    assert code == 0, capsys.readouterr().err
    model = PolyphonyGPT.from_pretrained(tmp_path / "out")
    saved = load_training_checkpoint(checkpoint_dir(reference_run, REFERENCE_STEPS)).model_state
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())
    assert json.loads((tmp_path / "out" / "training.json").read_text())["steps"] == REFERENCE_STEPS


# ----------------------------------------------------------------------------- equivalences
def test_two_processes_equal_one_with_the_same_global_batch(prepared_remi, reference_run, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "train.py", "--config", TINY, *overrides(prepared_remi, run_dir, train__batch_size=2),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    two, one = losses(run_dir), losses(reference_run)
    assert len(two) == len(one) == REFERENCE_STEPS
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert max_weight_difference(weights(reference_run), weights(run_dir)) <= 1e-5
    training = json.loads((run_dir / "release" / "training.json").read_text())
    assert training["hardware"].startswith("2 x")


def test_gradient_accumulation_equals_the_bigger_batch(prepared_remi, reference_run, tmp_path):
    run_dir = tmp_path / "accumulated"
    train(run_config(prepared_remi, run_dir, train__batch_size=2, train__grad_accum_steps=2))
    one, accumulated = losses(reference_run), losses(run_dir)
    assert max(abs(a - b) for a, b in zip(one, accumulated, strict=True)) <= 1e-5
    assert max_weight_difference(weights(reference_run), weights(run_dir)) <= 1e-5


# ----------------------------------------------------------------------------- inputs and launch
def test_missing_dataset_exits_non_zero_with_a_clear_message(tmp_path):
    command = [
        sys.executable, "train.py", "--config", TINY,
        f"--data.dataset_dir={tmp_path / 'nowhere'}", f"--train.out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "nowhere: dataset directory not found" in result.stderr
    assert "polyphony.data.prepare" in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_name_the_problem(tmp_path, capsys):
    main = train_py_main()
    assert main(["--config", TINY, "--train.lrr=1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [f"--data.dataset_dir={empty}", f"--train.out_dir={tmp_path / 'run'}"]
    assert main(["--config", TINY, *args]) == 2
    assert "neither a prepared dataset" in capsys.readouterr().err


def test_resume_flag_requires_a_checkpoint(prepared_remi, tmp_path, capsys):
    main = train_py_main()
    args = ["--config", TINY, *overrides(prepared_remi, tmp_path / "run"), "--resume"]
    assert main(args) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_dry_run_on_a_midi_folder_prepares_the_data_and_writes_no_run(fixture_midi_dir, tmp_path):
    run_dir = tmp_path / "runs" / "dry"
    main = train_py_main()
    args = ["--config", TINY, *overrides(fixture_midi_dir, run_dir), "--dry-run"]
    assert main(args) == 0
    assert not run_dir.exists()
    cached = list((tmp_path / "runs" / "data-cache").glob("*/manifest.json"))
    assert len(cached) == 1 and cached[0].parent.name.startswith(f"{fixture_midi_dir.name}-remi-")


def test_a_process_group_smaller_than_launched_is_refused(monkeypatch):
    class OneProcess:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="--multi_gpu --num_processes"):
        check_world_size(OneProcess())


def test_csv_tracker_replaces_rows_from_the_resume_point_on(tmp_path):
    path = tmp_path / "metrics.csv"
    first = CSVTracker(path, ["train/loss"])
    for step in range(1, 6):
        first.log({"train/loss": float(step)}, step=step)
    first.finish()
    resumed = CSVTracker(path, ["train/loss"])
    resumed.log({"train/loss": 30.0}, step=3)
    resumed.finish()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 1), (2, 2), (3, 30)]
    with pytest.raises(ValueError, match="no column"):
        CSVTracker(path, ["train/loss"]).log({"val/loss": 1.0}, step=6)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_files_are_valid(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_processes >= config.num_machines >= 1
    assert set(config.fsdp_config) <= launch_options


def test_trains_on_a_dataset_prepared_with_another_vocabulary(fixture_midi_dir, tmp_path):
    # A model's tokenizer.json from an older vocabulary (fewer meters): `prepare --tokenizer`
    # writes a dataset in that vocabulary, and fine-tuning on it must work.
    from miditok import REMI

    from polyphony.config import DataConfig
    from polyphony.data.prepare import prepare_dataset
    from polyphony.tokenizer import PolyTokenizer, miditok_config

    config = miditok_config("remi")
    config.time_signature_range = {4: [2, 3, 4], 8: [6]}
    older = PolyTokenizer(REMI(config))
    assert older.hash != PolyTokenizer.build("remi").hash
    dataset = tmp_path / "data"
    prepare_dataset(
        fixture_midi_dir,
        dataset,
        DataConfig(validation_fraction=0.2, test_fraction=0.1),
        workers=0,
        progress=False,
        tokenizer=older,
    )
    train(run_config(dataset, tmp_path / "run", train__max_steps=3))
    model = PolyphonyGPT.from_pretrained(tmp_path / "run" / "release")
    assert model.config.vocab_sizes == list(older.vocab_sizes)
    assert PolyTokenizer.load(tmp_path / "run" / "release").hash == older.hash
