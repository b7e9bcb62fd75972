"""Fill-in-the-middle training windows (data/fim.py): the layout, lossless rearrangement, track
ids, determinism and the FIM-for-free guarantee that fim_rate 0 leaves the windows untouched."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyphony.data.dataset import WindowDataset
from polyphony.data.fim import fill_in_the_middle
from polyphony.instruments import GLOBAL_TRACK


@pytest.fixture(params=["remi", "cpword"])
def prepared(request):
    return request.getfixturevalue(f"prepared_{request.param}")


def first_column(ids: np.ndarray) -> np.ndarray:
    return ids if ids.ndim == 1 else ids[:, 0]


def split_fim(tokenizer, ids: np.ndarray):
    """(header, prefix, suffix, middle) rows of a FIM window, by its markers."""
    first = first_column(ids)
    sep = np.flatnonzero(first == tokenizer.sep_id)
    (mask,) = np.flatnonzero(first == tokenizer.mask_id)
    assert len(sep) == 2 and sep[0] < mask < sep[1], "header SEP, MASK, then the middle's SEP"
    return ids[: sep[0] + 1], ids[sep[0] + 1 : mask], ids[mask + 1 : sep[1]], ids[sep[1] + 1 :]


def check_fim_window(tokenizer, before, after, limit):
    """``after`` (ids, track ids) is ``before`` (header, body) as header, prefix, MASK, suffix,
    SEP, middle, EOS: the same header, whole bars, every body row and its track id in place,
    markers on the global track. Returns whether the middle kept its EOS."""
    (before_ids, before_tracks), (after_ids, after_tracks) = before, after
    assert len(after_ids) <= limit and len(after_ids) == len(after_tracks)
    header, prefix, suffix, middle = split_fim(tokenizer, after_ids)
    h, p, s = len(header), len(prefix), len(suffix)
    ends = first_column(middle)[-1] == tokenizer.eos_id
    m = len(middle) - ends
    body_end = len(before_ids) - (first_column(before_ids)[-1] == tokenizer.eos_id)
    assert tokenizer.is_bar(middle[:1]).all(), "the middle starts on a bar line"
    # (slice of after, slice of before) for header, prefix, middle and suffix.
    places = [
        (slice(0, h), slice(0, h)),
        (slice(h, h + p), slice(h, h + p)),
        (slice(h + p + s + 2, h + p + s + 2 + m), slice(h + p, h + p + m)),
        (slice(h + p + 1, h + p + 1 + s), slice(h + p + m, h + p + m + s)),
    ]
    for here, there in places:
        assert there.stop <= body_end or there.stop <= h
        assert np.array_equal(after_ids[here], before_ids[there])
        assert np.array_equal(after_tracks[here], before_tracks[there])
    markers = [h + p, h + p + s + 1] + ([len(after_ids) - 1] if ends else [])
    assert (after_tracks[markers] == GLOBAL_TRACK).all()
    if s:  # the suffix gives up its tail before the middle loses anything
        assert ends and tokenizer.is_bar(suffix[:1]).all()
    return bool(ends)


def test_fim_windows_rearrange_whole_bars_without_losing_a_token(prepared):
    plain = WindowDataset(prepared, "train", max_seq_len=96, seed=3)
    fim = WindowDataset(prepared, "train", max_seq_len=96, seed=3, fim_rate=1.0)
    tokenizer = plain.tokenizer
    rearranged = complete = 0
    for index in range(min(len(plain), 40)):
        before, after = plain.window(index), fim.window(index)
        if np.array_equal(after.ids, before.ids):
            continue  # fewer than two cut points: left as it was
        rearranged += 1
        complete += check_fim_window(
            tokenizer, (before.ids, before.track_ids), (after.ids, after.track_ids), 97
        )
        if tokenizer.kind == "remi":  # REMI infers track ids from the ids: they must agree
            assert np.array_equal(after.track_ids, tokenizer.track_ids(after.ids))
    assert rearranged >= 10 and complete >= rearranged // 2


def test_fim_windows_are_deterministic_and_rate_zero_changes_nothing(prepared):
    base = WindowDataset(prepared, "train", max_seq_len=64, seed=5)
    zero = WindowDataset(prepared, "train", max_seq_len=64, seed=5, fim_rate=0.0)
    half = WindowDataset(prepared, "train", max_seq_len=64, seed=5, fim_rate=0.5)
    again = WindowDataset(prepared, "train", max_seq_len=64, seed=5, fim_rate=0.5)
    changed = 0
    for index in range(min(len(base), 60)):
        assert np.array_equal(base.window(index).ids, zero.window(index).ids)
        a, b = half.window(index), again.window(index)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.track_ids, b.track_ids)
        if not np.array_equal(a.ids, base.window(index).ids):
            changed += 1
            # Only the rearrangement differs: the same piece, start and augmentation.
            plain = base.window(index)
            assert (a.piece, a.start, a.transpose) == (plain.piece, plain.start, plain.transpose)
    assert 10 <= changed <= 50


def test_validation_windows_are_never_rearranged(prepared):
    plain = WindowDataset(prepared, "validation", max_seq_len=64)
    fim = WindowDataset(prepared, "validation", max_seq_len=64, fim_rate=1.0)
    for index in range(len(plain)):
        assert np.array_equal(plain.window(index).ids, fim.window(index).ids)


def test_an_out_of_range_rate_is_refused(prepared):
    with pytest.raises(ValueError, match="fim_rate"):
        WindowDataset(prepared, "train", max_seq_len=64, fim_rate=1.5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), limit=st.integers(20, 200))
def test_fim_property_any_window_any_draw(prepared_remi, seed, limit):
    """Any window cut to any length, any draw: the FIM layout holds within ``limit`` rows."""
    dataset = WindowDataset(prepared_remi, "train", max_seq_len=256, seed=0)
    window = dataset.window(seed % len(dataset))
    tokenizer = dataset.tokenizer
    ids, tracks = window.ids[:limit], window.track_ids[:limit]
    out, out_tracks = fill_in_the_middle(tokenizer, ids, tracks, limit, np.random.default_rng(seed))
    assert len(out) == len(out_tracks)
    if not np.array_equal(out, ids):
        check_fim_window(tokenizer, (ids, tracks), (out, out_tracks), limit)
