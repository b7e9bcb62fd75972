"""PolyTokenizer acceptance: round trips within the documented quantisation, track ids, header,
refused meters, random scores and random ids (hypothesis), save/load.

The quantisation being checked (docs/tokenization.md): a *beat* is the time signature's
denominator (a quarter in x/4, an eighth in x/8); onsets land on a 1/8-beat grid; durations on
1/8 beat up to 4 beats and 1/4 beat up to 12 beats, where they are clipped; velocities on 32
bins 4 apart (3, 7, .., 127); every pitch 0..127 is kept.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symusic import Note, Score, TimeSignature, Track

from polyphony.config import CPWORD_FIELDS
from polyphony.instruments import DRUMS, GLOBAL_TRACK, program_to_instrument
from polyphony.tokenizer import (
    DENSITY_EDGES,
    N_DENSITY_BINS,
    DecodeError,
    EncodedPiece,
    PolyTokenizer,
    TokenizationError,
    canonical_score,
    density_bin,
)

KINDS = ("remi", "cpword")
NOTE_ATTRIBUTES = {"Program", "Pitch", "PitchDrum", "Velocity", "Duration"}
MAX_BEATS = 12
VELOCITY_HALF_BIN = 2


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request) -> PolyTokenizer:
    return PolyTokenizer.build(request.param)


def fixture_scores(midi_dir: Path) -> list[tuple[str, Score]]:
    """Every fixture file that loads and has notes (corrupt/empty fixtures are for prepare)."""
    scores = []
    for path in sorted(p for p in midi_dir.rglob("*") if p.suffix.lower() in (".mid", ".midi")):
        try:
            score = Score(path)
        except RuntimeError:
            continue
        if score.note_num() > 0:
            scores.append((path.relative_to(midi_dir).as_posix(), score))
    return scores


@pytest.fixture(scope="module")
def real_pieces(tokenizer, fixture_midi_dir) -> list[tuple[str, Score, EncodedPiece]]:
    """(name, score, encoding) of every fixture file the vocabulary can represent (a meter
    outside it is refused: see test_unsupported_meter_raises_never_silently_four_four)."""
    pieces = []
    for name, score in fixture_scores(fixture_midi_dir):
        if not tokenizer.miditok.score_has_time_signatures_not_in_vocab(score):
            pieces.append((name, score, tokenizer.encode(score)))
    assert len(pieces) >= 3, f"expected real MIDI fixtures in {fixture_midi_dir}"
    return pieces


# ----------------------------------------------------------------- note comparison
def beat_lengths(score: Score, onsets: np.ndarray) -> np.ndarray:
    """Length in quarters of the beat (the meter's denominator) in force at each onset (ticks)."""
    signatures = sorted((ts.time, ts.denominator) for ts in score.time_signatures)
    if not signatures or signatures[0][0] > 0:
        signatures.insert(0, (0, 4))  # miditok assumes 4/4 before the first time signature
    times = np.array([t for t, _ in signatures])
    beats = np.array([4 / d for _, d in signatures])
    return beats[np.searchsorted(times, onsets, side="right") - 1]


def notes_by_instrument(score: Score) -> dict[int, dict[str, np.ndarray]]:
    """Per instrument id (tracks sharing a program merged): onset/duration in quarters, pitch,
    velocity, and the beat length at the onset."""
    columns = defaultdict(lambda: defaultdict(list))
    for track in score.tracks:
        notes = track.notes.numpy()
        instrument = program_to_instrument(track.program, track.is_drum)
        quarters = score.ticks_per_quarter
        columns[instrument]["onset"].append(notes["time"] / quarters)
        columns[instrument]["duration"].append(notes["duration"] / quarters)
        columns[instrument]["pitch"].append(notes["pitch"].astype(np.int64))
        columns[instrument]["velocity"].append(notes["velocity"].astype(np.int64))
        columns[instrument]["beat"].append(beat_lengths(score, notes["time"]))
    return {
        instrument: {key: np.concatenate(parts) for key, parts in fields.items()}
        for instrument, fields in columns.items()
        if sum(len(p) for p in fields["pitch"])
    }


def assert_notes_within_quantisation(original: Score, decoded: Score, name: str) -> None:
    expected, got = notes_by_instrument(original), notes_by_instrument(decoded)
    assert set(got) == set(expected), f"{name}: instruments {sorted(got)} != {sorted(expected)}"
    for instrument, want in expected.items():
        have = got[instrument]
        where = f"{name}, instrument {instrument}"
        assert len(have["pitch"]) == len(want["pitch"]), f"{where}: note count changed"
        np.testing.assert_array_equal(np.sort(have["pitch"]), np.sort(want["pitch"]), where)
        # Quantisation is monotone, so the k-th note of a pitch (by onset) maps to the k-th.
        velocity_error = np.sort(have["velocity"]) - np.sort(want["velocity"])
        assert np.abs(velocity_error).max() <= VELOCITY_HALF_BIN, where
        for pitch in np.unique(want["pitch"]):
            before = np.flatnonzero(want["pitch"] == pitch)
            after = np.flatnonzero(have["pitch"] == pitch)
            before = before[np.argsort(want["onset"][before], kind="stable")]
            after = after[np.argsort(have["onset"][after], kind="stable")]
            # Tolerance one grid step, not half: the file is resampled to miditok's tick rate,
            # then snapped to the grid (two roundings). miditok also moves a meter change to
            # the next bar line, so a note near one may be in either meter: allow the longer.
            beat_in, beat_out = want["beat"][before], have["beat"][after]
            onset_error = np.abs(have["onset"][after] - want["onset"][before])
            tolerance = np.maximum(beat_in, beat_out) / 8 + 1e-9
            assert (onset_error <= tolerance).all(), f"{where}, pitch {pitch}: onsets"
            for length in np.unique(beat_out):  # durations compare within one beat length
                same = beat_out == length
                clipped = np.minimum(np.sort(want["duration"][before][same]), MAX_BEATS * length)
                kept = np.sort(have["duration"][after][same])
                tolerance = max(length, beat_in[same].max()) / 4 + 1e-9
                assert (kept <= MAX_BEATS * length + 1e-9).all(), f"{where}: over 12 beats"
                assert (np.abs(kept - clipped) <= tolerance).all(), f"{where}: durations"


# ----------------------------------------------------------------- real files
def test_real_files_round_trip_within_quantisation(tokenizer, real_pieces):
    for name, score, encoded in real_pieces:
        assert_notes_within_quantisation(score, tokenizer.decode(encoded.ids), name)


def test_track_ids_equal_miditok_event_programs(tokenizer, real_pieces):
    for name, score, encoded in real_pieces:
        canonical = canonical_score(tokenizer.miditok.preprocess_score(score))
        sequence = tokenizer.miditok.encode(canonical, no_preprocess_score=True)
        if tokenizer.kind == "remi":
            expected = [
                program_to_instrument(event.program)
                if event.type_ in NOTE_ATTRIBUTES
                else GLOBAL_TRACK
                for event in sequence.events
            ]
        else:
            expected = []
            for compound in sequence.events:
                programs = [e for e in compound if e.type_ == "Program"]
                is_note = compound[0].value == "Note"
                expected.append(
                    program_to_instrument(int(programs[0].value)) if is_note else GLOBAL_TRACK
                )
        body_tracks = tokenizer.track_ids(np.asarray(sequence.ids))
        np.testing.assert_array_equal(body_tracks, expected, err_msg=name)
        # The stored track ids of a full encoding agree: header + the same body + EOS.
        header_length = encoded.header_length
        np.testing.assert_array_equal(encoded.track_ids[header_length:-1], expected, name)
        assert DRUMS not in expected or any(t.is_drum for t in score.tracks)


def test_header_lists_exactly_the_piece_instruments(tokenizer, real_pieces):
    for name, score, encoded in real_pieces:
        present = {program_to_instrument(t.program, t.is_drum) for t in score.tracks if t.notes}
        announced, body = tokenizer.split_header(encoded.ids)
        assert list(announced) == sorted(present), name  # ascending: drums (128) come last
        assert encoded.instruments == announced
        header = encoded.ids[: encoded.header_length]
        bins = {i: density_bin(v) for i, v in encoded.densities.items()}
        np.testing.assert_array_equal(header, tokenizer.header(bins))
        assert tokenizer.header_densities(header) == bins
        field = 0 if tokenizer.kind == "remi" else CPWORD_FIELDS.index("program")
        column = header[1:-1:2] if tokenizer.kind == "remi" else header[1:-1, field]
        names = [tokenizer.token_name(int(i), field) for i in column]
        assert names == [f"Program_{-1 if i == DRUMS else i}" for i in sorted(present)], name
        assert len(body) == len(encoded.ids) - encoded.header_length - 1  # header, EOS stripped


# ----------------------------------------------------------------- canonical order, densities
def onset_groups(tokenizer: PolyTokenizer, ids: np.ndarray) -> list[list[tuple[int, int]]]:
    """(instrument, pitch) of each note, grouped by onset (REMI: between Position/Bar tokens;
    CPWord: between Metric compounds), in stream order."""
    tracks = tokenizer.track_ids(ids)
    groups, current = [], []
    for row, track in zip(ids, tracks, strict=True):
        if tokenizer.kind == "remi":
            name = tokenizer.token_name(int(row))
            new_onset = name.startswith(("Position_", "Bar_"))
            pitch = int(name.split("_")[1]) if name.startswith(("Pitch_", "PitchDrum_")) else None
        else:
            new_onset = tokenizer.token_name(int(row[0]), 0) == "Family_Metric"
            field = CPWORD_FIELDS.index("pitch")
            is_note = tokenizer.token_name(int(row[0]), 0) == "Family_Note"
            pitch = (
                int(tokenizer.token_name(int(row[field]), field).split("_")[1]) if is_note else None
            )
        if new_onset and current:
            groups.append(current)
            current = []
        if pitch is not None:
            current.append((int(track), pitch))
    return groups + ([current] if current else [])


def test_notes_at_an_onset_come_in_header_order_then_pitch_ascending(tokenizer, real_pieces):
    for name, _, encoded in real_pieces:
        body = encoded.ids[encoded.header_length : -1]
        for group in onset_groups(tokenizer, body):
            assert group == sorted(group), name  # instruments ascending = header order


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_order_does_not_depend_on_the_files_track_order(tokenizer, real_pieces, data):
    """A pure function of the notes: shuffling the tracks, and the notes inside each track,
    gives the same tokens."""
    index = data.draw(st.integers(0, len(real_pieces) - 1))
    name, score, encoded = real_pieces[index]
    shuffled = score.copy()
    order = data.draw(st.permutations(range(len(shuffled.tracks))))
    shuffled.tracks = [shuffled.tracks[i].copy() for i in order]
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    for track in shuffled.tracks:
        notes = track.notes.numpy()
        permutation = rng.permutation(len(notes["time"]))
        track.notes = Note.from_numpy(**{k: v[permutation] for k, v in notes.items()})
    np.testing.assert_array_equal(tokenizer.encode(shuffled).ids, encoded.ids, err_msg=name)


def test_header_densities_equal_notes_per_bar_of_the_piece(tokenizer, real_pieces):
    """The piece header's bins come from an independent count on the decoded score."""
    for name, _, encoded in real_pieces:
        decoded = tokenizer.decode(encoded.ids)
        ticks_per_bar = {ts.time: ts for ts in decoded.time_signatures}
        if len(ticks_per_bar) != 1:
            continue  # one meter keeps the bar count simple
        (ts,) = ticks_per_bar.values()
        bar = decoded.ticks_per_quarter * 4 * ts.numerator // ts.denominator
        n_bars = int(np.sum(tokenizer.is_bar(encoded.ids)))
        expected = {}
        for track in decoded.tracks:
            instrument = program_to_instrument(track.program, track.is_drum)
            expected[instrument] = density_bin(track.note_num() / n_bars)
        assert tokenizer.header_densities(encoded.ids[: encoded.header_length]) == expected, name
        assert max(n.end for t in decoded.tracks for n in t.notes) <= (n_bars + 1) * bar


def test_density_bins_are_ordered_and_cover_every_rate():
    assert list(DENSITY_EDGES) == sorted(DENSITY_EDGES)
    assert density_bin(0.0) == 0 and density_bin(1e6) == N_DENSITY_BINS - 1
    for k, edge in enumerate(DENSITY_EDGES, 1):
        assert density_bin(edge) == k and density_bin(edge - 1e-9) == k - 1


def test_fixtures_include_a_drum_track(fixture_midi_dir):
    scores = fixture_scores(fixture_midi_dir)
    assert any(t.is_drum and t.notes for _, s in scores for t in s.tracks)


# ----------------------------------------------------------------- refused input
def test_unsupported_meter_raises_never_silently_four_four(tokenizer):
    score = small_score(TimeSignature(0, 11, 16))
    with pytest.raises(TokenizationError, match="11/16"):
        tokenizer.encode(score)
    changed = small_score(TimeSignature(0, 4, 4))
    changed.time_signatures.append(TimeSignature(1920, 11, 16))  # a change mid-piece, too
    with pytest.raises(TokenizationError, match="11/16"):
        tokenizer.encode(changed)
    assert len(tokenizer.encode(small_score(TimeSignature(0, 7, 8)))) > 0  # in the vocabulary


def small_score(meter: TimeSignature) -> Score:
    score = Score(480)
    score.time_signatures.append(meter)
    track = Track(program=0)
    for beat in range(8):
        track.notes.append(Note(beat * 480, 480, 60 + beat, 80))
    score.tracks.append(track)
    return score


# ----------------------------------------------------------------- property tests
# Meters and what is exactly representable in each: the grid step is 1/8 beat, durations are
# 1..32 steps, then even step counts up to 12 beats (96 steps).
METERS = [(4, 4), (3, 4), (2, 4), (5, 4), (6, 8), (7, 8), (12, 8), (2, 2)]
DURATION_STEPS = list(range(1, 33)) + list(range(34, 97, 2))


@st.composite
def on_grid_scores(draw) -> Score:
    tpq = draw(st.sampled_from([96, 384, 480, 960]))
    numerator, denominator = draw(st.sampled_from(METERS))
    step = tpq * 4 // denominator // 8  # ticks per 1/8 beat
    n_bars = draw(st.integers(1, 4))
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, numerator, denominator))
    for _ in range(draw(st.integers(1, 4))):
        is_drum = draw(st.booleans()) and draw(st.booleans())
        track = Track(program=draw(st.integers(0, 127)), is_drum=is_drum)
        for _ in range(draw(st.integers(1, 12))):
            onset = draw(st.integers(0, n_bars * numerator * 8 - 1)) * step
            duration = draw(st.sampled_from(DURATION_STEPS)) * step
            pitch, velocity = draw(st.integers(0, 127)), draw(st.integers(1, 127))
            track.notes.append(Note(onset, duration, pitch, velocity))
        score.tracks.append(track)
    return score


