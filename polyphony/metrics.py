"""Musical metrics of MIDI pieces, and instrument fidelity of generated ones.

Every metric takes a ``symusic.Score`` and returns a float, ``nan`` where it is undefined (no
notes, fewer than two bars), as MusPy does. Drum tracks are left out of every pitch metric.

- ``pitch_class_entropy``, ``scale_consistency``, ``groove_consistency`` and ``polyphony`` follow
  MusPy's definitions (``muspy/metrics/metrics.py``, salu133445/muspy; Dong et al., "MusPy: A
  Toolkit for Symbolic Music Generation", ISMIR 2020). Groove consistency differs in two
  documented details (grid and bar count, see its docstring).
- ``note_density`` (notes per bar), ``empty_bar_rate`` (bars with no onset), ``pitch_ranges``,
  ``pitch_recurrence`` and ``top_pitch_share`` (per instrument) and ``instruments_present`` are
  polyphony's own, defined on the same bar grid.
- A generated file records what was asked for as a MIDI marker at tick 0,
  ``polyphony:instruments=0,33,128`` (instrument ids, 128 = drums); ``write_request`` and
  ``read_request`` handle it and ``instrument_fidelity`` compares it with what was played.

``compute_folder_metrics`` runs all of them over a folder and aggregates (mean, std over pieces).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from symusic import Score, TextMeta, TimeUnit
from tqdm import tqdm

from polyphony.data.midi_input import MIDI_SUFFIXES
from polyphony.instruments import DRUMS, instrument_name, program_to_instrument

REQUEST_MARKER_PREFIX = "polyphony:instruments="

# Groove is compared on a fixed grid of 12 steps per quarter note: it holds 16ths and 8th-note
# triplets, and it is the resolution the Multitrack Music Transformer evaluation (salu133445/mmt,
# mmt/evaluate.py) fed to muspy.groove_consistency(music, 4 * 12).
GROOVE_STEPS_PER_QUARTER = 12

# A piece spanning more bars than this (55 hours of 4/4 at 120 bpm) has corrupt timing; refusing
# it keeps one bad file from allocating gigabytes of bar grid.
MAX_BARS = 100_000


# Folders shorter than this finish before a progress bar would tell the user anything.
PROGRESS_BAR_MIN_FILES = 20

# MusPy's C major and C natural minor masks (muspy/metrics/metrics.py, _get_scale), rolled to
# every root: row 0..11 major on C..B, row 12..23 minor on C..B.
_C_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
_C_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
_SCALES = np.stack([np.roll(mask, root) for mask in (_C_MAJOR, _C_MINOR) for root in range(12)])

PieceMetricsHook = Callable[[Score], Mapping[str, float]]


# --------------------------------------------------------------------------------------------
# The notes and bars of one piece


@dataclass(frozen=True)
class _Piece:
    """All notes of a score as flat arrays (ticks), and the bars they span."""

    tpq: int
    onset: np.ndarray  # int64 ticks
    end: np.ndarray  # int64 ticks
    pitch: np.ndarray  # int64 (symusic gives int8)
    instrument: np.ndarray  # instrument id of each note's track (128 = drums)
    bar_start: np.ndarray  # float64 tick of each bar line, bar_start[0] == 0
    bar_length: np.ndarray  # float64 ticks; a time-signature change cuts the bar before it

    @property
    def pitched(self) -> np.ndarray:
        return self.instrument != DRUMS

    def bar_of(self, ticks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bar_start, ticks, side="right") - 1


def _piece(score: Score) -> _Piece:
    if score.ttype != TimeUnit.tick:
        score = score.to("tick")
    tpq = score.ticks_per_quarter
    if tpq <= 0:
        raise ValueError(f"{tpq} ticks per quarter note (corrupt MIDI header)")
    onsets, durations, pitches, instruments = [], [], [], []
    for track in score.tracks:
        notes = track.notes.numpy()
        onsets.append(notes["time"].astype(np.int64))
        durations.append(notes["duration"].astype(np.int64))
        pitches.append(notes["pitch"].astype(np.int64))
        instrument = program_to_instrument(track.program, track.is_drum)
        instruments.append(np.full(len(notes["time"]), instrument, dtype=np.int64))
    empty = [np.empty(0, dtype=np.int64)]
    onset = np.concatenate(empty + onsets)
    end = onset + np.concatenate(empty + durations)
    if onset.size and onset.min() < 0:
        raise ValueError("negative note times (corrupt delta times in the MIDI file)")
    # The bars span every sounding tick, and the onset of a zero-length note at the very end.
    piece_end = int(max(end.max(), onset.max() + 1)) if onset.size else 0
    bar_start, bar_length = bar_lines(score, tpq, piece_end)
    return _Piece(
        tpq=tpq,
        onset=onset,
        end=end,
        pitch=np.concatenate(empty + pitches),
        instrument=np.concatenate(empty + instruments),
        bar_start=bar_start,
        bar_length=bar_length,
    )


def bar_lines(score: Score, tpq: int, piece_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Bar lines in [0, piece_end) from the score's time signatures.

    4/4 holds until the first time signature (the MIDI default). A time signature starts a new
    bar where it is placed; unusable ones (a denominator of 0 from a corrupt file) are ignored.
    """
    meters = {0: (4, 4)}
    for signature in sorted(score.time_signatures, key=lambda ts: ts.time):
        if (
            0 <= signature.time < piece_end
            and signature.numerator > 0
            and signature.denominator > 0
        ):
            meters[signature.time] = (signature.numerator, signature.denominator)
    changes = sorted(meters.items())
    starts, lengths = [], []
    for index, (time, (numerator, denominator)) in enumerate(changes):
        until = changes[index + 1][0] if index + 1 < len(changes) else piece_end
        bar = 4 * tpq * numerator / denominator
        count = math.ceil((until - time) / bar)
        if sum(map(len, starts)) + count > MAX_BARS:
            raise ValueError(
                f"notes span more than {MAX_BARS} bars (last note ends at tick {piece_end}); "
                "the file's timing is probably corrupt"
            )
        segment = time + bar * np.arange(count)
        starts.append(segment)
        lengths.append(
            np.minimum(bar, until - segment) if index + 1 < len(changes) else np.full(count, bar)
        )
    return np.concatenate(starts), np.concatenate(lengths)


