"""Reading a user's MIDI file: one path for every reader (prepare, prompt, arrange, infill).

symusic parses strictly (never ``sanitize_data``, which turns pitch 200 into 127); the parsed
score is validated *before* tokenizing (ticks per quarter, negative or overflowed ticks, tempo
and meter values, at least one note, note count, length in bars), then tokenized with
PolyTokenizer (which refuses meters outside the vocabulary) and checked for tokens per note.

**Lenient repair.** Notation programs write velocity bytes of 204 or controller values of 168;
players, DAWs and mido (``clip=True``) clamp them. When strict parsing fails on such a value
(velocity, controller, pitch bend, aftertouch: never a pitch, which would change the music),
the file is re-read by mido with ``clip=True``, written back and parsed again, and the outcome
records what was repaired. ``data.strict`` refuses such files instead.

Every refusal is a :class:`Skip`: a stage and one sentence naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import io
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from symusic import Score

from ..config import DataConfig
from ..tokenizer import PolyTokenizer, TokenizationError

MIDI_SUFFIXES = (".mid", ".midi", ".kar")  # what every reader takes as MIDI, in any case
INT32_MAX = 2**31 - 1
DEFAULT_MSPQ = 500_000  # microseconds per quarter before the first tempo event (120 qpm)


@dataclass(frozen=True)
class Skip:
    """Why a file is not in the dataset."""

    stage: str
    reason: str
    transient: bool = False  # about the file system, not the content: not cached


@dataclass(frozen=True)
class PieceStats:
    instruments: tuple[int, ...]
    n_tokens: int
    n_notes: int
    n_bars: int
    seconds: float
    repaired: str | None = None  # what lenient reading clamped (Repair.describe()), if anything

    @classmethod
    def from_dict(cls, values: dict) -> PieceStats:
        return cls(**{**values, "instruments": tuple(values["instruments"])})


@dataclass
class Tokenized:
    stats: PieceStats
    ids: np.ndarray  # int16 [T] (REMI) or [T, 8] (CPWord): header + body + EOS
    track_ids: np.ndarray  # uint8 [T]


@dataclass(frozen=True)
class MidiFile:
    path: Path
    relpath: str  # POSIX path below the MIDI root: the name in pieces.jsonl and the report
    sha256: str

    @property
    def source(self) -> str:
        """The first folder below the MIDI root ("" for files directly in it)."""
        parts = self.relpath.split("/")
        return parts[0] if len(parts) > 1 else ""


def _segment_lengths(starts: np.ndarray, end_tick: int) -> np.ndarray:
    """Ticks from each (sorted) start to the next start, the last one running to end_tick."""
    bounds = np.minimum(np.append(starts[1:], end_tick), end_tick)
    return np.maximum(bounds - np.minimum(starts, end_tick), 0)


def _count_bars(end_tick: int, tpq: int, meters: dict[str, np.ndarray]) -> int:
    order = np.argsort(meters["time"], kind="stable")
    starts = np.concatenate([[0], meters["time"][order]]).astype(np.int64)
    numerators = np.concatenate([[4], meters["numerator"][order]]).astype(np.float64)
    denominators = np.concatenate([[4], meters["denominator"][order]]).astype(np.float64)
    bar_ticks = tpq * 4 * numerators / denominators
    return int(np.ceil(np.sum(_segment_lengths(starts, end_tick) / bar_ticks)))


def _count_seconds(end_tick: int, tpq: int, tempos: dict[str, np.ndarray]) -> float:
    order = np.argsort(tempos["time"], kind="stable")
    starts = np.concatenate([[0], tempos["time"][order]]).astype(np.int64)
    mspq = np.concatenate([[DEFAULT_MSPQ], tempos["mspq"][order]]).astype(np.float64)
    return float(np.sum(_segment_lengths(starts, end_tick) * mspq) / tpq / 1e6)


def limit_problem(
    n_notes: int, n_bars: int, n_tokens: int | None, limits: DataConfig
) -> str | None:
    if n_notes > limits.max_notes:
        return (
            f"{n_notes:,} notes, more than data.max_notes={limits.max_notes:,}; "
            "raise --data.max_notes to keep it"
        )
    if n_bars > limits.max_bars:
        return (
            f"about {n_bars:,} bars long, more than data.max_bars={limits.max_bars:,} (often one "
            "stray event far after the music: a corrupt delta time); raise --data.max_bars if "
            "the piece really is that long"
        )
    if n_tokens is not None and n_tokens > limits.max_tokens_per_note * n_notes:
        return (
            f"{n_tokens / n_notes:.1f} tokens per note, more than data.max_tokens_per_note="
            f"{limits.max_tokens_per_note:g} (mostly empty bars); raise "
            "--data.max_tokens_per_note to keep it"
        )
    return None


def measure_score(score: Score, limits: DataConfig) -> tuple[int, int, float] | Skip:
    """Validate a parsed score before tokenizing it: (notes, bars, seconds), or why not.

    symusic accepts garbage as plausible data (LIBRARY_NOTES §6): tpq 0, tempo 0 (inf qpm),
    meter 4/0, ticks wrapped past 2^31 to negative. Length is measured in bars here, from the
    end tick, because that is what makes a tokenizer explode, not the file size.
    """
    tpq = score.ticks_per_quarter
    if tpq <= 0:
        return Skip("validate", f"{tpq} ticks per quarter (corrupt header); re-export the file")
    notes = [track.notes.numpy() for track in score.tracks]
    n_notes = sum(len(n["time"]) for n in notes)
    if n_notes == 0:
        return Skip(
            "validate",
            "no notes (empty tracks, or note-ons that are never released); nothing to learn",
        )
    starts = np.concatenate([n["time"] for n in notes]).astype(np.int64)
    durations = np.concatenate([n["duration"] for n in notes]).astype(np.int64)
    tempos = score.tempos.numpy()
    meters = score.time_signatures.numpy()
    event_ticks = np.concatenate([starts, tempos["time"], meters["time"]]).astype(np.int64)
    if event_ticks.min() < 0:
        return Skip(
            "validate",
            f"event at negative tick {event_ticks.min()} (the tick counter overflowed 2^31: "
            "corrupt delta times); re-export the file",
        )
    if durations.min() < 0:
        return Skip(
            "validate", f"note with negative duration {durations.min()}; re-export the file"
        )
    end_tick = int(max((starts + durations).max(), event_ticks.max()))
    if end_tick > INT32_MAX:
        return Skip(
            "validate",
            f"ends at tick {end_tick}, past 2^31 (corrupt delta times); re-export the file",
        )
    if len(tempos["mspq"]) and tempos["mspq"].min() <= 0:
        return Skip(
            "validate", "tempo of 0 microseconds per quarter (corrupt tempo event); re-export it"
        )
    numerators = meters["numerator"].astype(np.int64)
    denominators = meters["denominator"].astype(np.int64)
    bad = (numerators <= 0) | (denominators <= 0) | (denominators & (denominators - 1) != 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        return Skip(
            "validate",
            f"time signature {numerators[index]}/{denominators[index]} is not a meter (corrupt "
            "meta event); re-export the file",
        )
    n_bars = _count_bars(end_tick, tpq, meters)
    problem = limit_problem(n_notes, n_bars, None, limits)
    if problem:
        return Skip("validate", problem)
    return n_notes, n_bars, _count_seconds(end_tick, tpq, tempos)


# symusic's strict reader names the first value above 127 ("Get velocity=204"). These fields
# are clamped by players and DAWs without changing the music; a pitch or program is not.
REPAIRABLE = ("velocity", "control_value", "pitch_bend", "pressure", "after_touch")


@dataclass(frozen=True)
class Repair:
    """What lenient reading changed: symusic's first complaint, and how many note velocities
    and controller values sit at 127 after mido clamped every out-of-range data byte (those
    it clamped among them: a file can also hold real 127s)."""

    first: str  # e.g. "velocity=204"
    velocities_at_127: int
    controller_values_at_127: int

    def describe(self) -> str:
        field, value = self.first.split("=", 1)
        return (
            f"{field} {value} and any other data byte above 127 clamped to 127 (mido clip); "
            f"{self.velocities_at_127} note velocities and {self.controller_values_at_127} "
            "controller values are 127 now"
        )


def _read_reason(message: str, strict: bool = False) -> str:
    """symusic's parse error, in words for the people who will read the report."""
    if message.startswith("Get ") and "=" in message:  # a status byte where data belongs
        field, value = message.removeprefix("Get ").split("=", 1)
        fix = "re-export it"
        if strict and field in REPAIRABLE:
            fix = "drop data.strict (--strict) to clamp it to 127 and keep the file"
        return f"{field} {value} is outside MIDI's 0..127 (corrupt event); {fix}"
    if "header is not MThd" in message:
        return "not a MIDI file (no MThd header); remove it or fix its extension"
    return f"not a readable MIDI file ({message}); re-export it or remove it"


