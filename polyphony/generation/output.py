"""Generated ids -> a validated Score -> MIDI bytes or a file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from symusic import Score

from ..instruments import instrument_name
from ..instruments import program_to_instrument as _instrument
from ..metrics import bar_lines, write_request
from ..tokenizer import (
    DecodeError,
    PolyTokenizer,
)
from .common import FIELD, MAX_TICK, GenerationError
from .infill import clip_to_region, infill_ids
from .plan import Plan

log = logging.getLogger(__name__)


def validate_score(score: Score) -> None:
    """Refuse what a MIDI writer would corrupt: negative times, empty notes, values out of range,
    events beyond 2^28 ticks (symusic wraps them silently)."""
    for track in score.tracks:
        notes = track.notes.numpy()
        time, duration = notes["time"].astype(np.int64), notes["duration"].astype(np.int64)
        pitch, velocity = notes["pitch"].astype(np.int64), notes["velocity"].astype(np.int64)
        problems = {
            "negative note times": (time < 0).any(),
            "notes without duration": (duration <= 0).any(),
            "pitches outside 0..127": ((pitch < 0) | (pitch > 127)).any(),
            "velocities outside 1..127": ((velocity < 1) | (velocity > 127)).any(),
            f"notes ending after tick {MAX_TICK}": (time + duration > MAX_TICK).any(),
        }
        for problem, found in problems.items():
            if found:
                raise GenerationError(f"track {track.name!r}: {problem}; the output is not written")
    for tempo in score.tempos:
        if not np.isfinite(tempo.qpm) or tempo.qpm <= 0 or tempo.time < 0:
            raise GenerationError(f"invalid tempo {tempo}; the output is not written")


def to_score(tokenizer: PolyTokenizer, ids: np.ndarray, plan: Plan) -> Score:
    """Generated ids (a row of ``sample_tokens``) -> a Score with one track per instrument in
    the plan's order, the request marker, validated. An infilled row is first put back
    together with the piece around it."""
    if plan.infill is not None:
        ids = infill_ids(tokenizer, plan, ids)
    try:
        score = tokenizer.decode(ids)
    except DecodeError as err:  # the grammar makes this unreachable; say so if it is not
        raise GenerationError(f"generated tokens did not decode ({err}); please report it") from err
    by_instrument = {_instrument(t.program, t.is_drum): t for t in score.tracks}
    silent = [i for i in plan.instruments if i not in by_instrument]
    if silent:  # the constraints prevent it; only a token cap that cut the piece short can
        log.warning("note: %s did not play", ", ".join(instrument_name(i) for i in silent))
    score.tracks = [by_instrument[i] for i in plan.instruments if i in by_instrument]
    if plan.infill is not None:
        clip_to_region(score, plan)
    elif plan.existing is None:  # an arrangement keeps the user's notes exactly as they are
        _end_at_bar_line(score, plan.target_bars)
    _tempo_from_start(score, tokenizer, ids)
    write_request(score, plan.instruments)
    validate_score(score)
    return score


def _end_at_bar_line(score: Score, n_bars: int) -> None:
    """Cut notes held past the last bar line: ``bars=8`` gives 8 bars, not 8 bars and a chord
    ringing into a ninth (REMI/CPWord durations may outlast the piece)."""
    notes = [track.notes.numpy() for track in score.tracks]
    piece_end = max(
        (int((n["time"] + n["duration"]).max()) for n in notes if n["time"].size), default=0
    )
    if piece_end == 0:
        return
    starts, _ = bar_lines(score, score.ticks_per_quarter, piece_end + 1)
    if len(starts) <= n_bars:
        return
    end = int(starts[n_bars])
    for track in score.tracks:
        kept = track.notes.filter(lambda note: note.time < end, inplace=False)
        for note in kept:
            note.duration = min(note.duration, end - note.time)
        track.notes = kept


def _tempo_from_start(score: Score, tokenizer: PolyTokenizer, ids: np.ndarray) -> None:
    """Let the piece's first tempo hold from tick 0.

    miditok writes the first tempo where the first Position is: REMI's decoder places it there
    (the MIDI default, 120 bpm, plays before), CPWord's puts its default tempo in front. Either
    way a piece generated at ``--tempo 90`` whose first note is off the downbeat would start at
    another tempo.
    """
    if tokenizer.kind == "remi":
        names = [tokenizer.token_name(int(i)) for i in ids]
    else:
        names = [tokenizer.token_name(int(i), FIELD["tempo"]) for i in ids[:, FIELD["tempo"]]]
    first = next((name for name in names if name.startswith("Tempo_")), None)
    if first is None:
        return
    qpm = float(first.split("_")[1])
    tempos = list(score.tempos)
    index = next((i for i, t in enumerate(tempos) if abs(t.qpm - qpm) < 0.01), None)
    if index is not None:
        tempos = tempos[index:]
        tempos[0].time = 0
        score.tempos = tempos


def midi_bytes(score: Score, name: str = "the output") -> bytes:
    """Validate, serialise, re-parse strictly and compare: MIDI bytes that read back as
    ``score`` (symusic's writer alone would not say when it corrupts something)."""
    validate_score(score)
    data = score.dumps_midi()
    try:
        reread = Score.from_midi(data)
    except RuntimeError as err:
        raise GenerationError(f"{name}: the written MIDI does not parse back ({err})") from err
    written = [(t.program, t.is_drum, t.note_num()) for t in score.tracks if t.note_num()]
    parsed = [(t.program, t.is_drum, t.note_num()) for t in reread.tracks if t.note_num()]
    if sorted(written) != sorted(parsed):
        raise GenerationError(f"{name}: the written MIDI reads back differently; not written")
    return data


def write_midi(score: Score, path: str | Path) -> Path:
    """:func:`midi_bytes` to ``path``; the file appears only if all checks pass."""
    path = Path(path)
    data = midi_bytes(score, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def output_paths(output: str | Path, count: int) -> list[Path]:
    """``song.mid`` -> ``[song.mid]``, or ``[song_0.mid, song_1.mid, ...]`` for several samples."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.mid'}") for i in range(count)]