def piece_bar_lines(score: Score) -> tuple[np.ndarray, np.ndarray]:
    """The bars the notes span (their starts and lengths), as every bar metric counts them: a
    piece whose last note ends on a bar line has no bar after it."""
    piece = _piece(score)
    return piece.bar_start, piece.bar_length


def notes_by_instrument(score: Score) -> dict[int, list[tuple[int, int, int, int]]]:
    """Every note as (time, duration, pitch, velocity), sorted, by instrument (drums 128)."""
    table: dict[int, list[tuple[int, int, int, int]]] = {}
    for track in score.tracks:
        n = track.notes.numpy()
        rows = zip(*(n[k].tolist() for k in ("time", "duration", "pitch", "velocity")), strict=True)
        table.setdefault(program_to_instrument(track.program, track.is_drum), []).extend(rows)
    return {i: sorted(rows) for i, rows in table.items()}


# --------------------------------------------------------------------------------------------
# Pitch metrics (drums excluded)


def _pitch_class_counts(piece: _Piece) -> np.ndarray:
    return np.bincount(piece.pitch[piece.pitched] % 12, minlength=12)


def pitch_class_entropy(score: Score) -> float:
    """Shannon entropy (bits) of the 12-bin pitch-class histogram of non-drum notes.

    MusPy ``pitch_class_entropy``: ``-sum_i P(pc=i) log2 P(pc=i)``; 0 for one pitch class,
    log2(12) for all twelve equally often; nan without pitched notes.
    """
    counts = _pitch_class_counts(_piece(score))
    if counts.sum() == 0:
        return math.nan
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())


def scale_consistency(score: Score) -> float:
    """Largest fraction of non-drum notes inside one of the 24 major / natural-minor scales.

    MusPy ``scale_consistency`` (max over roots and modes of ``pitch_in_scale_rate``); nan
    without pitched notes.
    """
    counts = _pitch_class_counts(_piece(score))
    if counts.sum() == 0:
        return math.nan
    return float((_SCALES @ counts).max() / counts.sum())


