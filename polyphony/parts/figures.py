"""What the full-parts evaluation measures, on scores: excerpts of held-out pieces, and
generated against real notes per bar, families, pitch metrics, phrases and registers."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from symusic import Score, Tempo, TimeSignature

from ..data.shards import split_of
from ..evaluate import split_pieces
from ..instruments import DRUMS
from ..metrics import (
    drum_groove,
    groove_consistency,
    instrument_fidelity,
    piece_bar_lines,
    pitch_class_entropy,
    pitch_recurrence,
    scale_consistency,
    top_pitch_share,
    track_densities,
)

THIN = 0.5  # notes per bar: a part below this plays less than one note every two bars
# A pitched part of at least PEDAL_NOTES notes with this share of them on one pitch is a pedal:
# a bass on one note for 16 bars (4 % of the band training excerpts' basses, 11 % held out).
PEDAL, PEDAL_NOTES = 0.7, 8
# A family median gap's interval: pieces drawn with replacement (every excerpt of a piece
# together, so a piece with many synth parts weighs as it does in the median), 5th-95th
# percentile of the gap over the draws.
BOOTSTRAP_DRAWS = 1000
# The families of the report, as GM program ranges (drums apart).
REPORT_FAMILIES = {
    "bass": range(32, 40),
    "piano/keys": range(0, 24),
    "guitar": range(24, 32),
    "strings": range(40, 56),
    "brass/reed": range(56, 80),
    "synth": range(80, 104),
    "other": range(104, 128),
}
MUSIC_METRICS: dict[str, Callable[[Score], float]] = {
    "pitch_class_entropy": pitch_class_entropy,
    "scale_consistency": scale_consistency,
    "groove_consistency": groove_consistency,
    "drum_groove": drum_groove,  # the drums' kit pieces where they were 1-4 bars before
}


def report_family(instrument: int) -> str:
    if instrument == DRUMS:
        return "drums"
    return next(name for name, programs in REPORT_FAMILIES.items() if instrument in programs)


# ------------------------------------------------------------------------------- excerpts
def excerpt(score: Score, first_bar: int, n_bars: int) -> Score | None:
    """Bars ``first_bar .. first_bar + n_bars`` of ``score``, moved to tick 0 with the tempo
    and meter in force there; None if the piece is shorter."""
    starts, lengths = piece_bar_lines(score)
    if first_bar + n_bars > len(starts):
        return None
    last = first_bar + n_bars
    low = int(starts[first_bar])
    high = int(starts[last]) if last < len(starts) else int(starts[-1] + lengths[-1])
    cut = score.clip(low, high, clip_end=True).shift_time(-low)
    tempo = [t for t in score.tempos if t.time <= low][-1:] or [Tempo(0, 120.0)]
    meter = [ts for ts in score.time_signatures if ts.time <= low][-1:] or [TimeSignature(0, 4, 4)]
    cut.tempos = [Tempo(0, tempo[0].qpm), *(t for t in cut.tempos if t.time > 0)]
    cut.time_signatures = [
        TimeSignature(0, meter[0].numerator, meter[0].denominator),
        *(ts for ts in cut.time_signatures if ts.time > 0),
    ]
    cut.tracks = [t for t in cut.tracks if t.notes]
    return cut if cut.tracks else None


HELD_OUT = ("validation", "test")


def band_excerpts(
    dataset_dir,
    midi_root,
    n_bars: int,
    per_piece: int,
    stride: int,
    source: str | None = "band",
    splits: tuple[str, ...] = HELD_OUT,
) -> list[tuple[str, Score]]:
    """Up to ``per_piece`` excerpts of every piece of ``source`` in ``splits`` (held-out by
    default; ``source=None``: every piece), starting every ``stride`` bars. ``midi_root`` is the
    folder the dataset was prepared from."""
    found = []
    for split in splits:
        for piece in split_pieces(dataset_dir, split):
            if source is None or piece.get("source") == source:
                found += _excerpts_of(piece, midi_root, n_bars, per_piece, stride)
    return found


def _excerpts_of(piece: dict, midi_root, n_bars: int, per_piece: int, stride: int):
    score = Score(str(Path(midi_root) / piece["path"]))
    cuts = ((f"{piece['path']}@{k * stride}", excerpt(score, k * stride, n_bars))
            for k in range(per_piece))  # fmt: skip
    return [(name, cut) for name, cut in cuts if cut is not None]


def share_gaps(
    dataset_dir, midi_root, shares, n_bars: int, per_piece: int, stride: int, source="band"
) -> dict[str, dict[str, Any]]:
    """For each held-out share (validation and test each, as ``data.source_held_out``), the
    family medians of the training pieces' excerpts against the held-out ones: what a model
    that reproduced its training music would score against that split, with no model run.
    Pieces are split by content hash as ``prepare`` splits them (data/shards.py), so a larger
    share holds out the same pieces and more; at the share the dataset was prepared with, its row
    is that dataset's own split."""
    pieces = [
        piece
        for split in ("train", *HELD_OUT)
        for piece in split_pieces(dataset_dir, split)
        if source is None or piece.get("source") == source
    ]
    cuts = {p["sha256"]: _excerpts_of(p, midi_root, n_bars, per_piece, stride) for p in pieces}
    table = {}
    for share in shares:
        held = {p["sha256"] for p in pieces if split_of(p["sha256"], share, share) != "train"}
        trained = family_medians([c for h, cs in cuts.items() if h not in held for c in cs], n_bars)
        real = family_medians([c for h, cs in cuts.items() if h in held for c in cs], n_bars)
        table[str(share)] = {
            "held_out_pieces": len(held),
            "gap_per_family": {
                f: round(trained[f] / real[f] - 1, 4) for f in real if trained.get(f) and real[f]
            },
        }
    return table