def note_multiset(score: Score) -> dict[int, list[tuple[int, float, float]]]:
    notes = notes_by_instrument(score)
    return {
        instrument: sorted(zip(n["pitch"].tolist(), n["onset"], n["duration"], strict=True))
        for instrument, n in notes.items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_random_on_grid_scores_round_trip(kind):
    tokenizer = PolyTokenizer.build(kind)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(score=on_grid_scores())
    def round_trip(score):
        decoded = tokenizer.decode(tokenizer.encode(score).ids)
        # On the grid nothing moves: pitches, onsets and durations come back exactly.
        assert note_multiset(decoded) == note_multiset(score)
        assert_notes_within_quantisation(score, decoded, "generated")

    round_trip()


def random_ids(tokenizer: PolyTokenizer) -> st.SearchStrategy[np.ndarray]:
    """Uniform ids (a few past either end of the vocabulary); CPWord rows mostly carry a real
    family, so the per-field checks are exercised and not just the family check."""
    if tokenizer.kind == "remi":
        ids = st.lists(st.integers(-2, tokenizer.vocab_sizes[0] + 2), max_size=120)
        return ids.map(lambda values: np.array(values, dtype=np.int64))
    family = st.sampled_from([tokenizer.family_metric_id, tokenizer.family_note_id])
    family |= st.integers(-1, tokenizer.vocab_sizes[0])
    fields = [st.integers(0, size) for size in tokenizer.vocab_sizes[1:]]
    rows = st.lists(st.tuples(family, *fields), max_size=80)
    return rows.map(lambda r: np.array(r, dtype=np.int64).reshape(len(r), len(CPWORD_FIELDS)))


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_ids_decode_to_a_score_or_raise_decode_error(kind):
    tokenizer = PolyTokenizer.build(kind)
    outcomes = {"score": 0, "error": 0}

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ids=random_ids(tokenizer))
    def decode(ids):
        try:
            score = tokenizer.decode(ids)
        except DecodeError:
            outcomes["error"] += 1
            return
        assert isinstance(score, Score)
        outcomes["score"] += 1

    decode()
    assert outcomes["score"] > 0  # lenient where it can be: not everything is refused


# ----------------------------------------------------------------- persistence
def test_save_and_load_keep_the_hash_and_the_ids(tokenizer, real_pieces, tmp_path):
    path = tokenizer.save(tmp_path)
    loaded = PolyTokenizer.load(path)
    assert PolyTokenizer.load(tmp_path).hash == loaded.hash == tokenizer.hash
    assert loaded.vocab_sizes == tokenizer.vocab_sizes and loaded.kind == tokenizer.kind
    for _, score, encoded in real_pieces[:3]:
        np.testing.assert_array_equal(loaded.encode(score).ids, encoded.ids)
    other = PolyTokenizer.build("cpword" if tokenizer.kind == "remi" else "remi")
    assert other.hash != tokenizer.hash
