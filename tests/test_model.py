"""The GPT: causality, cached decoding, track embeddings, multi-task learning, files, sizes."""

from __future__ import annotations

import copy
import pickle
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from symusic import Score

from polyphony.config import CPWORD_FIELDS, ModelConfig, load_config
from polyphony.generation import compile_decoder
from polyphony.model import NAMED_SIZES, CheckpointError, PolyphonyGPT
from polyphony.tokenizer import PolyTokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = {kind: PolyTokenizer.build(kind) for kind in ("remi", "cpword")}


def tiny_config(kind: str = "remi", **overrides) -> ModelConfig:
    tok = TOKENIZERS[kind]
    if kind == "remi":
        heads = {"next_token": 1.0, "next_instrument": 0.5, "next_type": 0.25}
    else:
        heads = {name: 1.0 for name in CPWORD_FIELDS} | {"next_instrument": 0.5}
    values = dict(
        tokenization=kind, n_layers=2, d_model=64, n_heads=4, max_seq_len=64, heads=heads,
        vocab_sizes=list(tok.vocab_sizes), token_types=list(tok.token_types),
        n_token_types=tok.n_token_types,
    )  # fmt: skip
    return ModelConfig(**(values | overrides))


def tiny_model(kind: str = "remi", seed: int = 0, **overrides) -> PolyphonyGPT:
    torch.manual_seed(seed)
    return PolyphonyGPT(tiny_config(kind, **overrides)).eval()