def instruments_of(score: Score) -> list[int]:
    return list(track_densities(score))


# ------------------------------------------------------------------------------- figures
def median_of(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def family_medians(excerpts: list[tuple[str, Score]], n_bars: int) -> dict[str, float]:
    """Each family's median notes per bar over the parts of real excerpts, counted as
    :func:`part_figures` counts the real side. Over the training pieces' excerpts it is what a
    model that reproduced its training music would score: the part of a family gap that is the
    held-out pieces, not the model."""
    by_family: dict[str, list[float]] = {}
    for _, score in excerpts:
        for instrument, (notes, _) in track_densities(score).items():
            by_family.setdefault(report_family(instrument), []).append(notes / n_bars)
    return {family: median_of(values) for family, values in sorted(by_family.items())}


def part_figures(
    pairs: list[tuple[Score, Score]],
    n_bars: int,
    asked: list[dict[int, float]] | None = None,
    pieces: list[str] | None = None,
) -> dict[str, Any]:
    """Generated vs real over (generated, real excerpt) pairs that ask for the same parts; a
    requested part that stayed silent counts as 0 notes per bar. ``asked``: the densities each
    request asked for (per pair), reported beside them, so that a gap can be told apart into
    the model missing its target and the target missing the music. ``pieces``: the piece each
    pair was cut from, for the family gaps' intervals (:func:`gap_intervals`)."""
    rates: dict[str, list[tuple[int, float]]] = {"generated": [], "real": []}
    piece_of_part: list[str] = []
    metrics = {side: {name: [] for name in MUSIC_METRICS} for side in rates}
    # (instrument, distinct pitches, recurrence) of every pitched part that plays.
    phrases: dict[str, list[tuple[int, int, float]]] = {side: [] for side in rates}
    # Every pitched note's pitch, by family: where a part sits (a guitar at MIDI 115 is no guitar).
    pitches: dict[str, dict[str, list[int]]] = {side: {} for side in rates}
    # The share of each pitched part's notes on its most frequent pitch, by family.
    top: dict[str, dict[str, list[float]]] = {side: {} for side in rates}
    fidelity = []
    for index, (generated, real) in enumerate(pairs):
        played = track_densities(generated)
        for instrument, (notes, _) in track_densities(real).items():
            if pieces is not None:
                piece_of_part.append(pieces[index])
            rates["real"].append((instrument, notes / n_bars))
            rates["generated"].append((instrument, played.get(instrument, (0, 0.0))[0] / n_bars))
        for side, score in (("generated", generated), ("real", real)):
            for name, metric in MUSIC_METRICS.items():
                value = metric(score)
                if np.isfinite(value):
                    metrics[side][name].append(value)
            phrases[side].extend((i, *figures) for i, figures in pitch_recurrence(score).items())
            for instrument, share in top_pitch_share(score, PEDAL_NOTES).items():
                top[side].setdefault(report_family(instrument), []).append(share)
            for track in score.tracks:
                if not track.is_drum and len(track.notes):
                    family = pitches[side].setdefault(report_family(track.program), [])
                    family.extend(track.notes.numpy()["pitch"].tolist())
        fidelity.append(instrument_fidelity(generated))
    table = {}
    for side, parts in rates.items():
        by_family: dict[str, list[float]] = {}
        for instrument, per_bar in parts:
            by_family.setdefault(report_family(instrument), []).append(per_bar)
        table[side] = {
            "parts": len(parts),
            "thin_fraction": sum(v < THIN for _, v in parts) / max(len(parts), 1),
            "median_per_family": {f: median_of(v) for f, v in sorted(by_family.items())},
            "parts_per_family": {f: len(v) for f, v in sorted(by_family.items())},
            **{name: float(np.mean(v)) if v else None for name, v in metrics[side].items()},
            **_phrase_figures(phrases[side]),
            **_pedal_figures(top[side]),
            **_register_figures(pitches[side], pitches["real"]),
        }
    if asked is not None:
        by_family = {}
        for targets in asked:
            for instrument, per_bar in targets.items():
                by_family.setdefault(report_family(instrument), []).append(per_bar)
        table["asked"] = {
            "median_per_family": {f: median_of(v) for f, v in sorted(by_family.items())}
        }
    if pieces is not None:
        table["gap_interval_per_family"] = gap_intervals(
            rates["generated"], rates["real"], piece_of_part
        )
    table["precision"] = float(np.mean([f["precision"] for f in fidelity if f]))
    table["recall"] = float(np.mean([f["recall"] for f in fidelity if f]))
    return table


def gap_intervals(
    generated: list[tuple[int, float]],
    real: list[tuple[int, float]],
    pieces: list[str],
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Per family, the 5th and 95th percentile of the median gap (generated / real - 1) over
    ``draws`` resamplings of the pieces: how far the gap moves with the choice of held-out
    music. One row per part in the three lists (the same order)."""
    rng = np.random.default_rng(seed)
    names, of_piece = np.unique(pieces, return_inverse=True)
    family = np.array([report_family(i) for i, _ in real], dtype=object)
    mine, theirs = np.array([v for _, v in generated]), np.array([v for _, v in real])
    members = {f: family == f for f in sorted(set(family))}
    gaps: dict[str, list[float]] = {f: [] for f in members}
    for _ in range(draws):
        # Each part counts as often as its piece was drawn.
        repeat = np.bincount(rng.integers(len(names), size=len(names)), minlength=len(names))
        repeat = repeat[of_piece]
        for f, keep in members.items():
            a, b = np.repeat(mine[keep], repeat[keep]), np.repeat(theirs[keep], repeat[keep])
            if len(b) and np.median(b) > 0:
                gaps[f].append(float(np.median(a) / np.median(b) - 1))
    return {
        f: tuple(round(float(q), 4) for q in np.percentile(v, [5, 95]))
        for f, v in gaps.items()
        if v
    }


def _phrase_figures(parts: list[tuple[int, int, float]]) -> dict[str, Any]:
    """Per family, medians over the parts of their distinct pitches and recurrence (a part too
    short to have a bar ``RECURRENCE_LAG`` bars back has no recurrence)."""
    distinct: dict[str, list[int]] = {}
    recurrence: dict[str, list[float]] = {}
    for instrument, pitches, share in parts:
        family = report_family(instrument)
        distinct.setdefault(family, []).append(pitches)
        if np.isfinite(share):
            recurrence.setdefault(family, []).append(share)
    return {
        "distinct_pitches_per_family": {f: median_of(v) for f, v in sorted(distinct.items())},
        "recurrence_per_family": {f: median_of(v) for f, v in sorted(recurrence.items())},
    }


def _pedal_figures(top: dict[str, list[float]]) -> dict[str, Any]:
    """Per family, the median share of a part's notes on its most frequent pitch and the
    fraction of parts that are pedals (``PEDAL``); over every pitched part, the pedal fraction."""
    every = [share for shares in top.values() for share in shares]
    return {
        "top_pitch_share_per_family": {f: median_of(v) for f, v in sorted(top.items())},
        "pedal_fraction_per_family": {
            f: float(np.mean(np.asarray(v) >= PEDAL)) for f, v in sorted(top.items())
        },
        "pedal_fraction": float(np.mean(np.asarray(every) >= PEDAL)) if every else None,
    }


def _register_figures(pitches: dict[str, list[int]], real: dict[str, list[int]]) -> dict:
    """Per family, the median pitch, and the share of notes outside the real notes' 1st-99th
    percentile of that family (the real side's own share is about 2 % by construction)."""
    outside = {}
    for family, values in pitches.items():
        if real.get(family):
            low, high = np.percentile(real[family], [1, 99])
            values = np.asarray(values)
            outside[family] = float(np.mean((values < low) | (values > high)))
    return {
        "median_pitch_per_family": {f: median_of(v) for f, v in sorted(pitches.items())},
        "out_of_register_per_family": dict(sorted(outside.items())),
    }


# A continued track's register is judged when it has this many notes before and after.
REGISTER_PROMPT_NOTES, REGISTER_NEW_NOTES = 8, 4
REGISTER_MOVED = 5  # semitones: a track whose median pitch moves further has left its register
REGISTER_MARGIN = 2  # semitones around the prompt's range that still count as inside


def register_kept(prompt: Score, new: Score) -> list[tuple[float, int, int]]:
    """Per pitched instrument of ``prompt`` with enough notes on both sides: how far its median
    pitch moves in ``new`` (semitones), its new notes outside the prompt's range (±
    REGISTER_MARGIN) and all its new notes. Tracks of one program count as one instrument, as
    the model reads them (two guitars of a file are one guitar part to it)."""

    def pitches(score: Score) -> dict[int, np.ndarray]:
        found: dict[int, list[np.ndarray]] = {}
        for t in score.tracks:
            if not t.is_drum:
                found.setdefault(t.program, []).append(t.notes.numpy()["pitch"])
        return {program: np.concatenate(parts) for program, parts in found.items()}

    found, then = [], pitches(new)
    for program, before in pitches(prompt).items():
        after = then.get(program)
        if len(before) < REGISTER_PROMPT_NOTES or after is None or len(after) < REGISTER_NEW_NOTES:
            continue
        low, high = before.min() - REGISTER_MARGIN, before.max() + REGISTER_MARGIN
        move = abs(float(np.median(after)) - float(np.median(before)))
        found.append((move, int(((after < low) | (after > high)).sum()), len(after)))
    return found


def register_summary(kept: list[tuple[float, int, int]]) -> dict[str, Any]:
    notes = sum(n for _, _, n in kept)
    return {
        "tracks": len(kept),
        "median_move": median_of(m for m, _, _ in kept),
        "moved_fraction": sum(m > REGISTER_MOVED for m, _, _ in kept) / max(len(kept), 1),
        "outside_prompt_range": sum(o for _, o, _ in kept) / notes if notes else None,
    }
