"""Fill in the middle at bar level (Bavarian et al., 2022): the training transformation, and the
layout generation writes to infill.

A FIM window reads ``header, prefix, MASK, suffix, SEP, middle, EOS``. The prefix ends and the
suffix and middle begin on bar lines, so the middle is whole bars, written after the model has
seen the music on both sides. The markers are the tokenizer's own MASK and SEP specials (as in
Donahue et al.'s infilling-by-language-modeling format: the blank, then the separator before its
answer); SEP ends the given part of a window as it ends the header, and EOS ends the middle as it
ends a piece. Every marker is on the global track. Loss covers every position as usual: the
model keeps its left-to-right skill on the prefix and suffix and learns to fill on the middle.
"""

from __future__ import annotations

import numpy as np

from ..instruments import GLOBAL_TRACK
from ..tokenizer import PolyTokenizer


def marker(tokenizer: PolyTokenizer, token: int) -> np.ndarray:
    """One special token as one position: ``[1]`` (REMI) or ``[1, 8]`` (CPWord, every field)."""
    return np.full((1, *tokenizer.ids_shape), token, dtype=np.int64)


def fim_layout(
    tokenizer: PolyTokenizer,
    header: tuple[np.ndarray, np.ndarray],
    prefix: tuple[np.ndarray, np.ndarray],
    suffix: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """``header, prefix, MASK, suffix, SEP`` as ``(ids, track_ids)``: what the middle follows.
    Each part is its ``(ids, track_ids)``."""

    def global_track(ids):
        return np.full(len(ids), GLOBAL_TRACK, dtype=np.int64)

    mask, sep = marker(tokenizer, tokenizer.mask_id), marker(tokenizer, tokenizer.sep_id)
    parts = [header, prefix, (mask, global_track(mask)), suffix, (sep, global_track(sep))]
    return (
        np.concatenate([ids for ids, _ in parts]),
        np.concatenate([tracks for _, tracks in parts]).astype(np.int64),
    )


def fill_in_the_middle(
    tokenizer: PolyTokenizer,
    ids: np.ndarray,
    track_ids: np.ndarray,
    limit: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A training window (header to SEP, body; at most ``limit`` rows) as a FIM window of at most
    ``limit`` rows. The middle runs between two cut points drawn uniformly from the body's bar
    lines, and its end when the window ends the piece (a window cut mid-bar must not teach an
    EOS there); a window with fewer than two cut points is returned unchanged.

    The three markers make the window longer: the suffix gives up its last rows first (a window
    is cut mid-bar at its end anyway), so the middle keeps its end and its EOS where it can.
    A piece's own EOS at the end of the body is dropped: the middle's EOS takes its place when
    the middle ends the piece, and a suffix is context, never an ending.
    """
    first = ids if ids.ndim == 1 else ids[:, 0]
    header_length = int(np.flatnonzero(first == tokenizer.sep_id)[0]) + 1
    header = ids[:header_length], track_ids[:header_length]
    body, body_tracks = ids[header_length:], track_ids[header_length:]
    first = body if body.ndim == 1 else body[:, 0]
    ends_piece = bool(len(body)) and first[-1] == tokenizer.eos_id
    if ends_piece:
        body, body_tracks = body[:-1], body_tracks[:-1]
    cuts = np.flatnonzero(tokenizer.is_bar(body))
    if ends_piece:
        cuts = np.append(cuts, len(body))
    if len(cuts) < 2:
        return ids, track_ids
    low, high = np.sort(rng.choice(len(cuts), size=2, replace=False))
    start, end = int(cuts[low]), int(cuts[high])
    over = header_length + len(body) + 3 - limit
    suffix_end = max(end, len(body) - max(over, 0))
    context = fim_layout(
        tokenizer,
        header,
        (body[:start], body_tracks[:start]),
        (body[end:suffix_end], body_tracks[end:suffix_end]),
    )
    eos = tokenizer.eos()
    window = np.concatenate([context[0], body[start:end], eos])[:limit]
    tracks = np.concatenate(
        [context[1], body_tracks[start:end], np.full(len(eos), GLOBAL_TRACK, dtype=np.int64)]
    )[:limit]
    return window, tracks