def _clamped_by_mido(data: bytes) -> bytes:
    import mido  # only for files that need repair

    with io.BytesIO(data) as infile:
        midi = mido.MidiFile(file=infile, clip=True)
    out = io.BytesIO()
    midi.save(file=out)
    return out.getvalue()


def read_score(data: bytes, strict: bool = False) -> tuple[Score, Repair | None] | Skip:
    """Parse a file's bytes strictly (never ``sanitize_data``: LIBRARY_NOTES §6.5); on an
    out-of-range velocity or controller value, unless ``strict``, clamp with mido and parse the
    repaired bytes. MemoryError propagates."""
    try:
        return Score.from_midi(data), None
    except MemoryError:
        raise
    except Exception as err:  # symusic raises RuntimeError for all malformed input
        message = str(err)
    first = message.removeprefix("Get ")
    if strict or not message.startswith("Get ") or first.split("=", 1)[0] not in REPAIRABLE:
        return Skip("read", _read_reason(message, strict))
    try:
        score = Score.from_midi(_clamped_by_mido(data))
    except MemoryError:
        raise
    except Exception:  # mido or symusic still refuses it: report the original problem
        return Skip("read", _read_reason(message))
    velocities = sum(int((t.notes.numpy()["velocity"] == 127).sum()) for t in score.tracks)
    controls = sum(int((t.controls.numpy()["value"] == 127).sum()) for t in score.tracks)
    return score, Repair(first, velocities, controls)