def random_batch(kind: str, batch: int, length: int, seed: int = 0):
    """Random in-vocabulary ids [B, T] / [B, T, 8] and track ids [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    sizes = TOKENIZERS[kind].vocab_sizes
    if kind == "remi":
        ids = torch.randint(0, sizes[0], (batch, length), generator=gen)
    else:
        ids = torch.stack([torch.randint(0, v, (batch, length), generator=gen) for v in sizes], -1)
    return ids, torch.randint(0, 130, (batch, length), generator=gen)


def real_batch(kind: str, midi_dir: Path, window: int = 128):
    """A batch of two windows of real music, the first ``window`` + 1 tokens of one piece from
    each source folder (a multi-track band file with drums, a music21 export)."""
    tok = TOKENIZERS[kind]
    pieces = []
    for source in sorted(p for p in midi_dir.iterdir() if p.is_dir()):
        encoded = (tok.encode(Score(path)) for path in sorted(source.rglob("*.mid")))
        pieces.append(next(piece for piece in encoded if len(piece) > window))
    assert len(pieces) == 2, f"{midi_dir}: expected two source folders (band, music21)"
    inputs, tracks, labels, label_tracks = [], [], [], []
    for piece in pieces:
        ids, track_ids = piece.ids[: window + 1], piece.track_ids[: window + 1]
        y, y_tracks = tok.labels_for(ids, track_ids)
        inputs.append(ids[:-1])
        tracks.append(track_ids[:-1])
        labels.append(y)
        label_tracks.append(y_tracks)
    return [torch.from_numpy(np.stack(a)) for a in (inputs, tracks, labels, label_tracks)]


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_future_tokens_never_change_past_logits(kind):
    model = tiny_model(kind)
    ids, tracks = random_batch(kind, 2, 24)
    t = 10
    changed_ids, changed_tracks = random_batch(kind, 2, 24, seed=1)
    ids2, tracks2 = ids.clone(), tracks.clone()
    ids2[:, t + 1 :], tracks2[:, t + 1 :] = changed_ids[:, t + 1 :], changed_tracks[:, t + 1 :]
    labels = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)  # any in-vocabulary labels
    for with_labels in (False, True):
        kwargs = dict(labels=labels, label_track_ids=tracks) if with_labels else {}
        before = model(ids, tracks, **kwargs).logits
        after = model(ids2, tracks2, **kwargs).logits
        assert set(before) == set(model.heads)
        for name in before:
            torch.testing.assert_close(
                after[name][:, : t + 1], before[name][:, : t + 1], rtol=0, atol=1e-6
            )
            # ...while the changed positions do see the change (so the check above means something).
            assert (after[name][:, t + 1 :] - before[name][:, t + 1 :]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- KV cache
def _full_forward_logits(model, ids, tracks):
    """Per-row logits and hidden of a plain forward over each row alone."""
    out = model(ids.unsqueeze(0), tracks.unsqueeze(0))
    logits = {name: value[0] for name, value in out.logits.items()}
    return logits, out.hidden[0]


@pytest.mark.parametrize(
    "kind, n_kv_heads",
    [("remi", None), ("remi", 2), ("cpword", 2)],
    ids=["remi", "remi-gqa", "cpword-gqa"],
)
@pytest.mark.parametrize(
    "prompt_lengths", [[9], [9, 9, 9], [5, 9, 3]], ids=["batch-1", "equal-rows", "ragged"]
)
def test_cached_decode_matches_full_forward(kind, n_kv_heads, prompt_lengths):
    # max_seq_len=16 < 9 + 12 positions: rotary positions let decoding run past it. One row and
    # rows of one length attend to the whole cache; ragged rows mask their padding slots.
    model = tiny_model(kind, n_kv_heads=n_kv_heads, max_seq_len=16)
    prompt_lengths = torch.tensor(prompt_lengths)
    batch, n_new = len(prompt_lengths), 12
    ids, tracks = random_batch(kind, batch, 9 + n_new, seed=2)
    # Right-padded prompt batch; the padding is junk that must never be attended to.
    prompt_ids, prompt_tracks = random_batch(kind, batch, 9, seed=3)
    for row, length in enumerate(prompt_lengths.tolist()):
        prompt_ids[row, :length], prompt_tracks[row, :length] = (
            ids[row, :length],
            tracks[row, :length],
        )
    full = [_full_forward_logits(model, ids[row], tracks[row]) for row in range(batch)]

    model.setup_cache(batch_size=batch, max_len=9 + n_new)
    out = model.prefill(prompt_ids, prompt_tracks, prompt_lengths)
    positions = prompt_lengths.clone()
    rows = torch.arange(batch)
    max_diff = 0.0
    for step in range(n_new + 1):
        expected_keys = ("family", "next_instrument") if kind == "cpword" else tuple(model.heads)
        assert set(out.logits) == set(expected_keys)
        logits = dict(out.logits)
        if kind == "cpword":  # the fields come from field_logits on the cached hidden state
            logits.update(model.field_logits(out.hidden, out.logits["family"].argmax(-1)))
        for row in rows.tolist():
            at = positions[row] - 1
            full_logits, full_hidden = full[row]
            max_diff = max(max_diff, (out.hidden[row] - full_hidden[at]).abs().max().item())
            for name, value in logits.items():
                max_diff = max(max_diff, (value[row] - full_logits[name][at]).abs().max().item())
        if step < n_new:
            out = model.decode_step(ids[rows, positions], tracks[rows, positions])
            positions += 1
    assert max_diff <= 1e-5


def test_compiled_decode_step_matches_eager_and_never_recompiles():
    # compile_decoder keeps only tensor guards. After a request's first step (which may trace
    # for a new cache length) no step may trace again (a recompile raises), and every step must
    # give the eager step's logits: ragged rows and rows of one length, whatever heads are
    # asked for, and a larger cache whose positions run past the first one's.
    eager = tiny_model(max_seq_len=16)
    compiled = copy.deepcopy(eager)
    compile_decoder(compiled)
    ids, tracks = random_batch("remi", 2, 40, seed=4)
    heads_cycle = (None, ("next_token",), ("next_type", "next_instrument"))
    for lengths, cache in (([5, 3], 14), ([5, 5], 14), ([5, 2], 40)):
        lengths = torch.tensor(lengths)
        for model in (eager, compiled):
            model.setup_cache(batch_size=2, max_len=cache)
        outs = [model.prefill(ids[:, :5], tracks[:, :5], lengths) for model in (eager, compiled)]
        positions, rows = lengths.clone(), torch.arange(2)
        for step in range(cache - 5):
            assert set(outs[1].logits) == set(outs[0].logits)
            for name in outs[0].logits:
                torch.testing.assert_close(outs[1].logits[name], outs[0].logits[name])
            inputs = (ids[rows, positions], tracks[rows, positions])
            strict = torch._dynamo.config.patch(error_on_recompile=True)
            with strict if step > 0 else nullcontext():
                outs = [
                    model.decode_step(*inputs, heads=heads_cycle[step % 3])
                    for model in (eager, compiled)
                ]
            positions += 1
    assert compiled._decoder_compiled


def test_two_compiled_models_of_one_shape_each_run_their_own_weights():
    # Each compiled graph holds its model's weights frozen in, and torch.compile gives every
    # compiled decoder one cache: a second model of the same shape must trace its own graphs,
    # and the cache must make room for them (Dynamo's cap, lowered here to what one model
    # uses: batch 1 and batch 2 graphs).
    ids, tracks = random_batch("remi", 2, 6, seed=5)
    with torch._dynamo.config.patch(recompile_limit=2):
        for seed in (1, 2):
            eager = tiny_model(seed=seed)
            compiled = copy.deepcopy(eager)
            compile_decoder(compiled)
            for rows in (1, 2):
                steps = []
                for model in (eager, compiled):
                    model.setup_cache(batch_size=rows, max_len=8)
                    model.prefill(ids[:rows, :5], tracks[:rows, :5], torch.tensor([5] * rows))
                    step = model.decode_step(ids[:rows, 5], tracks[:rows, 5])
                    steps.append(step.logits["next_token"])
                torch.testing.assert_close(steps[1], steps[0])


def test_each_batch_size_runs_the_graph_traced_for_it():
    # A graph traced for several rows must not take a one-row step: with the batch dimension
    # symbolic, the tensor guards compile_decoder keeps accepted one, and in any process that had
    # decoded a batch the shipped model's batch 1 ran at 896-1,137 tokens/s instead of ~1,500
    # (benchmarks/generate.py, docs/benchmarks.md "Where the ratios stand").
    from torch._dynamo.utils import counters

    ids, tracks = random_batch("remi", 2, 6, seed=6)
    eager = tiny_model(seed=3)
    compiled = copy.deepcopy(eager)
    compile_decoder(compiled)
    before = counters["stats"]["unique_graphs"]
    for rows in (2, 1, 2, 1):
        steps = []
        for model in (eager, compiled):
            model.setup_cache(batch_size=rows, max_len=8)
            model.prefill(ids[:rows, :5], tracks[:rows, :5], torch.tensor([5] * rows))
            steps.append(model.decode_step(ids[:rows, 5], tracks[:rows, 5]).logits["next_token"])
        torch.testing.assert_close(steps[1], steps[0])
    assert counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.parametrize("kind, head", [("remi", "next_token"), ("cpword", "family")])
def test_cached_steps_compute_only_the_heads_asked_for(kind, head):
    model = tiny_model(kind)
    ids, tracks = random_batch(kind, 2, 6)
    model.setup_cache(batch_size=2, max_len=8)
    everything = model.prefill(ids, tracks, torch.tensor([6, 4]))
    only = model.prefill(ids, tracks, torch.tensor([6, 4]), heads=(head,))
    assert set(only.logits) == {head}
    torch.testing.assert_close(only.logits[head], everything.logits[head], rtol=0, atol=0)
    step = model.decode_step(ids[:, 0], tracks[:, 0], heads=(head,))
    assert set(step.logits) == {head}


def test_decode_beyond_cache_size_is_refused():
    model = tiny_model()
    ids, tracks = random_batch("remi", 1, 4)
    model.setup_cache(batch_size=1, max_len=5)
    model.prefill(ids, tracks, torch.tensor([4]))
    model.decode_step(ids[:, 0], tracks[:, 0])
    with pytest.raises(RuntimeError, match="KV cache full"):
        model.decode_step(ids[:, 0], tracks[:, 0])


# ----------------------------------------------------------------------------- track embeddings
@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_track_embedding_is_used_only_when_enabled(kind):
    ids, tracks = random_batch(kind, 2, 16)
    permuted = tracks[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(permuted, tracks)
    with_tracks = tiny_model(kind)
    a, b = with_tracks(ids, tracks).logits, with_tracks(ids, permuted).logits
    assert all((a[name] - b[name]).abs().max() > 1e-3 for name in a)

    without = tiny_model(kind, track_embeddings=False)
    a, b = without(ids, tracks).logits, without(ids, permuted).logits
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert without.num_parameters() == with_tracks.num_parameters() - 130 * 64


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_every_head_learns_one_real_batch(kind, fixture_midi_dir):
    inputs, tracks, labels, label_tracks = real_batch(kind, fixture_midi_dir)
    label_columns = labels.unbind(-1) if kind == "cpword" else (labels,)
    assert all((column != -100).any() for column in label_columns), "a head has nothing to learn"
    model = tiny_model(kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(200):
        out = model(inputs, tracks, labels, label_tracks)
        first = first or {name: value.item() for name, value in out.losses.items()}
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    last = {name: value.item() for name, value in out.losses.items()}
    weighted = sum(model.config.heads[name] * out.losses[name] for name in model.config.heads)
    torch.testing.assert_close(out.loss, weighted)
    assert set(last) == set(model.config.heads)
    for name in last:
        assert np.isfinite(first[name]) and np.isfinite(last[name])
        assert last[name] < 0.5 * first[name], f"{name}: {first[name]:.3f} -> {last[name]:.3f}"
    if kind == "remi":
        assert last["next_token"] < 0.1


def test_dropout_is_reproducible_from_the_torch_seed():
    model = tiny_model(dropout=0.2).train()
    ids, tracks = random_batch("remi", 2, 16)
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(model(ids, tracks, ids, tracks).loss.item())
    assert losses[0] == losses[1] != losses[2]


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_save_load_round_trip_is_bit_exact(tmp_path, kind):
    model = tiny_model(kind, seed=3)
    model.save_pretrained(tmp_path, tokenizer=TOKENIZERS[kind])
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = PolyphonyGPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    if kind == "remi":  # the tie survives: one tensor, not two equal copies
        assert loaded.heads["next_token"].weight is loaded.token_embeddings[0].weight
    ids, tracks = random_batch(kind, 2, 12)
    a, b = model(ids, tracks).logits, loaded(ids, tracks).logits
    assert all(torch.equal(a[name], b[name]) for name in a)


def _corrupt(directory: Path, how: str) -> Path:
    weights = directory / "model.safetensors"
    if how == "missing":
        weights.unlink()
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "pickle":
        weights.write_bytes(pickle.dumps({"next_token": [0.0] * 64}))
    elif how == "config-not-json":
        (directory / "config.json").write_text("{not json")
        return directory / "config.json"
    elif how == "config-unknown-key":
        (directory / "config.json").write_text('{"d_model": 64, "n_layerz": 2}')
        return directory / "config.json"
    return weights


@pytest.mark.parametrize(
    "how", ["missing", "empty", "truncated", "pickle", "config-not-json", "config-unknown-key"]
)
def test_broken_checkpoint_fails_with_one_line_naming_the_file(tmp_path, how):
    tiny_model().save_pretrained(tmp_path)
    bad_file = _corrupt(tmp_path, how)
    with pytest.raises(CheckpointError) as caught:
        PolyphonyGPT.from_pretrained(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(bad_file) in message


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", list(NAMED_SIZES))
def test_named_sizes_match_their_stated_parameter_counts(name):
    config = load_config(REPO / "configs" / f"{name}.yaml").model
    tok = TOKENIZERS[config.tokenization]
    config.vocab_sizes, config.token_types = list(tok.vocab_sizes), list(tok.token_types)
    config.n_token_types = tok.n_token_types
    with torch.device("meta"):  # count without allocating 300M parameters
        count = PolyphonyGPT(config).num_parameters()
    stated = NAMED_SIZES[name]
    if name == "tiny":
        assert count < stated
    else:
        assert abs(count - stated) <= 0.1 * stated, f"{name}: {count:,} vs {stated:,}"
