"""Generation: the instrument contract, arrangement, continuation, determinism, the KV cache,
the grammar, the token budget, and the CLI's error messages.

The models are tiny (configs/tiny.yaml's shape) and trained for a few dozen steps on the fixture
corpus in a plain torch loop, so they write something music-like but far from good: the
constraints, not the model, must make every output valid. Their context is cut to
``CONTEXT`` tokens so that pieces of a few bars already overflow it and the cache is refilled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from symusic import Note, Score, TimeSignature, Track
from torch.utils.data import DataLoader

from polyphony.config import CPWORD_FIELDS, load_config
from polyphony.data.dataset import WindowDataset, tokenizer_of
from polyphony.densities import DENSITY_FILE, DensityStats
from polyphony.generation import (
    GenerationError,
    RemiGrammar,
    RowState,
    Sampling,
    bar_line_ends_piece,
    generate,
    grammar_for,
    grammar_violations,
    load_checkpoint,
    make_plan,
    resolve_instruments,
    sample_tokens,
    to_score,
    validate_score,
    write_midi,
)
from polyphony.generation.common import AHEAD_SCALE, RECALL_BARS
from polyphony.generation.decode import _after_prompt, _windows
from polyphony.generation.infill import infill_ids, plan_infill
from polyphony.generation.output import _end_at_bar_line
from polyphony.generation.plan import register_tables
from polyphony.instruments import DRUMS, GLOBAL_TRACK, instrument_name, program_to_instrument
from polyphony.metrics import instrument_fidelity, piece_bar_lines, read_request
from polyphony.model import PolyphonyGPT
from polyphony.render import RenderError, find_soundfont, plot_piano_roll, render_wav
from polyphony.tokenizer import DecodeError, PolyTokenizer, density_bin

REPO = Path(__file__).resolve().parents[1]
KINDS = ("remi", "cpword")
CONTEXT = 128  # model context: a few bars of several instruments overflow it
TRAIN_STEPS = 40
ADDABLE = (DRUMS, 48, 73, 56)  # strings, flute, trumpet: instruments to arrange onto a piece
# Density statistics for plans made without a trained model: every part's median is 4 per bar.
FLAT = DensityStats.measure({0: [2.0, 4.0, 6.0]})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps of a tiny model are too small to parallelise; on a shared 2-core machine
    extra threads only spin. Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_model(dataset_dir: Path, out_dir: Path) -> float:
    """configs/tiny.yaml's model, TRAIN_STEPS AdamW steps on the train split, saved with its
    tokenizer; returns the loss drop (first - last)."""
    tokenizer = tokenizer_of(dataset_dir)
    shape = load_config(REPO / "configs" / "tiny.yaml").model
    heads = shape.heads if tokenizer.kind == "remi" else {f: 1.0 for f in CPWORD_FIELDS}
    config = dataclasses.replace(
        shape, tokenization=tokenizer.kind, max_seq_len=CONTEXT, heads=heads,
        vocab_sizes=list(tokenizer.vocab_sizes), token_types=list(tokenizer.token_types),
        n_token_types=tokenizer.n_token_types,
    )  # fmt: skip
    torch.manual_seed(0)
    model = PolyphonyGPT(config).train()
    windows = WindowDataset(dataset_dir, "train", CONTEXT, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    batches = itertools.cycle(DataLoader(windows, batch_size=8))
    for batch in itertools.islice(batches, TRAIN_STEPS):
        out = model(
            batch["input_ids"], batch["track_ids"], batch["labels"], batch["label_track_ids"]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    model.eval().save_pretrained(out_dir, tokenizer)
    stats = DensityStats.of_pieces(tokenizer, windows.whole_pieces())
    (out_dir / DENSITY_FILE).write_text(stats.to_json())
    return losses[0] - losses[-1]


@pytest.fixture(scope="module")
def checkpoint_dirs(prepared_remi, prepared_cpword, tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for kind, dataset in zip(KINDS, (prepared_remi, prepared_cpword), strict=True):
        dirs[kind] = tmp_path_factory.mktemp(f"tiny_{kind}")
        assert train_tiny_model(dataset, dirs[kind]) > 0, f"the {kind} model did not learn"
    return dirs


@pytest.fixture(scope="module")
def checkpoints(checkpoint_dirs):
    return {kind: load_checkpoint(path, "cpu") for kind, path in checkpoint_dirs.items()}


@pytest.fixture(scope="module")
def small_piece(fixture_midi_dir) -> Score:
    """The first 4 bars of a real fixture in one meter, with 1..3 instruments playing in them
    and something left to add (arrangement and continuation prompts)."""
    for path in sorted(fixture_midi_dir.rglob("*.mid")):
        score = Score(str(path))
        if len(score.time_signatures) != 1:
            continue
        (ts,) = score.time_signatures
        bar = score.ticks_per_quarter * 4 * ts.numerator // ts.denominator
        piece = score.clip(0, 4 * bar)
        piece.tracks = [t for t in piece.tracks if t.notes]
        instruments = {program_to_instrument(t.program, t.is_drum) for t in piece.tracks}
        if 1 <= len(instruments) <= 3 and len(set(ADDABLE) - instruments) >= 2:
            return piece
    pytest.fail("no fixture in one meter with 1-3 instruments in its first 4 bars")


def bar_count(tokenizer: PolyTokenizer, ids: np.ndarray) -> int:
    if tokenizer.kind == "remi":
        return int((ids == tokenizer.miditok.vocab["Bar_None"]).sum())
    bar = tokenizer.miditok.vocab[CPWORD_FIELDS.index("position")]["Bar_None"]
    return int(((ids[:, 0] == tokenizer.family_metric_id) & (ids[:, 1] == bar)).sum())


def notes_of(score: Score) -> dict[int, list[tuple[int, ...]]]:
    """instrument -> sorted (time, duration, pitch, velocity) of its notes."""
    table = {}
    for track in score.tracks:
        n = track.notes.numpy()
        rows = zip(
            *(n[k].astype(int).tolist() for k in ("time", "duration", "pitch", "velocity")),
            strict=True,
        )
        table[program_to_instrument(track.program, track.is_drum)] = sorted(rows)
    return table


def quantised(tokenizer: PolyTokenizer, score: Score) -> Score:
    """What the tokenizer keeps of a score (the documented quantisation)."""
    return tokenizer.decode(tokenizer.encode(score).ids)


# ----------------------------------------------------------------------------- the contract
instrument_lists = st.lists(
    st.one_of(st.just(DRUMS), st.integers(0, 127)), min_size=1, max_size=8, unique=True
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=50, deadline=None)
@given(
    instruments=instrument_lists,
    bars=st.integers(1, 2),
    tight_budget=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tracks_are_exactly_the_requested_instruments(
    checkpoints, tmp_path_factory, kind, instruments, bars, tight_budget, seed
):
    """Whatever the list, and also when the token budget forces the missing instruments in."""
    checkpoint = checkpoints[kind]
    cost = RemiGrammar.NOTE_COST if kind == "remi" else 1
    budget = cost * len(instruments) + 24 if tight_budget else None
    plan = make_plan(
        checkpoint.tokenizer,
        checkpoint.densities,
        instruments=instruments,
        bars=bars,
        max_tokens=budget,
    )
    (ids,) = sample_tokens(checkpoint, plan, Sampling(), seed=seed)
    assert grammar_violations(checkpoint.tokenizer, ids) == []
    path = write_midi(
        to_score(checkpoint.tokenizer, ids, plan), tmp_path_factory.getbasetemp() / f"{kind}.mid"
    )

    written = Score(str(path))  # strict parsing
    assert [program_to_instrument(t.program, t.is_drum) for t in written.tracks] == instruments
    assert [t.name for t in written.tracks] == [instrument_name(i) for i in instruments]
    assert all(t.notes for t in written.tracks)
    assert read_request(written) == instruments
    fidelity = instrument_fidelity(written)
    assert fidelity["precision"] == fidelity["recall"] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_tight_token_budget_still_plays_every_instrument(checkpoints, kind):
    """Close to the cap, Programs of the missing instruments are forced (docs/generation.md)."""
    checkpoint = checkpoints[kind]
    instruments = [0, 24, 33, 40, 56, 65, 73, DRUMS]
    cost = RemiGrammar.NOTE_COST if kind == "remi" else 1
    budget = cost * len(instruments) + 8
    plan = make_plan(
        checkpoint.tokenizer,
        checkpoint.densities,
        instruments=instruments,
        bars=8,
        max_tokens=budget,
    )
    for ids in sample_tokens(checkpoint, plan, Sampling(), num_samples=3, seed=1):
        assert len(ids) - len(plan.header) <= budget
        assert grammar_violations(checkpoint.tokenizer, ids) == []
        score = to_score(checkpoint.tokenizer, ids, plan)
        assert instrument_fidelity(score)["recall"] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_have_the_requested_bars_meter_and_tempo(checkpoints, kind):
    checkpoint = checkpoints[kind]
    plan = make_plan(
        checkpoint.tokenizer,
        checkpoint.densities,
        instruments="bass, drums",
        bars=3,
        tempo=90,
        time_signature="3/4",
    )
    for ids in sample_tokens(checkpoint, plan, Sampling(), num_samples=2, seed=2):
        assert bar_count(checkpoint.tokenizer, ids) == 3
        score = to_score(checkpoint.tokenizer, ids, plan)
        assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(3, 4)]
        assert score.tempos and all(abs(t.qpm - 90) < 4 for t in score.tempos)
        # Nothing rings past the third bar line.
        last_end = max(n.end for t in score.tracks for n in t.notes)
        assert last_end <= 3 * 3 * score.ticks_per_quarter


def test_in_the_last_bar_the_bar_lines_probability_goes_to_eos():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.1, 0.2, 0.6, 0.1]]))
    rows = torch.tensor([True, False])
    merged = bar_line_ends_piece(logits, rows, bar_id=2, eos_id=3)
    assert torch.allclose(merged[0].exp(), torch.tensor([0.1, 0.2, 0.6, 0.7]))
    assert torch.equal(merged[1], logits[1])  # rows not in their last bar are untouched
    # With the bar line forbidden (as in the last bar), EOS now gets what the bar line had.
    allowed = torch.tensor([[True, True, False, True]])
    probs = merged[:1].masked_fill(~allowed, float("-inf")).softmax(-1)
    assert torch.allclose(probs, torch.tensor([[0.1, 0.2, 0.0, 0.7]]))


def test_notes_held_past_the_last_bar_line_are_cut_there():
    score = Score(480)
    score.time_signatures = [TimeSignature(0, 3, 4), TimeSignature(1440, 2, 4)]
    track = Track(program=0)
    # a chord held from bar 1 to bar 9, a note inside bar 2, a note starting after bar 2
    track.notes = [Note(0, 20_000, 60, 80), Note(1500, 100, 62, 80), Note(2400, 100, 64, 80)]
    score.tracks = [track]
    _end_at_bar_line(score, n_bars=2)  # 3/4 + 2/4 = 1440 + 960 ticks
    assert [(n.time, n.duration, n.pitch) for n in score.tracks[0].notes] == [
        (0, 2400, 60),
        (1500, 100, 62),
    ]


def test_duplicates_collapse_and_more_than_15_pitched_instruments_are_refused():
    assert resolve_instruments("piano, bass, Acoustic Grand Piano, drums, drum") == [0, 33, DRUMS]
    assert len(resolve_instruments([*range(15), DRUMS])) == 16
    with pytest.raises(GenerationError, match="15"):
        resolve_instruments(list(range(16)))


def test_conflicting_requests_are_refused(small_piece):
    tokenizer = PolyTokenizer.build("remi")
    with pytest.raises(GenerationError, match="exclude"):
        make_plan(tokenizer, FLAT, prompt=small_piece, arrange=small_piece, add="drums")
    with pytest.raises(GenerationError, match="--add"):
        make_plan(tokenizer, FLAT, arrange=small_piece)
    present = tokenizer.instruments_of(small_piece)[0]
    with pytest.raises(GenerationError, match="already in"):
        make_plan(tokenizer, FLAT, arrange=small_piece, add=[present])
    with pytest.raises(GenerationError, match="vocabulary"):
        make_plan(tokenizer, FLAT, instruments="piano", time_signature="11/8")


# ----------------------------------------------------------------------------- the other modes
@pytest.mark.parametrize("kind", KINDS)
def test_arrangement_keeps_every_existing_note_and_adds_parts(checkpoints, small_piece, kind):
    checkpoint = checkpoints[kind]
    existing = notes_of(quantised(checkpoint.tokenizer, small_piece))
    added = [i for i in ADDABLE if i not in existing][:2]
    plan = make_plan(checkpoint.tokenizer, checkpoint.densities, arrange=small_piece, add=added)
    for ids in sample_tokens(checkpoint, plan, Sampling(), num_samples=2, seed=3):
        assert grammar_violations(checkpoint.tokenizer, ids) == []
        output = notes_of(to_score(checkpoint.tokenizer, ids, plan))
        assert list(output) == plan.instruments
        assert set(plan.instruments) == set(existing) | set(added)
        for instrument, notes in existing.items():
            assert output[instrument] == notes, instrument_name(instrument)
        assert all(output[instrument] for instrument in added)


@pytest.mark.parametrize("kind", KINDS)
def test_an_arranged_piece_keeps_its_notes_outside_the_registers(checkpoints, small_piece, kind):
    """Every register narrowed to 40..45: the piece's own notes, chords above it included, are
    kept as they are; the added pitched parts keep to 40..45."""
    checkpoint = checkpoints[kind]
    narrow = {i: (40, 45, 42.0, 2.0) for i in range(128)}
    narrowed = dataclasses.replace(
        checkpoint, densities=dataclasses.replace(checkpoint.densities, registers=narrow)
    )
    existing = notes_of(quantised(checkpoint.tokenizer, small_piece))
    assert any(not 40 <= n[2] <= 45 for i, notes in existing.items() if i != DRUMS for n in notes)
    added = [i for i in ADDABLE if i not in existing][:2]
    plan = make_plan(narrowed.tokenizer, narrowed.densities, arrange=small_piece, add=added)
    for ids in sample_tokens(narrowed, plan, Sampling(), num_samples=2, seed=3):
        output = notes_of(to_score(narrowed.tokenizer, ids, plan))
        for instrument, notes in existing.items():
            assert output[instrument] == notes, instrument_name(instrument)
        for instrument in added:
            assert output[instrument]
            if instrument != DRUMS:
                assert all(40 <= n[2] <= 45 for n in output[instrument])


@pytest.mark.parametrize("kind", KINDS)
def test_infill_rewrites_only_the_region_of_the_chosen_tracks(checkpoints, small_piece, kind):
    """Bars 2-3 of every track, then of one track: outside them every note is the quantised
    piece's, inside them the other tracks keep theirs, and the piece keeps its bars. The tiny
    models' context leaves no room for prefix and suffix: the constraints alone must hold."""
    checkpoint = checkpoints[kind]
    tokenizer = checkpoint.tokenizer
    original = notes_of(quantised(tokenizer, small_piece))
    (ts,) = small_piece.time_signatures
    bar = tokenizer.decode(tokenizer.encode(small_piece).ids).ticks_per_quarter * 4
    bar = bar * ts.numerator // ts.denominator
    n_bars = bar_count(tokenizer, tokenizer.encode(small_piece).ids)
    grammar = grammar_for(tokenizer, "cpu")
    for tracks in (None, list(original)[:1]):
        plan = plan_infill(
            tokenizer, grammar, checkpoint.densities, small_piece, (2, 3), tracks, None, None,
            CONTEXT,
        )  # fmt: skip
        for row in sample_tokens(checkpoint, plan, Sampling(), num_samples=2, seed=5):
            ids = infill_ids(tokenizer, plan, row)
            assert grammar_violations(tokenizer, ids) == []
            assert bar_count(tokenizer, ids) == n_bars
            output = notes_of(to_score(tokenizer, row, plan))
            for instrument, notes in original.items():

                def outside(rows):
                    return [n for n in rows if not bar <= n[0] < 3 * bar]

                assert outside(output.get(instrument, [])) == outside(notes), instrument
                if instrument not in plan.infill.tracks:
                    assert output[instrument] == notes, instrument


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_starts_with_the_quantised_prompt(checkpoints, small_piece, kind):
    checkpoint = checkpoints[kind]
    prompt = quantised(checkpoint.tokenizer, small_piece)
    (ts,) = prompt.time_signatures
    prompt_end = 2 * prompt.ticks_per_quarter * 4 * ts.numerator // ts.denominator  # 2 bars
    expected = {i: [n for n in notes if n[0] < prompt_end] for i, notes in notes_of(prompt).items()}
    assert any(not notes for notes in expected.values()), "want an instrument entering later"
    plan = make_plan(
        checkpoint.tokenizer, checkpoint.densities, prompt=small_piece, prompt_bars=2, bars=2
    )
    for ids in sample_tokens(checkpoint, plan, Sampling(), num_samples=2, seed=4):
        assert grammar_violations(checkpoint.tokenizer, ids) == []
        assert bar_count(checkpoint.tokenizer, ids) == 4
        output = notes_of(to_score(checkpoint.tokenizer, ids, plan))
        assert sorted(output) == sorted(expected)  # the file's instruments, also the late one
        for instrument, notes in expected.items():
            assert [n for n in output[instrument] if n[0] < prompt_end] == notes


