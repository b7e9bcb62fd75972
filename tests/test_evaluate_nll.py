"""Model-side evaluation: validation NLL per head, and preparing data with a model's vocabulary."""

import math

import pytest
import torch

from polyphony.config import DataConfig, load_config
from polyphony.data.dataset import WindowDataset, tokenizer_of
from polyphony.data.prepare import prepare_dataset
from polyphony.evaluate import main as evaluate_main
from polyphony.evaluate import validation_nll
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
    return directory


def test_validation_nll_matches_a_direct_forward(tiny_checkpoint, prepared_remi):
    result = validation_nll(tiny_checkpoint, prepared_remi, batch_size=3)
    model = PolyphonyGPT.from_pretrained(tiny_checkpoint).eval()
    dataset = WindowDataset(prepared_remi, "validation", model.config.max_seq_len, augment=False)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
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
    tokenizer = PolyTokenizer.load(tiny_checkpoint)
    assert result["notes"] == int(tokenizer.note_mask(batch["labels"].numpy()).sum()) > 0
    assert set(result["heads"]) == {"next_token", "next_instrument", "next_type"}


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
