"""Model-side evaluation: validation NLL per head, generating and measuring a model's pieces,
and preparing data with a model's vocabulary."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from symusic import Score

from polyphony.config import DataConfig, load_config
from polyphony.data.dataset import WindowDataset, tokenizer_of
from polyphony.data.prepare import prepare_dataset
from polyphony.densities import DENSITY_FILE, DensityStats
from polyphony.evaluate import (
    REQUEST_POOL,
    evaluate_model,
    random_request,
    split_requests,
    validation_nll,
)
from polyphony.evaluate import main as evaluate_main
from polyphony.instruments import DRUMS
from polyphony.metrics import read_request
from polyphony.model import PolyphonyGPT
from polyphony.tokenizer import PolyTokenizer


@pytest.fixture(scope="module")
def tiny_checkpoint(prepared_remi, tmp_path_factory):
    tokenizer = tokenizer_of(prepared_remi)
    cfg = load_config("configs/tiny.yaml").model
    cfg.vocab_sizes = tokenizer.vocab_sizes
    cfg.token_types = tokenizer.token_types
    cfg.n_token_types = tokenizer.n_token_types
    cfg.heads = {"next_token": 1.0, "next_instrument": 0.5, "next_type": 0.25}
    torch.manual_seed(0)
    model = PolyphonyGPT(cfg)
    directory = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(directory, tokenizer=tokenizer)
    train = WindowDataset(prepared_remi, "train", cfg.max_seq_len)
    stats = DensityStats.of_pieces(tokenizer, train.whole_pieces())
    (directory / DENSITY_FILE).write_text(stats.to_json())
    return directory


def test_validation_nll_matches_a_direct_forward(tiny_checkpoint, prepared_remi):
    result = validation_nll(tiny_checkpoint, prepared_remi, batch_size=3)
    model = PolyphonyGPT.from_pretrained(tiny_checkpoint).eval()
    dataset = WindowDataset(prepared_remi, "validation", model.config.max_seq_len, augment=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    # Only the body is scored: a target at or before the header's SEP is the request, given.
    tokenizer = PolyTokenizer.load(tiny_checkpoint)
    for row in range(len(batch["labels"])):
        sep = batch["input_ids"][row].tolist().index(tokenizer.sep_id)
        batch["labels"][row, :sep] = -100
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["track_ids"]).logits["next_token"]
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    row = result["heads"]["next_token"]
    assert result["windows"] == len(dataset)
    assert row["targets"] == int((batch["labels"] != -100).sum())
    assert row["nll"] == pytest.approx(float(expected), rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    # An untrained model is near uniform over the vocabulary.
    assert abs(row["nll"] - math.log(model.config.vocab_sizes[0])) < 1.0
    assert result["notes"] == int(tokenizer.note_mask(batch["labels"].numpy()).sum()) > 0
    assert set(result["heads"]) == {"next_token", "next_instrument", "next_type"}
    # The stream's likelihood is REMI's next_token head alone, per note.
    assert result["stream_nll_per_note"] == pytest.approx(row["nll_per_note"], rel=1e-9)
    assert row["nll_per_note"] == pytest.approx(row["nll"] * row["targets"] / result["notes"])
    # The breakdown by the kind of token predicted adds up to the head, and counts each target
    # under its own kind.
    by_kind = result["by_kind"]
    assert sum(k["nll_per_note"] for k in by_kind.values()) == pytest.approx(row["nll_per_note"])
    assert sum(k["targets"] for k in by_kind.values()) == row["targets"]
    targets = batch["labels"][batch["labels"] != -100].tolist()
    pitches = sum(tokenizer.token_name(t).startswith("Pitch_") for t in targets)
    assert by_kind["Pitch"]["targets"] == pitches > 0


def test_nll_refuses_a_dataset_with_another_vocabulary(tiny_checkpoint, prepared_cpword, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--nll", str(tiny_checkpoint), "--dataset", str(prepared_cpword)])
    assert exit_info.value.code != 0
    assert "another tokenizer" in capsys.readouterr().err


def test_prepare_can_use_a_models_tokenizer(fixture_midi_dir, tiny_checkpoint, tmp_path):
    summary_tokenizer = PolyTokenizer.load(tiny_checkpoint)
    # the data config asks for cpword, the given tokenizer (REMI) wins
    prepare_dataset(
        fixture_midi_dir,
        tmp_path / "data",
        DataConfig(tokenization="cpword", validation_fraction=0.2, test_fraction=0.1),
        workers=0,
        progress=False,
        tokenizer=summary_tokenizer,
    )
    assert tokenizer_of(tmp_path / "data").hash == summary_tokenizer.hash


def test_cpword_stream_nll_sums_the_field_heads_not_the_auxiliary_one(prepared_cpword, tmp_path):
    tokenizer = tokenizer_of(prepared_cpword)
    cfg = load_config("configs/tiny.yaml", ["--data.tokenization=cpword"]).model
    cfg.vocab_sizes = tokenizer.vocab_sizes
    cfg.token_types = tokenizer.token_types
    cfg.n_token_types = tokenizer.n_token_types
    torch.manual_seed(0)
    PolyphonyGPT(cfg).save_pretrained(tmp_path, tokenizer=tokenizer)
    result = validation_nll(tmp_path, prepared_cpword, batch_size=4)
    fields = [h for h in result["heads"] if h != "next_instrument"]
    assert "next_instrument" in result["heads"] and len(fields) == 8
    expected = sum(result["heads"][h]["nll_per_note"] for h in fields)
    assert result["stream_nll_per_note"] == pytest.approx(expected, rel=1e-9)
    assert result["stream_nll_per_note"] > result["heads"]["pitch"]["nll_per_note"] > 0


@given(st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_random_requests_are_small_sorted_sets_of_pool_instruments(seed):
    request = random_request(random.Random(seed))
    assert request == sorted(set(request))
    assert 1 <= len(request) <= 4
    assert set(request) <= set(REQUEST_POOL) | {DRUMS}


def test_evaluate_model_generates_the_requests_and_compares_with_validation(
    tiny_checkpoint, prepared_remi, fixture_midi_dir, tmp_path
):
    sampling = {"temperature": 0.9}
    report = evaluate_model(tiny_checkpoint, prepared_remi, fixture_midi_dir, tmp_path,
                            pieces=3, bars=1, seed=5, requests="validation", sampling=sampling)  # fmt: skip
    real_sets = split_requests(prepared_remi)
    assert real_sets and all(s == sorted(s) for s in real_sets)
    generated = sorted((tmp_path / "generated").glob("*.mid"))
    assert len(generated) == 3
    for index, path in enumerate(generated):
        assert read_request(Score(path)) == real_sets[index % len(real_sets)]
    # The constraints hold even for an untrained model.
    assert report["generated"]["fidelity"]["micro"] == {"precision": 1.0, "recall": 1.0}
    assert report["reference"]["n_pieces"] == len(real_sets)
    assert (
        report["protocol"]["sampling"] == sampling
        and report["protocol"]["requests"] == "validation"
    )
    assert set(report["gap_percent"]) >= {"pitch_class_entropy", "scale_consistency"}
    with pytest.raises(ValueError, match="random"):
        evaluate_model(tiny_checkpoint, prepared_remi, fixture_midi_dir, tmp_path, requests="all")