def test_continuation_instruments_restrict_and_add(small_piece):
    tokenizer = PolyTokenizer.build("remi")
    in_file = tokenizer.instruments_of(small_piece)
    kept, added = in_file[0], next(i for i in ADDABLE if i not in in_file)
    plan = make_plan(tokenizer, FLAT, prompt=small_piece, prompt_bars=2, instruments=[kept, added])
    assert plan.instruments == plan.required == [kept, added]
    played = set(tokenizer.track_ids(plan.prompt_body).tolist()) - {GLOBAL_TRACK}
    assert played == {kept}


# ----------------------------------------------------------------------------- densities
def bins_of(tokenizer: PolyTokenizer, header: np.ndarray) -> dict[int, int]:
    return tokenizer.header_densities(header)


@pytest.mark.parametrize("kind", KINDS)
def test_requested_densities_reach_the_header(checkpoints, kind):
    """Numbers, levels (the checkpoint's quartiles) and defaults (its medians), per track."""
    checkpoint = checkpoints[kind]
    stats = checkpoint.densities
    plan = make_plan(
        checkpoint.tokenizer, stats, instruments="piano, bass, drums",
        density="bass=4, drums=dense",
    )  # fmt: skip
    assert plan.densities == {0: stats.default(0), 33: 4.0, DRUMS: stats.quartiles(DRUMS)[2]}
    expected = {i: density_bin(v) for i, v in plan.densities.items()}
    assert bins_of(checkpoint.tokenizer, plan.header) == expected
    sparse = make_plan(checkpoint.tokenizer, stats, instruments="bass", density="bass=sparse")
    dense = make_plan(checkpoint.tokenizer, stats, instruments="bass", density="bass=dense")
    assert sparse.densities[33] <= dense.densities[33]
    for bad, match in (("bass=-1", "notes per bar"), ("bass", "INSTRUMENT=VALUE"),
                       ("drums=4", "will not have"), ("banjoo=2", "banjoo")):  # fmt: skip
        with pytest.raises(GenerationError, match=match):
            make_plan(checkpoint.tokenizer, stats, instruments="piano, bass", density=bad)


