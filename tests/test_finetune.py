"""Fine-tuning: train.init_from, early stopping, and `python -m polyphony.finetune`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyphony import generate
from polyphony.data.dataset import DatasetError, WindowDataset
from polyphony.densities import DensityStats
from polyphony.finetune import finetune, main
from polyphony.model import PolyphonyGPT
from polyphony.resume import InitError
from polyphony.training import setup, train
from tests.test_training import (  # noqa: F401 (one_thread: the module's autouse fixture)
    TINY,
    kill_after_checkpoint,
    losses,
    max_weight_difference,
    one_thread,
    overrides,
    run_config,
    weights,
)

REPO = Path(__file__).resolve().parents[1]
# A fine-tune of the reference run's tiny model: few steps, evaluations every 2.
SETTINGS = dict(
    train__max_steps=12, train__save_every=4, train__eval_every=2, train__lr=1e-3,
    train__warmup_steps=2, model__dropout=0.1,
)  # fmt: skip


@pytest.fixture(scope="module")
def base(prepared_remi, tmp_path_factory) -> Path:
    """A trained tiny model's release directory (20 steps on the fixtures)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(run_config(prepared_remi, run_dir, train__max_steps=20))
    return run_dir / "release"


def test_init_from_starts_from_exactly_the_given_weights(prepared_remi, base, tmp_path):
    """Step-0 logits equal the base model's, and the architecture is the base's even when the
    run's config says otherwise."""
    cfg = run_config(
        prepared_remi, tmp_path / "run", train__init_from=base, model__d_model=48,
        model__heads="{next_token: 1.0}",
    )  # fmt: skip
    run = setup(cfg)
    model = run.accelerator.unwrap_model(run.model).eval()
    reference = PolyphonyGPT.from_pretrained(base)
    assert model.config.d_model == reference.config.d_model == 32
    assert run.heads == list(reference.config.heads) and len(run.heads) == 2
    batch = next(iter(torch.utils.data.DataLoader(
        WindowDataset(prepared_remi, "validation", 64, augment=False), batch_size=2
    )))  # fmt: skip
    with torch.no_grad():
        mine, theirs = model(**batch).logits, reference(**batch).logits
    assert torch.equal(mine["next_token"], theirs["next_token"])
    assert run.run_info["init_from"] == str(base)


def test_a_dataset_with_another_vocabulary_is_refused_in_one_line(
    prepared_cpword, base, tmp_path, capsys
):
    from tests.test_training import train_py_main

    code = train_py_main()(
        ["--config", TINY, *overrides(prepared_cpword, tmp_path / "run"), f"--init-from={base}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(base) in err and "--tokenizer" in err
    with pytest.raises(InitError, match="cannot read config.json"):
        train(run_config(prepared_cpword, tmp_path / "run2", train__init_from=tmp_path))


def test_sigkilled_fine_tune_resumes_to_the_uninterrupted_run(prepared_remi, base, tmp_path):
    settings = {**SETTINGS, "train__init_from": base}
    train(run_config(prepared_remi, tmp_path / "whole", **settings))

    run_dir = tmp_path / "killed"
    train_args = [
        "--config", TINY, f"--init-from={base}", *overrides(prepared_remi, run_dir, **SETTINGS)
    ]  # fmt: skip
    kill_after_checkpoint(train_args, run_dir, 4)

    train(run_config(prepared_remi, run_dir, **settings))
    whole, resumed = losses(tmp_path / "whole"), losses(run_dir)
    assert len(whole) == len(resumed) == 12
    assert max(abs(a - b) for a, b in zip(whole, resumed, strict=True)) <= 1e-6
    assert max_weight_difference(weights(tmp_path / "whole"), weights(run_dir)) <= 1e-6


def test_early_stopping_exports_the_best_step(prepared_remi, base, tmp_path):
    """With lr 0 validation never improves on its first value: the run stops after `patience`
    more evaluations and exports the step of that first one, whose checkpoint it kept."""
    run_dir = tmp_path / "run"
    settings = {**SETTINGS, "train__lr": 0.0, "train__min_lr": 0.0, "model__dropout": 0.0}
    cfg = run_config(prepared_remi, run_dir, train__init_from=base, train__patience=2, **settings)
    progress = train(cfg)
    assert (progress.step, progress.best_step, progress.evals_since_best) == (6, 2, 2)
    training = json.loads((run_dir / "release" / "training.json").read_text())
    assert training["steps"] == 2
    # Resuming a run that stopped early does not train on.
    assert train(cfg).step == 6


def test_finetune_command_prepares_trains_and_exports_a_model_that_generates(
    fixture_midi_dir, base, tmp_path, capsys
):
    out = tmp_path / "mine"
    argv = [
        str(fixture_midi_dir / "band"), "--from", str(base), "--out", str(out), "--no-progress",
        "--config", TINY, "--data.validation_fraction=0.15", "--data.test_fraction=0",
        "--data.min_validation_pieces=2", "--model.max_seq_len=64", "--train.batch_size=4",
        "--train.max_steps=8", "--train.eval_every=4", "--train.eval_batches=2",
        "--train.save_every=4", "--train.trackers=[csv]", "--train.patience=3",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    files = len(list((fixture_midi_dir / "band").glob("*.mid")))
    assert f"{files} found: {files} used, 0 skipped" in printed
    assert "validation 2" in printed and "NLL/note" in printed
    assert str(out / "release") in printed
    # The densities of instruments these files lack are the base model's.
    tuned, original = DensityStats.load(out / "release"), DensityStats.load(base)
    assert set(original.instruments) <= set(tuned.instruments)
    score = generate([0, 33], bars=2, checkpoint=out / "release", seed=0)
    assert {t.program for t in score.tracks} == {0, 33}


def test_finetune_refuses_a_folder_too_small_to_validate(fixture_midi_dir, base, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.mid").write_bytes(next((fixture_midi_dir / "band").glob("*.mid")).read_bytes())
    with pytest.raises(DatasetError, match="at least 2"):
        finetune(one, base, tmp_path / "out", TINY, ["--model.max_seq_len=64"], progress=False)
