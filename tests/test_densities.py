"""Density statistics and requests: quartiles, fallbacks, levels, parsing, the file."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from symusic import Note, Score, TimeSignature, Track

from polyphony.densities import (
    DENSITY_FILE,
    REGISTER_MIN_NOTES,
    REGISTER_PERCENTILES,
    STRETCH_BARS,
    DensityError,
    DensityStats,
    level_value,
    parse_density,
    resolve,
)
from polyphony.instruments import DRUMS
from polyphony.tokenizer import DENSITY_EDGES, PolyTokenizer, density_bin

STATS = DensityStats.measure({0: [2.0, 4.0, 6.0, 8.0, 10.0], 33: [3.0, 5.0, 7.0], DRUMS: [12, 15]})


def test_quartiles_fall_back_to_the_family_then_to_all_parts():
    assert STATS.quartiles(0) == tuple(np.percentile([2, 4, 6, 8, 10], [25, 50, 75]))
    # 1 (Bright Acoustic Piano) was never seen: the piano family's figures (program 0's here)
    assert STATS.quartiles(1) == STATS.quartiles(0)
    # 40 (Violin): no strings at all, so every part's
    everything = [2, 4, 6, 8, 10, 3, 5, 7, 12, 15]
    assert STATS.quartiles(40) == pytest.approx(np.percentile(everything, [25, 50, 75]))
    assert STATS.default(33) == 5.0


def test_an_instrument_of_few_pieces_is_pulled_toward_its_family():
    """Marimba (12) in 2 pieces at 24 notes per bar, its family (chromatic percussion, 8..15)
    otherwise at 2: with shrink k the median is (2 * 24 + k * family) / (2 + k)."""
    values = {12: [24.0, 24.0], 9: [2.0] * 30}
    plain = DensityStats.measure(values)
    shrunk = DensityStats.measure(values, shrink=10)
    family = shrunk.families["family_1"][1]
    assert plain.default(12) == 24.0
    assert shrunk.default(12) == pytest.approx((2 * 24 + 10 * family) / 12, abs=1e-3)
    assert shrunk.default(12) < 6
    # many pieces barely move: 30 of 32 family values are its own
    assert shrunk.default(9) == pytest.approx((30 * 2 + 10 * family) / 40, abs=1e-3)


def test_weights_count_each_piece_as_its_source_does_in_training():
    """Two sources: a band piece (weight 0.5) and four chorale voices (0.125 each) for the same
    program: the weighted median sits between them, a weight-0 source does not count."""
    values = {91: [6.0, 2.0, 2.0, 2.0, 2.0]}
    even = DensityStats.measure(values)
    weighted = DensityStats.measure(values, weights={91: [0.6, 0.1, 0.1, 0.1, 0.1]})
    assert even.default(91) == 2.0 and weighted.default(91) == 6.0
    dropped = DensityStats.measure(values, weights={91: [0.0, 1.0, 1.0, 1.0, 1.0]})
    assert dropped.quartiles(91) == (2.0, 2.0, 2.0) and dropped.pieces[91] == 4


def _piece(bass_per_bar: list[int], drums_per_bar: int) -> Score:
    """4/4 at 480 ticks per quarter: the bass plays ``bass_per_bar[k]`` notes in bar k (rests
    where 0), the drums ``drums_per_bar`` hits in every bar."""
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    bass, drums = Track(program=33), Track(program=0, is_drum=True)
    for bar, count in enumerate(bass_per_bar):
        for k in range(count):
            bass.notes.append(Note(bar * 1920 + k * 1920 // count, 120, 40 + k % 5, 90))
        for k in range(drums_per_bar):
            drums.notes.append(Note(bar * 1920 + k * 1920 // drums_per_bar, 60, 36, 90))
    score.tracks.extend([bass, drums])
    return score


@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_a_default_is_what_a_part_plays_in_the_stretches_it_plays_in(kind):
    """A bass at 4 notes per bar for a stretch, silent for one, at 8 for one: its piece counts
    median(4, 8) = 6, not the whole piece's (4 + 0 + 8) / 3; a part that plays in only some
    bars of a stretch is counted over the whole stretch; the drums play throughout."""
    tokenizer = PolyTokenizer.build(kind)
    n = STRETCH_BARS
    half = [2] * (n // 2) + [0] * (n // 2)
    pieces = [
        tokenizer.encode(_piece([4] * n + [0] * n + [8] * n, drums_per_bar=12)),
        tokenizer.encode(_piece(half + [4] * n, drums_per_bar=12)),
    ]
    stats = DensityStats.of_pieces(
        tokenizer, [(p.ids[:-1], p.track_ids[:-1], p.header_length) for p in pieces], shrink=0
    )
    assert stats.pieces[33] == 2
    # one value per piece: 6 (median of 4 and 8) and 2.5 (median of 1 and 4)
    assert stats.default(33) == pytest.approx(np.median([6.0, 2.5]))
    assert stats.default(DRUMS) == pytest.approx(12.0)


@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_registers_equal_an_independent_count_of_each_parts_pitches(kind):
    """A finger bass with enough notes gets the percentiles, mean and spread of its own pitches;
    a fretless bass with a few low notes gets the bass family's (both basses' notes); drums and
    a family never seen get none. Counted on the Scores, not the tokens."""
    tokenizer = PolyTokenizer.build(kind)
    finger = _piece([8] * 32, drums_per_bar=4)  # 256 notes over 40..44
    fretless = Score(480)
    fretless.time_signatures.append(TimeSignature(0, 4, 4))
    low = Track(program=35)
    low.notes.extend(Note(k * 480, 240, 28 + k % 3, 90) for k in range(12))
    fretless.tracks.append(low)
    encoded = [tokenizer.encode(finger), tokenizer.encode(fretless)]
    stats = DensityStats.of_pieces(
        tokenizer, [(p.ids[:-1], p.track_ids[:-1], p.header_length) for p in encoded]
    )

    def expected(pitches: np.ndarray) -> tuple:
        low, high = np.percentile(pitches, REGISTER_PERCENTILES, method="inverted_cdf")
        return (
            int(low),
            int(high),
            pytest.approx(pitches.mean(), abs=0.01),
            pytest.approx(pitches.std(), abs=0.01),
        )

    own = finger.tracks[0].notes.numpy()["pitch"].astype(float)
    both = np.concatenate([own, low.notes.numpy()["pitch"].astype(float)])
    assert len(own) >= REGISTER_MIN_NOTES > len(low.notes)
    assert stats.register(33) == expected(own)
    assert stats.register(35) == expected(both) == stats.family_registers["family_4"]
    assert stats.register(DRUMS) is None and stats.register(40) is None


def test_statistics_from_before_registers_load_without_them(tmp_path):
    data = json.loads(STATS.to_json())
    del data["registers"]
    (tmp_path / DENSITY_FILE).write_text(json.dumps(data))
    assert DensityStats.load(tmp_path).register(33) is None


def test_a_default_is_at_least_one_note_per_bar_but_a_request_may_ask_for_less():
    stats = DensityStats.measure({119: [0.1, 0.1, 0.2], 0: [6.0]})  # a reverse cymbal, a piano
    assert resolve(stats, [119, 0], {}) == {119: 1.0, 0: 6.0}
    assert resolve(stats, [119], {119: 0.25}) == {119: 0.25}
    assert resolve(stats, [119], {}, measured={119: 0.1}) == {119: 0.1}


def test_the_file_round_trips(tmp_path):
    (tmp_path / DENSITY_FILE).write_text(STATS.to_json())
    assert DensityStats.load(tmp_path) == STATS
    placed = dataclasses.replace(
        STATS,
        registers={33: (28, 55, 40.5, 6.25)},
        family_registers={"family_4": (24, 60, 41.0, 7.5)},
    )
    (tmp_path / DENSITY_FILE).write_text(placed.to_json())
    assert DensityStats.load(tmp_path) == placed
    assert json.loads((tmp_path / DENSITY_FILE).read_text())["density_edges"] == list(DENSITY_EDGES)
    with pytest.raises(DensityError, match="not found.*--export"):
        DensityStats.load(tmp_path / "elsewhere")
    (tmp_path / DENSITY_FILE).write_text("{")
    with pytest.raises(DensityError, match="unreadable"):
        DensityStats.load(tmp_path)


def test_requests_are_parsed_by_instrument_name_number_or_alias():
    assert parse_density("bass=4, drums=dense; 0=sparse") == {33: 4.0, DRUMS: "dense", 0: "sparse"}
    assert parse_density({"piano": 2}) == {0: 2.0}
    assert parse_density(None) == {}
    for bad, match in (("bass", "INSTRUMENT=VALUE"), ("bass=-2", ">= 0"), ("bass=nan", ">= 0"),
                       ("bass=loud", "sparse, medium, dense"), ("bsas=2", "bsas")):  # fmt: skip
        with pytest.raises(DensityError, match=match):
            parse_density(bad)


def test_request_beats_measurement_beats_default():
    targets = resolve(STATS, [0, 33, DRUMS], {33: 9.0}, measured={0: 1.25, 33: 2.0})
    assert targets == {0: 1.25, 33: 9.0, DRUMS: STATS.default(DRUMS)}
    with pytest.raises(DensityError, match="will not have"):
        resolve(STATS, [0], {33: 2.0})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 60.0), min_size=3, max_size=3).map(sorted))
def test_levels_always_ask_for_ordered_bins(quartiles):
    """sparse <= medium <= dense in bins; strictly apart wherever the bins leave room."""
    sparse, medium, dense = (density_bin(level_value(tuple(quartiles), level))
                             for level in ("sparse", "medium", "dense"))  # fmt: skip
    assert sparse <= medium <= dense
    assert medium == density_bin(quartiles[1])
    assert dense > medium or medium == len(DENSITY_EDGES)
    assert sparse < medium or medium == 0