def test_continuation_announces_each_prompt_track_as_it_plays(small_piece):
    """Prompt tracks: notes per bar over the prompt bars, counted on the quantised score."""
    tokenizer = PolyTokenizer.build("remi")
    prompt = quantised(tokenizer, small_piece)
    (ts,) = prompt.time_signatures
    bar = prompt.ticks_per_quarter * 4 * ts.numerator // ts.denominator
    plan = make_plan(tokenizer, FLAT, prompt=small_piece, prompt_bars=2, bars=2)
    counted = {
        i: sum(1 for note in notes if note[0] < 2 * bar) / 2
        for i, notes in notes_of(prompt).items()
    }
    # An instrument silent in the prompt bars plays at the default (FLAT: 4 per bar).
    expected = {i: 4.0 if n == 0 else n for i, n in counted.items()}
    assert plan.densities == pytest.approx(expected)
    assert bins_of(tokenizer, plan.header) == {i: density_bin(v) for i, v in expected.items()}


def test_arrangement_measures_the_piece_and_gives_added_parts_their_density(small_piece):
    tokenizer = PolyTokenizer.build("remi")
    piece = quantised(tokenizer, small_piece)
    n_bars = int(tokenizer.is_bar(tokenizer.encode(small_piece).ids).sum())
    added = [i for i in ADDABLE if i not in notes_of(piece)][:2]
    plan = make_plan(
        tokenizer, FLAT, arrange=small_piece, add=added,
        density=f"{instrument_name(added[0])}=7.5",
    )  # fmt: skip
    expected = {i: len(notes) / n_bars for i, notes in notes_of(piece).items()}
    expected.update({added[0]: 7.5, added[1]: 4.0})
    assert plan.densities == pytest.approx(expected)
    assert bins_of(tokenizer, plan.header) == {i: density_bin(v) for i, v in expected.items()}