def _union_length(starts: np.ndarray, ends: np.ndarray) -> int:
    """Total length covered by the intervals [start, end)."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    # Sorted by start, everything before interval i covers up to max(ends[:i]) from starts[i] on.
    covered_until = np.concatenate((starts[:1], np.maximum.accumulate(ends)[:-1]))
    return int(np.maximum(0, ends - np.maximum(starts, covered_until)).sum())


def polyphony(score: Score) -> float:
    """Mean number of distinct pitches sounding, over the ticks where at least one sounds.

    MusPy ``polyphony``: the piano roll of all non-drum tracks (one pitch played by two tracks
    counts once), summed, over the number of time steps with any pitch on. Computed exactly from
    note intervals instead of a tick-resolution piano roll; nan without sounding pitched notes.
    """
    piece = _piece(score)
    sounding = piece.pitched & (piece.end > piece.onset)
    onset, end, pitch = piece.onset[sounding], piece.end[sounding], piece.pitch[sounding]
    if not onset.size:
        return math.nan
    pitch_ticks = sum(_union_length(onset[pitch == p], end[pitch == p]) for p in np.unique(pitch))
    return pitch_ticks / _union_length(onset, end)


def pitch_ranges(score: Score) -> dict[int, tuple[int, int, int]]:
    """``{instrument id: (lowest, highest, span)}`` for every non-drum instrument with notes.

    Tracks with the same instrument id are pooled (a piece's identity of a part is its GM
    program, as in miditok's REMI). MusPy's ``pitch_range`` is the span over all pitched tracks.
    """
    piece = _piece(score)
    ranges = {}
    for instrument in np.unique(piece.instrument[piece.pitched]):
        pitches = piece.pitch[piece.instrument == instrument]
        low, high = int(pitches.min()), int(pitches.max())
        ranges[int(instrument)] = (low, high, high - low)
    return ranges


# A band part's phrase is most often 2 or 4 bars long; 4 bars back lands on a repeat of both.
RECURRENCE_LAG = 4
# drum_groove: a hit is placed on a grid of GROOVE_GRID per bar (16ths in 4/4) and looked for in
# the GROOVE_BARS bars before it (generation's RECALL_BARS).
GROOVE_GRID, GROOVE_BARS = 16, 4


def pitch_recurrence(score: Score, lag: int = RECURRENCE_LAG) -> dict[int, tuple[int, float]]:
    """``{instrument id: (distinct pitches, recurrence)}`` for every non-drum instrument.

    Recurrence: the mean, over the bars from bar ``lag`` on where the part has an onset, of the
    share of that bar's pitches the part also began ``lag`` bars earlier (nan if there is no such
    bar). A part that repeats its phrases scores near 1, one that wanders near 0: real band parts
    loop a 2- or 4-bar figure. polyphony's own.
    """
    piece = _piece(score)
    bars = piece.bar_of(piece.onset)
    figures = {}
    for instrument in np.unique(piece.instrument[piece.pitched]):
        mine = piece.instrument == instrument
        sets = [set(piece.pitch[mine & (bars == bar)].tolist()) for bar in range(bars.max() + 1)]
        shares = [
            len(sets[bar] & sets[bar - lag]) / len(sets[bar])
            for bar in range(lag, len(sets))
            if sets[bar]
        ]
        distinct = len(np.unique(piece.pitch[mine]))
        figures[int(instrument)] = (distinct, float(np.mean(shares)) if shares else math.nan)
    return figures


def top_pitch_share(score: Score, min_notes: int = 1) -> dict[int, float]:
    """``{instrument id: share of its notes on its most frequent pitch}`` for every non-drum
    instrument with at least ``min_notes`` notes. A bass that pedals on one note for the whole
    excerpt scores near 1; real band basses follow the chords (a median 0.3 over 16 bars)."""
    piece = _piece(score)
    shares = {}
    for instrument in np.unique(piece.instrument[piece.pitched]):
        pitches = piece.pitch[piece.pitched & (piece.instrument == instrument)]
        if len(pitches) >= min_notes:
            shares[int(instrument)] = float(np.bincount(pitches).max() / len(pitches))
    return shares


def drum_groove(score: Score, from_bar: int = 1, bars_back: int = GROOVE_BARS) -> float:
    """The share of the drum hits from bar ``from_bar`` on whose kit piece the drums also struck
    at the same place in one of the ``bars_back`` bars before (places: ``GROOVE_GRID`` per bar);
    nan without such hits. A drummer who holds a groove scores near 1 (real band excerpts 0.9),
    one who changes kit pieces or pattern every bar near 0. polyphony's own."""
    piece = _piece(score)
    drums = ~piece.pitched
    bars = piece.bar_of(piece.onset[drums])
    offset = (piece.onset[drums] - piece.bar_start[bars]) / piece.bar_length[bars]
    places = np.rint(GROOVE_GRID * offset).astype(np.int64)
    hits = set(zip(bars.tolist(), places.tolist(), piece.pitch[drums].tolist(), strict=True))
    kept = [
        any((bar - lag, place, kit) in hits for lag in range(1, bars_back + 1))
        for bar, place, kit in hits
        if bar >= from_bar
    ]
    return float(np.mean(kept)) if kept else math.nan