def process_midi(data: bytes, tokenizer: PolyTokenizer, limits: DataConfig) -> Tokenized | Skip:
    """Read, validate and tokenize one file's bytes. MemoryError propagates (the worker
    reports it); every other failure becomes a Skip."""
    read = read_score(data, limits.strict)
    if isinstance(read, Skip):
        return read
    score, repair = read
    measured = measure_score(score, limits)
    if isinstance(measured, Skip):
        return measured
    n_notes, n_bars, seconds = measured
    try:
        encoded = tokenizer.encode(score, canonical=limits.note_order != "file")
    except TokenizationError as err:  # a meter outside the vocabulary, nothing left to encode
        return Skip("validate", str(err))
    except MemoryError:
        raise
    except Exception as err:  # miditok raises ZeroDivisionError, KeyError, ... on odd input
        return Skip(
            "tokenize",
            f"miditok failed ({type(err).__name__}: {err}); please report this file",
        )
    problem = limit_problem(n_notes, n_bars, len(encoded), limits)
    if problem:
        return Skip("validate", problem)
    stats = PieceStats(
        encoded.instruments, len(encoded), n_notes, n_bars, round(seconds, 3),
        repair.describe() if repair else None,
    )  # fmt: skip
    return Tokenized(stats, encoded.ids.astype(np.int16), encoded.track_ids.astype(np.uint8))


def process_file(path: str, sha256: str, tokenizer: PolyTokenizer, limits: DataConfig):
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Skip("read", "the file disappeared while the dataset was prepared; run again", True)
    except OSError as err:
        return Skip("read", f"cannot read the file ({err.strerror}); check its permissions", True)
    if hashlib.sha256(data).hexdigest() != sha256:
        return Skip("read", "the file changed while the dataset was prepared; run again", True)
    try:
        return process_midi(data, tokenizer, limits)
    except MemoryError:
        raise
    except Exception as err:  # a bug of ours or of a library: this file must not stop the run
        return Skip("crash", f"unexpected {type(err).__name__} ({err}); please report this file")


# ------------------------------------------------------------------ a user's file, elsewhere
MAX_FILE_BYTES = 64 * 2**20  # a request's MIDI file; the largest real ones are a few MB


class MidiInputError(ValueError):
    """A user's MIDI file refused by a reader other than prepare: one line naming the file,
    the problem and the fix."""


def load_midi(
    source: str | Path | bytes | Score,
    name: str,
    limits: DataConfig | None = None,
    strict: bool = False,
) -> tuple[Score, Repair | None]:
    """A user's MIDI (a path, its bytes, or a Score) read and validated as prepare does: strict
    parsing with lenient repair, then ticks, times, tempos, meters, notes and bars against
    ``limits`` (default: DataConfig's). ``name`` names it in errors."""
    limits = limits or DataConfig()
    repair = None
    if isinstance(source, Score):
        score = source
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                mode = path.stat().st_mode
            except OSError as err:
                raise MidiInputError(f"{name}: cannot open it ({err.strerror})") from err
            if not stat.S_ISREG(mode):  # a pipe named x.mid would block the read forever
                raise MidiInputError(f"{name}: not a regular file; give a .mid file")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise MidiInputError(
                    f"{name}: {path.stat().st_size / 2**20:.0f} MB, more than a MIDI file of "
                    f"music is ({MAX_FILE_BYTES // 2**20} MB); give the piece itself"
                )
            source = path.read_bytes()
        read = read_score(source, strict)
        if isinstance(read, Skip):
            raise MidiInputError(f"{name}: {read.reason}")
        score, repair = read
    measured = measure_score(score, limits)
    if isinstance(measured, Skip):
        raise MidiInputError(f"{name}: {measured.reason}")
    return score, repair