def test_the_header_stays_when_the_window_slides(checkpoints):
    """Past the context, the kept window still opens with the request's header."""
    checkpoint = checkpoints["remi"]
    plan = make_plan(
        checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass, drums",
        bars=48, density="bass=2.5",
    )  # fmt: skip
    grammar = grammar_for(checkpoint.tokenizer, "cpu")
    (ids,) = sample_tokens(checkpoint, plan, Sampling(), seed=0)
    assert len(ids) > 2 * CONTEXT
    rows = torch.as_tensor(ids)[None]
    tracks = torch.as_tensor(checkpoint.tokenizer.track_ids(ids))[None]
    window, _, length = _windows(rows, tracks, len(plan.header), CONTEXT * 3 // 4, grammar)
    assert int(length[0]) < len(ids)
    np.testing.assert_array_equal(window[0, : len(plan.header)].numpy(), plan.header)


def test_steering_pushes_a_lagging_part_and_holds_back_a_leading_one():
    state = RowState.start(1, RemiGrammar.START, torch.device("cpu"))
    state.bars[:] = 5  # four whole bars written since the start, the fifth begun
    state.position[:], state.positions_per_bar[:] = -1, 32
    targets = torch.zeros(130)
    targets[33], targets[0], targets[DRUMS] = 4.0, 2.0, 8.0
    state.notes[0, 33], state.notes[0, 0], state.notes[0, DRUMS] = 0, 8, 60
    bonus = state.steering(targets, 3.0)[0]
    assert bonus[33] == pytest.approx(3.0 * 16 / 6)  # 16 notes expected, none written: no cap
    assert bonus[0] == 0.0  # on target
    assert bonus[DRUMS] < -2.5  # 28 notes ahead
    assert bonus[40] == 0.0  # not requested


def test_steering_leaves_a_part_alone_within_its_bar_and_holds_it_back_past_it():
    """A part may play its whole bar's worth early (a chord on the downbeat); past that, four
    notes too many weigh twice as much as four notes missing, however far (no cap: a sure model
    outweighed one)."""
    state = RowState.start(1, RemiGrammar.START, torch.device("cpu"))
    state.bars[:], state.position[:], state.positions_per_bar[:] = 3, 3, 16  # 2 bars + 1/4
    targets = torch.zeros(130)
    targets[33], targets[0], targets[24], targets[1] = 4.0, 4.0, 4.0, 4.0
    # 9 notes expected by now, 12 by the bar's end
    state.notes[0, 33], state.notes[0, 0], state.notes[0, 24], state.notes[0, 1] = 5, 16, 11, 36
    bonus = state.steering(targets, 3.0)[0]
    assert bonus[33] == pytest.approx(3.0 * 4 / 6)  # 4 behind
    assert bonus[0] == pytest.approx(-3.0 * 4 / (6 * AHEAD_SCALE))  # 4 past the bar's
    assert -bonus[0] > bonus[33]
    assert bonus[24] == 0.0  # ahead of the position, within the bar's worth
    assert bonus[1] == pytest.approx(-3.0 * 24 / (6 * AHEAD_SCALE))  # 24 past: twice the bar's
    assert -bonus[1] == pytest.approx(2 * 3.0 * 24 / 6)  # twice the pull of a part 24 behind


@pytest.mark.parametrize("kind", KINDS)
def test_steering_expects_a_bar_of_notes_per_new_bar_after_a_prompt(small_piece, kind):
    """A continuation's prompt ends on the first new bar's line: one bar later every part is
    expected to have played one bar's worth, as in a new piece (not none, a bar behind)."""
    tokenizer = PolyTokenizer.build(kind)
    grammar = grammar_for(tokenizer, "cpu")
    targets = torch.full((130,), 4.0)
    bonus = {}
    for name, request in (
        ("continuation", {"prompt": small_piece, "prompt_bars": 2, "bars": 2}),
        ("new piece", {"instruments": "piano, bass", "bars": 4}),
    ):
        plan = make_plan(tokenizer, FLAT, **request)
        state = _after_prompt(grammar, plan, plan.constraints("cpu"), 1, "cpu")
        if name == "new piece":
            state.bars += 1  # the model writes the first bar line
        state.bars += 1  # a bar later, at its line
        state.position[:], state.positions_per_bar[:] = -1, 16
        bonus[name] = float(state.steering(targets, 3.0)[0, 0])
    assert bonus["continuation"] == pytest.approx(3.0 * 4.0 / 6.0)
    assert bonus["new piece"] == pytest.approx(bonus["continuation"])


@pytest.mark.parametrize("kind", KINDS)
def test_steering_moves_parts_toward_their_densities(checkpoints, kind):
    """Asking for a dense bass and a sparse piano, then the reverse, moves the bass's share of
    the notes further apart with steering than the header alone does."""
    checkpoint = checkpoints[kind]

    def bass_share(density: str, steer: float) -> float:
        plan = make_plan(
            checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass", bars=8,
            density=density,
        )  # fmt: skip
        rows = sample_tokens(checkpoint, plan, Sampling(steer=steer), num_samples=4, seed=7)
        counts = [notes_of(to_score(checkpoint.tokenizer, ids, plan)) for ids in rows]
        bass = sum(len(c.get(33, [])) for c in counts)
        return bass / max(sum(len(n) for c in counts for n in c.values()), 1)

    def spread(steer: float) -> float:
        return bass_share("piano=0.5, bass=16", steer) - bass_share("piano=16, bass=0.5", steer)

    assert spread(10.0) > spread(0.0) + 0.2


def rising_score() -> Score:
    """8 bars where the piano plays on each downbeat and the bass on beat 3, both a semitone
    higher each bar."""
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    piano, bass = Track(program=0), Track(program=33)
    for bar in range(8):
        piano.notes.append(Note(bar * 1920, 480, 60 + bar, 80))
        bass.notes.append(Note(bar * 1920 + 960, 480, 36 + bar, 80))
    score.tracks.extend([piano, bass])
    return score


def rising_prompt(kind: str, loops: bool = False):
    """(tokenizer, state after the prompt) of the rising score as a prompt."""
    tokenizer = PolyTokenizer.build(kind)
    grammar = grammar_for(tokenizer, "cpu")
    plan = make_plan(tokenizer, FLAT, prompt=rising_score(), bars=2)
    return tokenizer, _after_prompt(grammar, plan, plan.constraints("cpu"), 1, "cpu", loops=loops)


def test_rows_about_to_write_a_note_field_skip_the_budget_only_where_no_flag_matters():
    """REMI's allowed tokens skip the budget and flags for the grammar states whose row of the
    structure table is the same under every flag: those leading to a Pitch, a Velocity or a
    Duration (3 tokens of a note's 4), never those leading to a bar line, a Position or EOS."""
    tokenizer = PolyTokenizer.build("remi")
    grammar = grammar_for(tokenizer, "cpu")
    constraints = make_plan(tokenizer, FLAT, instruments="piano, bass", bars=2).constraints("cpu")
    table, n_states = grammar.structure(constraints), len(grammar.STATE_NAMES)
    free = constraints.tables["flag_free"]
    assert {grammar.PROGRAM, grammar.DRUM_PROGRAM, grammar.PITCH, grammar.VELOCITY} <= free
    assert not {grammar.TIMESIG, grammar.POSITION, grammar.TEMPO, grammar.DURATION} & free
    for state in range(n_states):  # row = state + n_states * flags
        rows = table[state::n_states]
        assert bool((rows == rows[0]).all()) == (state in free), grammar.STATE_NAMES[state]


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_advances_as_each_row_would_alone(small_piece, kind):
    """advance skips the updates no row's token needs (one check over the batch): two real
    pieces side by side, writing different kinds of token in most steps, leave every row's
    state after every step as that row's tokens alone would, field by field. Both end on PAD;
    ``finished`` (what the decode loop stops on) holds exactly once every row has ended."""
    tokenizer = PolyTokenizer.build(kind)
    grammar = grammar_for(tokenizer, "cpu")
    plans = [make_plan(tokenizer, FLAT, prompt=p, bars=2) for p in (small_piece, rising_score())]
    length = max(len(plan.prompt_body) for plan in plans) + 1
    pad = grammar.padding(1, "cpu")
    streams = [
        torch.cat([torch.as_tensor(body), pad.expand(length - len(body), *pad.shape[1:])])
        for body in (plan.prompt_body for plan in plans)
    ]
    constraints = plans[0].constraints("cpu")  # advance reads only `existing` (None) from it

    def start(batch: int) -> RowState:
        return RowState.start(batch, grammar.START, torch.device("cpu"), grammar.positions)

    together, alone = start(2), [start(1), start(1)]
    fields = [f.name for f in dataclasses.fields(RowState) if f.name != "rows"]
    differing, finished_at = 0, []
    for step in range(length):
        tokens = torch.stack([stream[step] for stream in streams])
        tracks = grammar.advance(together, tokens, constraints)
        for row, state in enumerate(alone):
            assert grammar.advance(state, tokens[row : row + 1], constraints)[0] == tracks[row]
            for name in fields:
                value = getattr(together, name)
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value[row], getattr(state, name)[0]), (step, row, name)
            assert state.finished == (int(state.grammar[0]) == grammar.END)
        assert together.finished == bool((together.grammar == grammar.END).all())
        finished_at += [step] if together.finished else []
        differing += int(together.grammar[0] != together.grammar[1])
    assert finished_at == [length - 1]  # the longer piece's PAD ended the batch
    assert differing > length // 2  # the rows rarely write the same kind of token