# --------------------------------------------------------------------------------------------
# Rhythm and texture metrics (all tracks, drums included)


def groove_consistency(score: Score) -> float:
    """1 - mean Hamming distance between the onset patterns of neighbouring bars.

    MusPy ``groove_consistency``: each bar is a binary vector with a one at every position that
    has an onset (any track, drums included); the Hamming distances of neighbouring bars are
    summed and divided by ``measure_resolution * (T - 1)`` for T bars. Bar lines come from the
    score's time signatures; where two neighbouring bars differ in length, their distance is
    normalised by the longer one. Two differences from MusPy, both so that files compare:

    - onsets are quantized to ``GROOVE_STEPS_PER_QUARTER`` steps per quarter (MusPy uses the
      file's own resolution, so a 480-tpq file with human timing and a 16-tpq generated file
      would not be measured alike);
    - T counts the bars the notes span. MusPy counts ``length // measure_resolution + 1``, which
      adds an empty bar, and a distance to it, whenever the piece ends on a bar line.

    nan for fewer than two bars.
    """
    piece = _piece(score)
    n_bars = len(piece.bar_start)
    if n_bars < 2:
        return math.nan
    steps_per_tick = GROOVE_STEPS_PER_QUARTER / piece.tpq
    step = np.rint(piece.onset * steps_per_tick)
    bar_start_step = piece.bar_start * steps_per_tick
    bar_steps = np.ceil(np.round(piece.bar_length * steps_per_tick, 6)).astype(np.int64)
    bar = np.searchsorted(bar_start_step, step, side="right") - 1
    # An onset rounded onto the bar line after the last bar stays in the last bar's last step.
    position = np.minimum(np.rint(step - bar_start_step[bar]).astype(np.int64), bar_steps[bar] - 1)
    onsets = np.zeros((n_bars, int(bar_steps.max())), dtype=bool)
    onsets[bar, position] = True
    hamming = np.count_nonzero(onsets[:-1] != onsets[1:])
    return float(1 - hamming / np.maximum(bar_steps[:-1], bar_steps[1:]).sum())


def note_density(score: Score) -> float:
    """Notes per bar: all notes (drums included) over the bars they span; nan without notes."""
    piece = _piece(score)
    if not piece.onset.size:
        return math.nan
    return piece.onset.size / len(piece.bar_start)


def track_densities(score: Score) -> dict[int, tuple[int, float]]:
    """Per instrument (merged as in :func:`instruments_present`): (notes, notes per bar over the
    piece's bars). What a musician counts first: does every part really play?"""
    bars = max(n_bars(score), 1.0) if score.note_num() else 1.0
    counts: dict[int, int] = {}
    for track in score.tracks:
        instrument = program_to_instrument(track.program, track.is_drum)
        counts[instrument] = counts.get(instrument, 0) + track.note_num()
    return {i: (n, n / bars) for i, n in sorted(counts.items())}


def empty_bar_rate(score: Score) -> float:
    """Fraction of bars with no note onset in any track.

    A bar that only holds notes begun earlier counts as empty. MusPy's ``empty_measure_rate``
    counts sounding notes instead, and ``empty_beat_rate`` works on beats. nan without notes.
    """
    piece = _piece(score)
    if not piece.onset.size:
        return math.nan
    return 1 - np.unique(piece.bar_of(piece.onset)).size / len(piece.bar_start)


def instruments_present(score: Score) -> list[int]:
    """Sorted instrument ids (0..127 GM program, 128 drums) of the tracks that have notes.

    Two tracks count as one instrument when their (program, is_drum) match; every drum track is
    drums (128) whatever its program, as in miditok.
    """
    return sorted(
        {
            program_to_instrument(track.program, track.is_drum)
            for track in score.tracks
            if track.notes
        }
    )


# --------------------------------------------------------------------------------------------
# The generation request and instrument fidelity


def write_request(score: Score, instrument_ids: Iterable[int]) -> None:
    """Store the requested instruments in ``score`` as the tick-0 marker ``polyphony:instruments=...``.

    symusic writes markers as MIDI marker meta events (FF 06) and reads them back into
    ``Score.markers``. A request already in the score is replaced.
    """
    ids = [int(i) for i in instrument_ids]
    if not ids:
        raise ValueError("write_request needs at least one instrument id")
    for instrument in ids:
        instrument_name(instrument)  # raises InstrumentError outside 0..128
    score.markers = [m for m in score.markers if not m.text.startswith(REQUEST_MARKER_PREFIX)]
    text = REQUEST_MARKER_PREFIX + ",".join(map(str, ids))
    score.markers.insert(0, TextMeta(0, text, ttype=score.ttype))


def read_request(score: Score) -> list[int] | None:
    """The instrument ids stored by :func:`write_request`, in their order; None without a marker."""
    texts = [m.text for m in score.markers if m.text.startswith(REQUEST_MARKER_PREFIX)]
    if not texts:
        return None
    if len(texts) > 1:
        raise ValueError(f"{len(texts)} {REQUEST_MARKER_PREFIX!r} markers; expected one")
    values = texts[0][len(REQUEST_MARKER_PREFIX) :].split(",")
    try:
        ids = [int(value) for value in values]
        for instrument in ids:
            instrument_name(instrument)
    except ValueError as error:
        raise ValueError(
            f"malformed marker {texts[0]!r}: expected instrument ids 0..128, e.g. "
            f"'{REQUEST_MARKER_PREFIX}0,33,128' ({error})"
        ) from None
    return ids


def instrument_fidelity(score: Score) -> dict[str, Any] | None:
    """How well the instruments played match the request; None if the score carries none.

    present = instruments of tracks with notes; precision = |present & requested| / |present|,
    recall = |present & requested| / |requested|. A piece with no notes at all has precision 0
    (an empty output is never counted as faithful).
    """
    requested = read_request(score)
    if requested is None:
        return None
    wanted, present = set(requested), set(instruments_present(score))
    matched = len(wanted & present)
    return {
        "requested": sorted(wanted),
        "present": sorted(present),
        "matched": matched,
        "precision": matched / len(present) if present else 0.0,
        "recall": matched / len(wanted),
    }


# --------------------------------------------------------------------------------------------
# One piece, one folder


def n_instruments(score: Score) -> float:
    """Number of distinct instruments that play (see :func:`instruments_present`)."""
    return float(len(instruments_present(score)))


def n_bars(score: Score) -> float:
    """Length in bars: the bars spanned by the notes, from tick 0."""
    return float(len(_piece(score).bar_start))