@pytest.mark.parametrize("kind", KINDS)
def test_recall_knows_the_pitches_each_part_began_in_its_last_bars(kind):
    """At the rising prompt's first new bar line each part's recent pitches are the ones of its
    last RECALL_BARS bars, no more."""
    _, state = rising_prompt(kind)
    for instrument, lowest in ((0, 60), (33, 36)):
        recent = state.recent_pitches(torch.tensor([instrument]))[0]
        expected = set(range(lowest + 8 - RECALL_BARS, lowest + 8))
        assert set(recent.nonzero().flatten().tolist()) == expected
    assert state.pitch_at is None  # where in the bar: only remembered for loops


@pytest.mark.parametrize("kind", KINDS)
def test_loops_know_where_in_the_bar_each_part_began_its_pitches(kind):
    """At the rising prompt's first new bar, the pitches each part began at a position of its
    last RECALL_BARS bars are the ones of that position, and none of the other part's."""
    tokenizer, state = rising_prompt(kind, loops=True)
    beat_3 = tokenizer.miditok.config.max_num_pos_per_beat * 2
    for position, instrument, other, lowest in ((0, 0, 33, 60), (beat_3, 33, 0, 36)):
        state.position[:] = position
        here = state.pitches_here(torch.tensor([instrument]))[0]
        expected = set(range(lowest + 8 - RECALL_BARS, lowest + 8))
        assert set(here.nonzero().flatten().tolist()) == expected
        assert not state.pitches_here(torch.tensor([other]))[0].any()  # it played elsewhere


def repeated_in_place(checkpoint, plan, sampling: Sampling, drums_only: bool = False) -> float:
    """Of the notes started where their part started notes 1-4 bars earlier (8 rows, seed 3),
    the share that take one of those pitches."""
    rows = sample_tokens(checkpoint, plan, sampling, num_samples=8, seed=3)
    hits = []
    for ids in rows:
        score = to_score(checkpoint.tokenizer, ids, plan)
        starts, _ = piece_bar_lines(score)
        for track in (t for t in score.tracks if t.is_drum or not drums_only):
            bars = np.searchsorted(starts, [n.time for n in track.notes], side="right") - 1
            notes = {
                (int(b), n.time - int(starts[b]), n.pitch)
                for b, n in zip(bars, track.notes, strict=True)
            }
            for b, at, p in notes:
                earlier = {q for lag in range(1, RECALL_BARS + 1) for q in range(128)
                           if (b - lag, at, q) in notes}  # fmt: skip
                if earlier:
                    hits.append(p in earlier)
    return sum(hits) / max(len(hits), 1)


@pytest.mark.parametrize("kind", KINDS)
def test_loops_make_parts_repeat_their_notes_where_they_were(checkpoints, kind):
    """A large loop bonus: of the notes a part starts where it started notes 1-4 bars earlier,
    more take one of those pitches than with the model alone, over the same seeds (not all: the
    onset's ascending order and the register may rule them out)."""
    checkpoint = checkpoints[kind]
    plan = make_plan(checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass", bars=8)

    # 8 rows: with 4, CPWord's gain swung from +0.19 (top-p 0.95) to +0.08 (0.98) with the draw.
    looped = repeated_in_place(checkpoint, plan, Sampling(loop=20.0))
    alone = repeated_in_place(checkpoint, plan, Sampling(loop=0.0))
    assert looped > alone + 0.15, (looped, alone)  # REMI 0.13 -> 0.64, CPWord 0.34 -> 0.69


def drum_score() -> Score:
    """Bass and drums, 8 bars: kick on beat 1 and snare on beat 3 of every bar, a crash over the
    first downbeat only."""
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    drums, bass = Track(program=0, is_drum=True), Track(program=33)
    drums.notes.append(Note(0, 480, 49, 80))
    for bar in range(8):
        drums.notes.extend([Note(bar * 1920, 240, 36, 90), Note(bar * 1920 + 960, 240, 38, 90)])
        bass.notes.append(Note(bar * 1920, 960, 36, 80))
    score.tracks.extend([drums, bass])
    return score


@pytest.mark.parametrize("kind", KINDS)
def test_a_groove_scores_the_kit_pieces_of_the_last_bars_and_of_this_position(kind):
    """After the drum prompt, at its first new bar: the kick and snare score 1 for being played
    in the last RECALL_BARS bars and 1 more where they were played (kick on beat 1, snare on
    beat 3); the crash, 8 bars back, and every pitched note score 0."""
    tokenizer = PolyTokenizer.build(kind)
    grammar = grammar_for(tokenizer, "cpu")
    plan = make_plan(tokenizer, FLAT, prompt=drum_score(), bars=2)
    state = _after_prompt(grammar, plan, plan.constraints("cpu"), 1, "cpu", loops=True)
    beat_3 = tokenizer.miditok.config.max_num_pos_per_beat * 2
    pitch = grammar.pitch_of.clamp(0, 127)
    for position, kick, snare in ((0, 2.0, 1.0), (beat_3, 1.0, 2.0)):
        state.position[:] = position
        score = state.groove(pitch, grammar.is_drum_pitch)[0]
        of = {
            p: score[grammar.is_drum_pitch & (grammar.pitch_of == p)].tolist() for p in (36, 38, 49)
        }
        assert of == {36: [kick], 38: [snare], 49: [0.0]}
        assert not score[~grammar.is_drum_pitch].any()  # a bass note's 36 is no kick


@pytest.mark.parametrize("kind", KINDS)
def test_grooves_make_the_drums_play_their_kit_where_they_played_it(checkpoints, kind):
    """A large groove bonus: of the drum hits at a position where the drums played 1-4 bars
    earlier, more take a kit piece played there than with the model alone, over the same seeds."""
    checkpoint = checkpoints[kind]
    plan = make_plan(checkpoint.tokenizer, checkpoint.densities, instruments="bass, drums", bars=8)

    grooved = repeated_in_place(checkpoint, plan, Sampling(groove=20.0), drums_only=True)
    alone = repeated_in_place(checkpoint, plan, Sampling(groove=0.0), drums_only=True)
    assert grooved > alone + 0.15, (grooved, alone)  # REMI 0.31 -> 0.82, CPWord 0.25 -> 0.81


@pytest.mark.parametrize("kind", KINDS)
def test_recall_makes_parts_reuse_their_pitches(checkpoints, kind):
    """A large recall bonus draws a part's pitches from what it played in its last bars: fewer
    distinct pitches per part than the model alone, over the same seeds."""
    checkpoint = checkpoints[kind]
    plan = make_plan(checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass", bars=8)

    def distinct_pitches(recall: float) -> int:
        rows = sample_tokens(checkpoint, plan, Sampling(recall=recall), num_samples=4, seed=3)
        scores = [notes_of(to_score(checkpoint.tokenizer, ids, plan)) for ids in rows]
        return sum(len({n[2] for n in notes}) for c in scores for notes in c.values())

    assert distinct_pitches(20.0) < 0.8 * distinct_pitches(0.0)


def test_a_register_bounds_a_parts_pitches_and_centres_them_on_its_mean():
    """register_tables: the bass may start 40..45 only, its prior is 0 at its mean and -1/2 a
    standard deviation away; the drums and an instrument the statistics lack may start any."""
    stats = dataclasses.replace(FLAT, registers={33: (40, 45, 42.0, 2.0)})
    tokenizer = PolyTokenizer.build("remi")
    bounds, prior = register_tables(stats, tokenizer, np.zeros(0, dtype=np.int64), "cpu")
    assert bounds[33].tolist() == [40, 45]
    assert bounds[DRUMS].tolist() == bounds[40].tolist() == [0, 127]
    assert prior[33, 42] == 0.0 and prior[33, 44] == pytest.approx(-0.5)
    assert int(prior[33].argmax()) == 42
    assert not prior[DRUMS].any() and not prior[40].any()


@pytest.mark.parametrize("kind", KINDS)
def test_parts_keep_to_their_register(checkpoints, kind):
    """The bass's register narrowed to 40..45 and the piano's centred low (mean 36, spread 3):
    every new bass note lands in 40..45 and the piano's median pitch moves down to its register,
    where the model alone (register 0) goes outside the bass's and keeps the piano higher."""
    checkpoint = checkpoints[kind]
    registers = {33: (40, 45, 42.0, 2.0), 0: (21, 108, 36.0, 3.0)}
    narrowed = dataclasses.replace(
        checkpoint,
        densities=dataclasses.replace(checkpoint.densities, registers=registers),
    )
    plan = make_plan(narrowed.tokenizer, narrowed.densities, instruments="piano, bass", bars=8)

    def pitches(register: float) -> dict[int, list[int]]:
        rows = sample_tokens(narrowed, plan, Sampling(register=register), num_samples=4, seed=2)
        found: dict[int, list[int]] = {0: [], 33: []}
        for ids in rows:
            for instrument, notes in notes_of(to_score(narrowed.tokenizer, ids, plan)).items():
                found[instrument].extend(n[2] for n in notes)
        return found

    kept, alone = pitches(5.0), pitches(0.0)
    assert kept[33] and all(40 <= p <= 45 for p in kept[33])
    assert any(not 40 <= p <= 45 for p in alone[33])
    assert np.median(kept[0]) <= 42 < np.median(alone[0])


@pytest.mark.parametrize("kind", KINDS)
def test_a_continued_part_keeps_the_register_of_its_prompt(checkpoints, kind):
    """The piano's register narrowed to 21..60 around 40, a prompt whose piano plays around 84:
    the continued piano goes on up there (its notes, not the training data's, set the centre),
    where a new piece's piano stays at 60 or below."""
    checkpoint = checkpoints[kind]
    registers = {0: (21, 60, 40.0, 3.0)}
    narrowed = dataclasses.replace(
        checkpoint, densities=dataclasses.replace(checkpoint.densities, registers=registers)
    )
    prompt = Score(480)
    prompt.time_signatures.append(TimeSignature(0, 4, 4))
    piano = Track(program=0)
    piano.notes.extend(Note(k * 480, 480, 82 + k % 5, 80) for k in range(16))
    prompt.tracks.append(piano)

    def new_piano_pitches(**request) -> list[int]:
        plan = make_plan(narrowed.tokenizer, narrowed.densities, bars=4, **request)
        rows = sample_tokens(narrowed, plan, Sampling(register=5.0), num_samples=2, seed=1)
        found = []
        for ids in rows:
            score = to_score(narrowed.tokenizer, ids, plan)
            new_from = 16 * score.ticks_per_quarter if "prompt" in request else 0
            found += [n[2] for n in notes_of(score)[0] if n[0] >= new_from]
        return found

    continued = new_piano_pitches(prompt=prompt)
    assert continued and np.median(continued) >= 78
    assert max(new_piano_pitches(instruments="piano")) <= 60


# ----------------------------------------------------------------------------- decoding
def test_same_seed_same_file_different_seed_different_file(checkpoints):
    def midi(seed):
        return generate(
            "piano, bass, drums", bars=1, seed=seed, checkpoint=checkpoints["remi"]
        ).dumps_midi()

    assert midi(5) == midi(5)
    assert midi(5) != midi(6)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_matches_full_forward(checkpoints, kind):
    checkpoint = checkpoints[kind]
    plan = make_plan(
        checkpoint.tokenizer,
        checkpoint.densities,
        instruments="piano, bass, drums",
        bars=96,
        max_tokens=200,
    )
    greedy = Sampling(temperature=0.0)
    cached = sample_tokens(checkpoint, plan, greedy, num_samples=2, seed=0)
    full = sample_tokens(checkpoint, plan, greedy, num_samples=2, seed=0, use_cache=False)
    assert max(len(ids) for ids in cached) > CONTEXT, "too short to exercise the context refill"
    for a, b in zip(cached, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_remi_field_temperatures_apply_to_the_note_steps_only(checkpoints):
    """A REMI model takes a temperature for a note's pitch, velocity and duration steps: greedy
    elsewhere and sampled pitches, the seeds give different pieces; greedy pitches too, one."""
    checkpoint = checkpoints["remi"]
    plan = make_plan(
        checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass", bars=4,
        max_tokens=120,
    )  # fmt: skip

    def pieces(field_temperature):
        sampling = Sampling(temperature=0.0, field_temperature=field_temperature).check("remi")
        return {
            tuple(sample_tokens(checkpoint, plan, sampling, num_samples=1, seed=seed)[0].tolist())
            for seed in range(4)
        }

    assert len(pieces({})) == 1  # greedy pitches by default too: fields follow the temperature
    assert len(pieces({"pitch": 0.0, "duration": 0.0})) == 1
    assert len(pieces({"pitch": 1.5})) > 1
    assert Sampling(temperature=1.2).of("pitch") == 1.2
    assert Sampling(temperature=1.2, field_temperature={"pitch": 1.0}).of("pitch") == 1.0
    with pytest.raises(GenerationError, match="pitch, velocity, duration"):
        Sampling(field_temperature={"tempo": 0.5}).check("remi")


@pytest.mark.parametrize("kind", KINDS)
def test_the_grammar_checker_rejects_broken_sequences(small_piece, kind):
    tokenizer = PolyTokenizer.build(kind)
    ids = tokenizer.encode(small_piece).ids
    assert grammar_violations(tokenizer, ids) == []
    header = tokenizer.encode(small_piece).header_length
    without_first_bar = np.delete(ids, header, axis=0)  # the body must open with a Bar
    assert grammar_violations(tokenizer, without_first_bar)
    reversed_body = np.concatenate([ids[:header], ids[header:][::-1]])
    assert grammar_violations(tokenizer, reversed_body)


@pytest.mark.parametrize("kind", KINDS)
def test_the_grammar_keeps_the_training_order_at_an_onset(fixture_midi_dir, kind):
    """Two notes of a chord swapped (its pitches descending) break the canonical order the model
    was trained on: the decoder never writes it, the checker reports it."""
    tokenizer = PolyTokenizer.build(kind)
    unit = 4 if kind == "remi" else 1  # rows per note: Program Pitch Velocity Duration
    swapped = 0
    for path in sorted(fixture_midi_dir.rglob("*.mid"))[:12]:
        try:
            encoded = tokenizer.encode(Score(str(path)))
        except Exception:  # corrupt fixtures are for prepare's tests
            continue
        ids, tracks = encoded.ids, encoded.track_ids
        starts = np.flatnonzero(tokenizer.note_mask(ids)) - (1 if kind == "remi" else 0)
        chords = [(a, b) for a, b in pairwise(starts) if b == a + unit and tracks[a] == tracks[b]]
        # Real files can hold a pitch twice at one onset, which no MIDI writer keeps apart and
        # the decoder never writes: such pieces are no reference here.
        if not chords:
            continue
        a, b = chords[0]
        ids = ids[: b + unit]  # the piece up to the chord is enough (the checker is slow)
        if grammar_violations(tokenizer, ids):
            continue
        broken = ids.copy()
        broken[a : a + unit], broken[b : b + unit] = ids[b : b + unit], ids[a : a + unit]
        problems = grammar_violations(tokenizer, broken)
        assert problems and "not above" in problems[0], path.name
        swapped += 1
        if swapped == 3:
            break
    assert swapped >= 3


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_ids_decode_to_a_valid_score_or_a_decode_error(kind):
    tokenizer = PolyTokenizer.build(kind)
    rng = np.random.default_rng(0)
    outcomes = set()
    for length in rng.integers(0, 300, size=100):
        ids = np.stack([rng.integers(0, size, length) for size in tokenizer.vocab_sizes], -1)
        ids = ids[:, 0] if kind == "remi" else ids
        try:
            score = tokenizer.decode(ids)
        except DecodeError:
            outcomes.add("DecodeError")
            continue
        validate_score(score)
        Score.from_midi(score.dumps_midi())
        outcomes.add("score")
    assert "score" in outcomes


# ----------------------------------------------------------------------------- outputs
def test_piano_roll_png_and_wav(checkpoints, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    score = generate("piano, drums", bars=2, seed=7, checkpoint=checkpoints["remi"])
    png = plot_piano_roll(score, tmp_path / "roll.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(RenderError, match="not found"):
        render_wav(score, tmp_path / "x.wav", soundfont=tmp_path / "missing.sf2")
    monkeypatch.delenv("POLYPHONY_SOUNDFONT", raising=False)
    with monkeypatch.context() as patched:
        patched.setattr("polyphony.render.SYSTEM_SOUNDFONTS", ())
        with pytest.raises(RenderError, match="apt-get install fluid-soundfont-gm"):
            render_wav(score, tmp_path / "x.wav")
    try:
        find_soundfont()
    except RenderError:
        pytest.skip("no General MIDI soundfont installed to render a WAV with")
    wav = render_wav(score, tmp_path / "song.wav")
    samples = np.frombuffer(wav.read_bytes()[44:], dtype=np.int16)
    assert np.abs(samples).max() > 0


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_main():
    """generate.py's ``main`` (in-process: no interpreter start per case)."""
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def broken_inputs(checkpoint_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    remi = checkpoint_dirs["remi"]
    (root / "garbage.mid").write_bytes(b"MThd but not really a MIDI file")
    shutil.copytree(remi, root / "mismatched")
    shutil.copy(
        checkpoint_dirs["cpword"] / "tokenizer.json", root / "mismatched" / "tokenizer.json"
    )
    shutil.copytree(remi, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "empty").mkdir()
    return {"root": root, "remi": remi}


PIECE = ("--instruments", "piano, bass, drums", "--bars", "1")
CLI_FAILURES = {
    "unknown instrument 'trumpetz'": ("--instruments", "piano, trumpetz", "--checkpoint", "{remi}"),
    "garbage.mid: not a readable MIDI file": (
        "--prompt",
        "{root}/garbage.mid",
        "--checkpoint",
        "{remi}",
    ),
    "prompt file not found": ("--prompt", "{root}/missing.mid", "--checkpoint", "{remi}"),
    "checkpoint directory not found": (*PIECE, "--checkpoint", "{root}/nowhere"),
    "tokenizer.json: not found": (*PIECE, "--checkpoint", "{root}/empty"),
    "tokenizer mismatch": (*PIECE, "--checkpoint", "{root}/mismatched"),
    "model.safetensors": (*PIECE, "--checkpoint", "{root}/truncated"),
    "recall=-1.0: must be in 0..20": (*PIECE, "--recall", "-1", "--checkpoint", "{remi}"),
    "register=-1.0: must be in 0..20": (*PIECE, "--register", "-1", "--checkpoint", "{remi}"),
    "loop=21.0: must be in 0..20": (*PIECE, "--loop", "21", "--checkpoint", "{remi}"),
    "groove=-2.0: must be in 0..20": (*PIECE, "--groove", "-2", "--checkpoint", "{remi}"),
    "exclude each other": ("--prompt", "{root}/garbage.mid", "--arrange", "{root}/garbage.mid"),
}


@pytest.mark.parametrize("expected", CLI_FAILURES)
def test_cli_errors_are_one_line(cli_main, broken_inputs, capsys, expected):
    args = [arg.format(**broken_inputs) for arg in CLI_FAILURES[expected]]
    assert cli_main([*args, "-o", str(broken_inputs["root"] / "out.mid")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr
    assert not (broken_inputs["root"] / "out.mid").exists()


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "generate.py"), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_cli_subprocess_writes_samples_and_exits_nonzero_on_errors(checkpoint_dirs, tmp_path):
    remi = str(checkpoint_dirs["remi"])
    success = run_cli(
        *PIECE, "--num-samples", "2", "--seed", "1", "-o", "out/song.mid", "--quiet",
        "--checkpoint", remi, cwd=tmp_path,
    )  # fmt: skip
    failure = run_cli("--instruments", "piano, bas", "--checkpoint", remi, cwd=tmp_path)

    _, stderr = success.communicate()
    assert success.returncode == 0, stderr
    for path in (tmp_path / "out" / "song_0.mid", tmp_path / "out" / "song_1.mid"):
        fidelity = instrument_fidelity(Score(str(path)))
        assert fidelity["requested"] == [0, 33, DRUMS] and fidelity["recall"] == 1.0
    _, stderr = failure.communicate()
    assert failure.returncode == 2
    assert stderr.startswith("error: unknown instrument 'bas'") and stderr.count("\n") == 1, stderr


def test_import_polyphony_stays_light():
    code = "import sys, polyphony; assert 'torch' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    import polyphony

    assert polyphony.generate is generate