SCALAR_METRICS: dict[str, Callable[[Score], float]] = {
    "pitch_class_entropy": pitch_class_entropy,
    "scale_consistency": scale_consistency,
    "groove_consistency": groove_consistency,
    "polyphony": polyphony,
    "note_density": note_density,
    "empty_bar_rate": empty_bar_rate,
    "n_instruments": n_instruments,
    "n_bars": n_bars,
}
# Keys of a piece record that are not scalar metrics.
_STRUCTURED_KEYS = {"file", "instruments", "pitch_range", "fidelity"}


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def piece_metrics(score: Score) -> dict[str, Any]:
    """Every metric of one piece, JSON-ready (an undefined value is None instead of nan)."""
    record: dict[str, Any] = {
        name: _finite_or_none(metric(score)) for name, metric in SCALAR_METRICS.items()
    }
    record["instruments"] = instruments_present(score)
    record["pitch_range"] = {
        str(instrument): {"min": low, "max": high, "span": span}
        for instrument, (low, high, span) in pitch_ranges(score).items()
    }
    record["fidelity"] = instrument_fidelity(score)
    return record


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean and population std of the defined values, and how many there were."""
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not defined.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(defined.mean()), "std": float(defined.std()), "n": int(defined.size)}


def list_midi_files(folder: str | Path) -> list[Path]:
    """Every .mid / .midi file under ``folder`` (recursive, suffix in any case), sorted."""
    return sorted(
        path
        for path in Path(folder).rglob("*")
        if path.suffix.lower() in MIDI_SUFFIXES and path.is_file()
    )


def compute_folder_metrics(
    folder: str | Path,
    extra_piece_metrics: PieceMetricsHook | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of every MIDI file under ``folder``, and their aggregate over the pieces.

    Files that cannot be read or measured are listed under ``failed`` with the reason, never
    raised. ``extra_piece_metrics(score) -> {name: value}`` adds per-piece scalar metrics (model
    NLL, for one) that are aggregated and reported like the built-in ones.

    Returns ``{"folder", "n_files", "n_pieces", "failed": [{"file", "error"}], "metrics":
    {name: {"mean", "std", "n"}}, "pitch_range": {instrument id: {"instrument", "n", "min",
    "max", "span"}}, "fidelity": None | {"n_pieces", "micro": {...}, "macro": {...}},
    "pieces": [{"file", <piece_metrics>}]}``; ``n`` counts the pieces where a value is defined.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of MIDI files")
    files = list_midi_files(folder)
    pieces, failed = [], []
    bar = tqdm(
        files,
        desc=f"measuring {folder}",
        unit="file",
        leave=False,
        disable=not progress or len(files) < PROGRESS_BAR_MIN_FILES,
    )
    for path in bar:
        name = path.relative_to(folder).as_posix()
        try:
            score = Score(path)
            record = piece_metrics(score)
            if extra_piece_metrics is not None:
                record.update(
                    {
                        key: _finite_or_none(value)
                        for key, value in extra_piece_metrics(score).items()
                    }
                )
        # A folder run is the boundary where one bad file must not stop the others: whatever
        # the reason (symusic raises RuntimeError on corrupt bytes, ours raise ValueError on
        # corrupt timing), the file is reported with it and skipped.
        except Exception as error:
            failed.append({"file": name, "error": f"{type(error).__name__}: {error}"})
            continue
        pieces.append({"file": name, **record})

    scalar_names = list(SCALAR_METRICS) + sorted(
        {key for piece in pieces for key in piece} - set(SCALAR_METRICS) - _STRUCTURED_KEYS
    )
    return {
        "folder": str(folder),
        "n_files": len(files),
        "n_pieces": len(pieces),
        "failed": failed,
        "metrics": {name: summarize(piece.get(name) for piece in pieces) for name in scalar_names},
        "pitch_range": _aggregate_pitch_ranges(pieces),
        "fidelity": _aggregate_fidelity(pieces),
        "pieces": pieces,
    }


def _aggregate_pitch_ranges(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    instruments = sorted({int(key) for piece in pieces for key in piece["pitch_range"]})
    aggregate = {}
    for instrument in instruments:
        ranges = [
            piece["pitch_range"][str(instrument)]
            for piece in pieces
            if str(instrument) in piece["pitch_range"]
        ]
        aggregate[str(instrument)] = {
            "instrument": instrument_name(instrument),
            "n": len(ranges),
            **{key: summarize(r[key] for r in ranges) for key in ("min", "max", "span")},
        }
    return aggregate


def _aggregate_fidelity(pieces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Macro: mean over pieces of their precision and recall; micro: pooled counts."""
    records = [piece["fidelity"] for piece in pieces if piece["fidelity"] is not None]
    if not records:
        return None
    matched = sum(r["matched"] for r in records)
    present = sum(len(r["present"]) for r in records)
    requested = sum(len(r["requested"]) for r in records)
    return {
        "n_pieces": len(records),
        "micro": {
            "precision": matched / present if present else 0.0,
            "recall": matched / requested,
        },
        "macro": {
            "precision": summarize(r["precision"] for r in records),
            "recall": summarize(r["recall"] for r in records),
        },
    }
