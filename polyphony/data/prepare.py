"""MIDI folder -> validated, tokenized shards + manifest + report, in isolated worker processes.

    python -m polyphony.data.prepare MIDI_DIR --out DATASET_DIR [--config configs/x.yaml]
        [--workers N] [--tokenization remi|cpword] [--data.key=value ...]

The input is a folder of MIDI files nobody vetted. A 51-byte file can become half a million
tokens, a corrupt delta time can put a note 26,000 bars after the music, and a parser can stall
inside native code, where no Python signal reaches (LIBRARY_NOTES §6). So:

1. The parent walks the folder (.mid, .midi, .kar in any case; symlinked folders are not
   followed, so a link loop cannot trap the walk), hashes every file and drops exact duplicates.
2. Each new file goes to a worker *process* with a deadline (``data.file_timeout_s``) and an
   address-space limit (``data.max_memory_mb`` beyond what the worker had mapped at start-up,
   so an exploding file raises MemoryError instead of swapping the machine). The parent kills a
   worker that misses its deadline and replaces one that dies (segfault, OOM kill).
3. The worker parses strictly (never ``sanitize_data``, which turns pitch 200 into 127),
   validates the score *before* tokenizing (ticks per quarter, negative or overflowed ticks,
   tempo and meter values, at least one note, note count, length in bars), tokenizes with
   PolyTokenizer (which refuses meters outside the vocabulary) and checks tokens per note.
4. Every result, success or failure, is cached under ``DATASET_DIR/cache`` by content hash and
   tokenizer hash, so a re-run processes only new files. The shards are then written from the
   cache in sha256 order: the output bytes depend neither on the worker count nor on the cache.

Every skipped file gets one line in ``report.jsonl``: path, stage (read, validate, tokenize,
timeout, crash, memory, duplicate) and a reason naming the problem and what to do.

Test hook: ``POLYPHONY_PREPARE_TEST_HOOK="action:glob[,action:glob]"`` makes an isolated worker
misbehave on files whose name matches the glob: ``hang`` (sleeps for days), ``oom`` (allocates
more than ``data.max_memory_mb``) or ``segfault``. The tests use it to exercise the timeout,
memory and crash handling without a genuinely malicious file; unset, it does nothing.
"""

from __future__ import annotations

import argparse
import faulthandler
import fnmatch
import hashlib
import json
import multiprocessing
import os
import signal
import stat
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import psutil
from symusic import Score
from tqdm import tqdm

from ..config import TOKENIZATIONS, ConfigError, DataConfig, load_config
from ..instruments import instrument_name
from ..tokenizer import HEADER_FORMAT, PolyTokenizer, TokenizationError

MIDI_SUFFIXES = {".mid", ".midi", ".kar"}
SPLITS = ("train", "validation", "test")
STAGES = ("read", "validate", "tokenize", "timeout", "crash", "memory", "duplicate")
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.jsonl"
TEST_HOOK_ENV = "POLYPHONY_PREPARE_TEST_HOOK"
FORMAT_VERSION = 1
CACHE_VERSION = 2  # bump when per-file processing changes, so stale cache entries are ignored
# DataConfig fields that decide a single file's outcome: a cached failure is reused only under
# the same values (raise data.file_timeout_s and the timed-out files are tried again).
FILE_LIMIT_FIELDS = (
    "file_timeout_s",
    "max_memory_mb",
    "max_bars",
    "max_notes",
    "max_tokens_per_note",
)
# Everything that decides the dataset's content, recorded in the manifest. `workers` is not
# here: it changes the speed, never the bytes.
PREPARE_FIELDS = (
    "tokenization",
    *FILE_LIMIT_FIELDS,
    "validation_fraction",
    "test_fraction",
    "note_order",
)
INT32_MAX = 2**31 - 1
DEFAULT_MSPQ = 500_000  # microseconds per quarter before the first tempo event (120 qpm)


class PrepareError(RuntimeError):
    """The run cannot produce a dataset (no input folder, no MIDI files, nothing tokenizable)."""


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


def split_of(sha256: str, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split by content hash: a file keeps its split when others are added."""
    u = int(sha256[:8], 16) / 2**32
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


# --------------------------------------------------------------------------- one file
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


def _limit_problem(
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
    problem = _limit_problem(n_notes, n_bars, None, limits)
    if problem:
        return Skip("validate", problem)
    return n_notes, n_bars, _count_seconds(end_tick, tpq, tempos)


def _read_reason(message: str) -> str:
    """symusic's parse error, in words for the people who will read the report."""
    if message.startswith(("Get pitch=", "Get velocity=")):  # a status byte where data belongs
        field, value = message.removeprefix("Get ").split("=", 1)
        return f"{field} {value} is outside MIDI's 0..127 (corrupt note event); re-export it"
    if "header is not MThd" in message:
        return "not a MIDI file (no MThd header); remove it or fix its extension"
    return f"not a readable MIDI file ({message}); re-export it or remove it"


def process_midi(data: bytes, tokenizer: PolyTokenizer, limits: DataConfig) -> Tokenized | Skip:
    """Parse, validate and tokenize one file's bytes. MemoryError propagates (the worker
    reports it); every other failure becomes a Skip."""
    try:
        score = Score.from_midi(data)  # strict: no sanitize_data (LIBRARY_NOTES §6.5)
    except MemoryError:
        raise
    except Exception as err:  # symusic raises RuntimeError for all malformed input
        return Skip("read", _read_reason(str(err)))
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
    problem = _limit_problem(n_notes, n_bars, len(encoded), limits)
    if problem:
        return Skip("validate", problem)
    stats = PieceStats(encoded.instruments, len(encoded), n_notes, n_bars, round(seconds, 3))
    return Tokenized(stats, encoded.ids.astype(np.int16), encoded.track_ids.astype(np.uint8))


def _process_file(path: str, sha256: str, tokenizer: PolyTokenizer, limits: DataConfig):
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


# --------------------------------------------------------------------------- isolated workers
def _run_test_hook(path: str, max_memory_mb: int) -> None:
    for rule in filter(None, os.environ.get(TEST_HOOK_ENV, "").split(",")):
        action, _, pattern = rule.partition(":")
        if not fnmatch.fnmatch(Path(path).name, pattern):
            continue
        if action == "hang":
            time.sleep(10**6)
        elif action == "oom":
            # More than the guard allows; without the address-space limit this just succeeds.
            bytearray((max_memory_mb + 256) * 2**20)
        elif action == "segfault":
            faulthandler.disable()  # a real crash's traceback helps; a simulated one is noise
            os.kill(os.getpid(), signal.SIGSEGV)


def _limit_address_space(max_memory_mb: int) -> None:
    try:
        import resource
    except ImportError:  # Windows: only the timeout guards the run
        return
    limit = psutil.Process().memory_info().vms + max_memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _memory_skip(limits: DataConfig) -> Skip:
    return Skip(
        "memory",
        f"needs more than data.max_memory_mb={limits.max_memory_mb} MB to process; "
        "raise it to keep the file",
    )


def _worker_main(conn, tokenizer: PolyTokenizer, limits: DataConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it kills the workers
    _limit_address_space(limits.max_memory_mb)
    while True:
        try:
            path, sha256 = conn.recv()
        except EOFError:  # the parent is done
            return
        try:
            _run_test_hook(path, limits.max_memory_mb)
            result = _process_file(path, sha256, tokenizer, limits)
        except MemoryError:
            result = _memory_skip(limits)
        conn.send(result)


def _death_skip(exitcode: int | None) -> Skip:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return Skip(
                "memory",
                "the worker was killed (SIGKILL), most likely by the system's out-of-memory "
                "killer; lower data.max_memory_mb or --workers",
            )
        return Skip(
            "crash",
            f"the MIDI parser crashed ({name}) on this file; it is malformed in a way the "
            "library does not handle, please report it",
        )
    return Skip("crash", f"the worker exited unexpectedly (exit code {exitcode}); please report it")


class _Worker:
    """One isolated worker process and the files sent to it, oldest (the one running) first."""

    def __init__(self, context, tokenizer: PolyTokenizer, limits: DataConfig):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(child_conn, tokenizer, limits), daemon=True
        )
        self.process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        self.jobs: deque[MidiFile] = deque()
        self.deadline = 0.0  # of jobs[0]

    def send(self, job: MidiFile, timeout_s: float) -> None:
        if not self.jobs:
            self.deadline = time.monotonic() + timeout_s
        self.jobs.append(job)
        try:
            self.conn.send((str(job.path), job.sha256))
        except OSError:
            pass  # the worker is dead: the next wait() sees EOF and reports jobs[0]

    def finish(self, timeout_s: float) -> MidiFile:
        """jobs[0] is done; the worker has moved on to the next one."""
        self.deadline = time.monotonic() + timeout_s
        return self.jobs.popleft()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: a stall inside native code ignores anything softer
        self.process.join()
        self.conn.close()


# Files in flight per worker: the next one is already queued when a result comes back, so the
# worker does not idle while the parent writes the cache.
_QUEUE_DEPTH = 2


def _run_isolated(
    jobs: list[MidiFile],
    tokenizer: PolyTokenizer,
    limits: DataConfig,
    n_workers: int,
    on_result: Callable[[MidiFile, Tokenized | Skip], None],
) -> None:
    # fork starts a worker in milliseconds with the tokenizer already built; the workers use
    # only symusic, miditok and numpy, none of the parent's threads (torch, tqdm).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    timeout_s = limits.file_timeout_s
    pending = list(reversed(jobs))  # pop() gives the next file
    workers = [_Worker(context, tokenizer, limits) for _ in range(min(n_workers, len(jobs)))]
    try:
        while True:
            for worker in workers:
                while len(worker.jobs) < _QUEUE_DEPTH and pending:
                    worker.send(pending.pop(), timeout_s)
            busy = [w for w in workers if w.jobs]
            if not busy:
                return
            next_deadline = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for index, worker in enumerate(workers):
                if not worker.jobs:
                    continue
                if worker.conn in ready:
                    try:
                        result = worker.conn.recv()
                    except (EOFError, OSError):  # died mid-file: segfault, OOM kill
                        worker.process.join()
                        result = _death_skip(worker.process.exitcode)
                elif time.monotonic() >= worker.deadline:
                    result = Skip(
                        "timeout",
                        f"not done after data.file_timeout_s={timeout_s:g} s; the worker was "
                        "killed. Raise data.file_timeout_s to try it again",
                    )
                else:
                    continue
                job = worker.finish(timeout_s)
                if isinstance(result, Skip) and result.stage in ("timeout", "crash", "memory"):
                    # A fresh process: this one is stuck, dead or bloated. Its queued files go
                    # back to the front of the line.
                    pending.extend(reversed(worker.jobs))
                    worker.stop()
                    workers[index] = _Worker(context, tokenizer, limits)
                on_result(job, result)
    finally:
        for worker in workers:
            worker.stop()


def _run_in_process(jobs, tokenizer, limits, on_result) -> None:
    """workers=0: no isolation, no timeout, no memory guard. For debugging and benchmarks."""
    for job in jobs:
        on_result(job, _process_file(str(job.path), job.sha256, tokenizer, limits))


# --------------------------------------------------------------------------- cache and files
def _write_atomic(path: Path, write: Callable) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        write(f)
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode()))


class _Cache:
    """Per-file outcomes by content hash, in append-only packs under
    ``cache/v<version>-<tokenizer hash>/<n>.pack``, one pack per run.

    A record is one JSON line (sha256 and either the PieceStats or the failure with the limits
    it was found under), followed for a tokenized file by its ids (int16 little-endian) and
    track ids (uint8) as raw bytes. Packs instead of one file per MIDI file: creating a file
    costs about as much as tokenizing a small piece on a VM disk. A later record for the same
    hash wins; a record cut short by an interrupted run is ignored (the file is redone).
    Deleting the cache folder is always safe.
    """

    def __init__(self, out_dir: Path, tokenizer: PolyTokenizer, limits: DataConfig):
        order = "" if limits.note_order == "canonical" else f"-{limits.note_order}"
        self.dir = out_dir / "cache" / f"v{CACHE_VERSION}-{tokenizer.hash}{order}"
        self.settings = {name: getattr(limits, name) for name in FILE_LIMIT_FIELDS}
        self.ids_shape = tokenizer.ids_shape
        self._ids_per_token = int(np.prod(self.ids_shape))
        # sha256 -> the record's JSON and, for a tokenized file, (pack, payload offset)
        self._records: dict[str, tuple[dict, tuple[Path, int] | None]] = {}
        self._packs = sorted(self.dir.glob("*.pack"), key=lambda p: int(p.stem))
        for pack in self._packs:
            self._scan(pack)
        self._writer = None
        self._readers: dict[Path, object] = {}

    def _payload_size(self, record: dict) -> int:
        n_tokens = record["stats"]["n_tokens"] if "stats" in record else 0
        return n_tokens * (2 * self._ids_per_token + 1)

    def _scan(self, pack: Path) -> None:
        size = pack.stat().st_size
        with open(pack, "rb") as f:
            while True:
                line = f.readline()
                try:
                    record = json.loads(line)
                    sha256, payload = record["sha256"], self._payload_size(record)
                    if "stats" in record:
                        PieceStats.from_dict(record["stats"])
                    else:
                        Skip(record["stage"], record["reason"])
                except (ValueError, KeyError, TypeError):
                    return  # the end of the pack, or a record cut short
                offset = f.tell()
                if offset + payload > size:
                    return
                self._records[sha256] = (record, (pack, offset) if payload else None)
                f.seek(payload, os.SEEK_CUR)

    def get(self, sha256: str) -> PieceStats | Skip | None:
        """The cached outcome, or None if the file must be (re)processed."""
        if sha256 not in self._records:
            return None
        record, _ = self._records[sha256]
        if "stats" in record:
            return PieceStats.from_dict(record["stats"])
        if record.get("settings") == self.settings:
            return Skip(record["stage"], record["reason"])
        return None  # failed under other limits: try again

    def put(self, sha256: str, result: Tokenized | Skip) -> None:
        if self._writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            number = int(self._packs[-1].stem) + 1 if self._packs else 0
            self._writer = open(self.dir / f"{number:06d}.pack", "xb")
        if isinstance(result, Skip):
            record = {"sha256": sha256, "stage": result.stage, "reason": result.reason}
            record["settings"] = self.settings
            payload = b""
        else:
            record = {"sha256": sha256, "stats": asdict(result.stats)}
            ids = np.ascontiguousarray(result.ids, dtype="<i2")
            payload = ids.tobytes() + np.ascontiguousarray(result.track_ids, np.uint8).tobytes()
        self._writer.write(json.dumps(record).encode() + b"\n")
        offset = self._writer.tell()
        self._writer.write(payload)
        self._records[sha256] = (record, (Path(self._writer.name), offset) if payload else None)

    def arrays(self, sha256: str) -> tuple[np.ndarray, np.ndarray]:
        record, (pack, offset) = self._records[sha256]
        if self._writer is not None:
            self._writer.flush()
        if pack not in self._readers:
            self._readers[pack] = open(pack, "rb")
        reader = self._readers[pack]
        reader.seek(offset)
        n_tokens = record["stats"]["n_tokens"]
        n_ids = n_tokens * self._ids_per_token
        data = reader.read(self._payload_size(record))
        ids = np.frombuffer(data, dtype="<i2", count=n_ids).reshape(n_tokens, *self.ids_shape)
        return ids, np.frombuffer(data, dtype=np.uint8, offset=2 * n_ids)

    def close(self) -> None:
        for f in [self._writer, *self._readers.values()]:
            if f is not None:
                f.close()
        self._writer, self._readers = None, {}


def find_midi_files(midi_dir: Path) -> tuple[list[Path], list[tuple[Path, Skip]]]:
    """Candidate MIDI paths below midi_dir (sorted), and folders that could not be listed."""
    found: list[Path] = []
    unlisted: list[tuple[Path, Skip]] = []

    def on_error(err: OSError) -> None:
        reason = f"cannot list this folder ({err.strerror}); check its permissions"
        unlisted.append((Path(err.filename), Skip("read", reason)))

    # followlinks=False: a symlinked folder is neither walked twice nor able to loop.
    for folder, _, names in os.walk(midi_dir, onerror=on_error):
        found.extend(Path(folder, n) for n in names if Path(n).suffix.lower() in MIDI_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(midi_dir).as_posix()), unlisted


def _hash_file(path: Path) -> str | Skip:
    try:
        mode = os.stat(path).st_mode  # follows a file symlink; a link loop raises ELOOP
    except OSError as err:
        return Skip("read", f"cannot open it ({err.strerror}); fix or remove the link")
    if not stat.S_ISREG(mode):  # a FIFO named x.mid would block the read forever
        return Skip("read", "not a regular file (a pipe or device with a MIDI name); remove it")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        return Skip("read", f"cannot read the file ({err.strerror}); check its permissions")
    return digest.hexdigest()


def _write_split(
    split_dir: Path,
    members: list[tuple[MidiFile, PieceStats]],
    cache: _Cache,
    tokenizer: PolyTokenizer,
) -> None:
    """Stream one split's pieces from the cache into ids.npy / track_ids.npy (no full copy in
    memory), plus offsets.npy and pieces.jsonl."""
    lengths = np.array([stats.n_tokens for _, stats in members], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_rows = int(offsets[-1])

    def write_shards(ids_file, tracks_file) -> None:
        for f, dtype, shape in (
            (ids_file, np.int16, (n_rows, *tokenizer.ids_shape)),
            (tracks_file, np.uint8, (n_rows,)),
        ):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "shape": shape}
            np.lib.format.write_array_header_1_0(f, {**header, "fortran_order": False})
        for midi_file, _ in members:
            ids, track_ids = cache.arrays(midi_file.sha256)
            ids_file.write(np.ascontiguousarray(ids, dtype=np.int16).tobytes())
            tracks_file.write(np.ascontiguousarray(track_ids, dtype=np.uint8).tobytes())

    tracks_path = split_dir / "track_ids.npy"
    tracks_temporary = tracks_path.with_name(f"{tracks_path.name}.tmp{os.getpid()}")
    split_dir.mkdir(parents=True, exist_ok=True)
    with open(tracks_temporary, "wb") as tracks_file:
        _write_atomic(split_dir / "ids.npy", lambda f: write_shards(f, tracks_file))
    os.replace(tracks_temporary, tracks_path)
    _write_atomic(split_dir / "offsets.npy", lambda f: np.save(f, offsets))
    lines = [
        json.dumps(
            {
                "sha256": midi_file.sha256,
                "path": midi_file.relpath,
                "source": midi_file.source,
                "instruments": list(stats.instruments),
                "n_tokens": stats.n_tokens,
                "n_notes": stats.n_notes,
                "seconds": stats.seconds,
            }
        )
        for midi_file, stats in members
    ]
    _write_text(split_dir / "pieces.jsonl", "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- the run
@dataclass
class PrepareSummary:
    """What a run did; ``format()`` is the one-screen summary the CLI prints."""

    midi_dir: Path
    out_dir: Path
    tokenization: str
    files_found: int
    processed: int  # files parsed and tokenized (or rejected) by this run
    cached: int  # files whose outcome came from the cache
    pieces: dict[str, int]  # per split
    tokens: int
    hours: float
    skipped: dict[str, int]  # stage -> files
    examples: dict[str, list[str]]  # stage -> a few "path: reason"
    instruments: dict[str, int]  # instrument name -> pieces, most frequent first
    elapsed_s: float = 0.0
    sources: dict[str, int] = field(default_factory=dict)  # source -> pieces

    @property
    def ok(self) -> int:
        return sum(self.pieces.values())

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        lines = [
            f"polyphony prepare: {self.midi_dir} -> {self.out_dir} ({self.tokenization})",
            f"  files        {self.files_found:,} found: {self.ok:,} tokenized, {skipped:,} skipped"
            f"  ({self.processed:,} processed, {self.cached:,} from cache, {self.elapsed_s:.1f} s)",
        ]
        for stage in STAGES:
            if self.skipped.get(stage):
                lines.append(f"  skipped      {stage:<9} {self.skipped[stage]:,}")
                lines.extend(f"{'e.g.':>18} {_shorten(e)}" for e in self.examples[stage])
        lines.append(
            "  pieces       "
            + ", ".join(f"{s} {self.pieces[s]:,}" for s in SPLITS)
            + "  |  sources: "
            + _listing([(s or "(root)", n) for s, n in self.sources.items()])
        )
        lines.append(f"  tokens       {self.tokens:,}   music {self.hours:.2f} hours")
        top = list(self.instruments.items())
        lines.append(f"  instruments  {len(top)}: {_listing(top)}")
        if skipped:
            lines.append(f"  report       {self.out_dir / REPORT_FILE} (one line per skipped file)")
        return "\n".join(lines)


def _listing(counts: list[tuple[str, int]], shown: int = 8) -> str:
    text = ", ".join(f"{name} {n:,}" for name, n in counts[:shown])
    return text + (f" (+{len(counts) - shown} more)" if len(counts) > shown else "")


def _shorten(text: str, width: int = 150) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _examples(report: list[dict], per_stage: int = 3) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for entry in report:
        shown = examples.setdefault(entry["stage"], [])
        if len(shown) < per_stage:
            shown.append(f"{entry['path']}: {entry['reason']}")
    return examples


def _deduplicate(midi_dir: Path, paths: list[Path], report: list[dict]) -> dict[str, MidiFile]:
    """Hash every file; the first path (sorted) of each content is kept, the others reported."""
    unique: dict[str, MidiFile] = {}
    for path in paths:
        relpath = path.relative_to(midi_dir).as_posix()
        digest = _hash_file(path)
        if isinstance(digest, Skip):
            report.append({"path": relpath, "stage": digest.stage, "reason": digest.reason})
        elif digest in unique:
            reason = f"same content as {unique[digest].relpath}; skipped"
            report.append({"path": relpath, "stage": "duplicate", "reason": reason})
        else:
            unique[digest] = MidiFile(path, relpath, digest)
    return unique


def _process_new_files(
    unique: dict[str, MidiFile],
    cache: _Cache,
    tokenizer: PolyTokenizer,
    data_config: DataConfig,
    workers: int,
    progress: bool,
) -> tuple[dict[str, PieceStats | Skip], int]:
    """Outcome of every unique file (cached or computed now) and how many were computed."""
    outcomes: dict[str, PieceStats | Skip] = {}
    jobs = []
    for midi_file in unique.values():
        cached = cache.get(midi_file.sha256)
        if cached is None:
            jobs.append(midi_file)
        else:
            outcomes[midi_file.sha256] = cached

    bar = tqdm(total=len(jobs), unit="file", desc="tokenizing", disable=not progress or not jobs)
    n_skipped = 0

    def on_result(midi_file: MidiFile, result: Tokenized | Skip) -> None:
        nonlocal n_skipped
        if not (isinstance(result, Skip) and result.transient):
            cache.put(midi_file.sha256, result)
        outcomes[midi_file.sha256] = result if isinstance(result, Skip) else result.stats
        if isinstance(result, Skip):
            n_skipped += 1
            bar.set_postfix(skipped=n_skipped, refresh=False)
        bar.update()

    try:
        if workers == 0:
            _run_in_process(jobs, tokenizer, data_config, on_result)
        else:
            _run_isolated(jobs, tokenizer, data_config, workers, on_result)
    finally:
        bar.close()
    return outcomes, len(jobs)


def prepare_dataset(
    midi_dir: str | Path,
    out_dir: str | Path,
    data_config: DataConfig,
    workers: int | None = None,
    progress: bool = True,
    tokenizer: PolyTokenizer | None = None,
) -> PrepareSummary:
    """Tokenize every MIDI file below ``midi_dir`` into the dataset format of ``out_dir``.

    ``tokenizer``: use this vocabulary (e.g. a trained model's tokenizer.json, to fine-tune or
    score it) instead of building one from ``data_config.tokenization``.

    ``workers``: isolated worker processes (default ``data_config.workers``); 0 runs in this
    process without timeout or memory guard (debugging and benchmarks only).
    Raises PrepareError if the folder is missing, holds no MIDI file or nothing tokenizes.
    """
    started = time.monotonic()
    midi_dir, out_dir = Path(midi_dir), Path(out_dir)
    workers = data_config.workers if workers is None else workers
    if not midi_dir.is_dir():
        raise PrepareError(f"{midi_dir}: MIDI folder not found (give a folder of .mid files)")
    if workers < 0:
        raise PrepareError(f"workers={workers}: expected >= 1 (or 0 for no isolation)")
    if data_config.note_order not in ("canonical", "file"):
        raise PrepareError(
            f"data.note_order={data_config.note_order!r}: expected canonical or file"
        )
    if tokenizer is None:
        tokenizer = PolyTokenizer.build(data_config.tokenization)
    elif tokenizer.kind != data_config.tokenization:
        data_config = replace(data_config, tokenization=tokenizer.kind)
    if max(tokenizer.vocab_sizes) > np.iinfo(np.int16).max:
        raise PrepareError(f"vocabulary of {max(tokenizer.vocab_sizes)} ids does not fit int16")

    paths, unlisted = find_midi_files(midi_dir)
    if not paths:
        raise PrepareError(f"{midi_dir}: no MIDI files (.mid, .midi, .kar) in it or its subfolders")
    report = [
        {"path": p.relative_to(midi_dir).as_posix(), "stage": s.stage, "reason": s.reason}
        for p, s in unlisted
    ]
    unique = _deduplicate(midi_dir, paths, report)
    cache = _Cache(out_dir, tokenizer, data_config)
    try:
        outcomes, processed = _process_new_files(
            unique, cache, tokenizer, data_config, workers, progress
        )
        members: dict[str, list[tuple[MidiFile, PieceStats]]] = {split: [] for split in SPLITS}
        for sha256 in sorted(unique):
            midi_file, outcome = unique[sha256], outcomes[sha256]
            if isinstance(outcome, PieceStats):
                # Limits may have changed since the entry was cached: apply today's.
                problem = _limit_problem(
                    outcome.n_notes, outcome.n_bars, outcome.n_tokens, data_config
                )
                outcome = Skip("validate", problem) if problem else outcome
            if isinstance(outcome, Skip):
                entry = {
                    "path": midi_file.relpath,
                    "stage": outcome.stage,
                    "reason": outcome.reason,
                }
                report.append(entry)
                continue
            split = split_of(sha256, data_config.validation_fraction, data_config.test_fraction)
            members[split].append((midi_file, outcome))
        report.sort(key=lambda entry: entry["path"])

        out_dir.mkdir(parents=True, exist_ok=True)
        # The manifest is written last: a dataset folder without one is incomplete.
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        _write_text(out_dir / REPORT_FILE, "".join(json.dumps(e) + "\n" for e in report))
        if not any(members.values()):
            examples = "; ".join(e for shown in _examples(report, 1).values() for e in shown)
            raise PrepareError(
                f"{midi_dir}: none of the {len(paths)} MIDI files could be tokenized "
                f"(see {out_dir / REPORT_FILE}), e.g. {examples}"
            )
        for split in SPLITS:
            _write_split(out_dir / split, members[split], cache, tokenizer)
    finally:
        cache.close()
    tokenizer.save(out_dir)

    manifest = _manifest(midi_dir, tokenizer, data_config, len(paths), members, report)
    _write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    instruments = {entry["name"]: entry["pieces"] for entry in manifest["instruments"]}
    return PrepareSummary(
        midi_dir=midi_dir,
        out_dir=out_dir,
        tokenization=tokenizer.kind,
        files_found=len(paths),
        processed=processed,
        cached=len(unique) - processed,
        pieces={split: len(members[split]) for split in SPLITS},
        tokens=manifest["tokens"],
        hours=manifest["hours"],
        skipped=manifest["files"]["skipped"],
        examples=_examples(report),
        instruments=dict(sorted(instruments.items(), key=lambda item: -item[1])),
        elapsed_s=time.monotonic() - started,
        sources={name: entry["pieces"] for name, entry in manifest["sources"].items()},
    )


def _totals(pieces: Iterable[PieceStats]) -> dict[str, float]:
    pieces = list(pieces)
    return {
        "pieces": len(pieces),
        "tokens": sum(p.n_tokens for p in pieces),
        "hours": round(sum(p.seconds for p in pieces) / 3600, 4),
    }


def _manifest(midi_dir, tokenizer, data_config, n_found, members, report) -> dict:
    everything = [pair for split in SPLITS for pair in members[split]]
    by_source: dict[str, list[PieceStats]] = {}
    for midi_file, stats in sorted(everything, key=lambda pair: pair[0].relpath):
        by_source.setdefault(midi_file.source, []).append(stats)
    instrument_pieces = Counter(i for _, stats in everything for i in stats.instruments)
    skipped = Counter(entry["stage"] for entry in report)
    total = _totals(stats for _, stats in everything)
    return {
        "format_version": FORMAT_VERSION,
        "header_format": HEADER_FORMAT,
        "tokenization": tokenizer.kind,
        "tokenizer_hash": tokenizer.hash,
        "midi_dir": str(midi_dir.resolve()),
        "config": {name: getattr(data_config, name) for name in PREPARE_FIELDS},
        "files": {
            "found": n_found,
            "tokenized": len(everything),
            "skipped": {stage: skipped[stage] for stage in STAGES if skipped[stage]},
        },
        "splits": {split: _totals(s for _, s in members[split]) for split in SPLITS},
        "sources": {name: _totals(stats) for name, stats in sorted(by_source.items())},
        "tokens": total["tokens"],
        "hours": total["hours"],
        "instruments": [
            {"id": i, "name": instrument_name(i), "pieces": instrument_pieces[i]}
            for i in sorted(instrument_pieces)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyphony.data.prepare",
        description="Validate and tokenize a folder of MIDI files into a polyphony dataset. "
        "Any other --data.key=value overrides the config (e.g. --data.max_bars=4000).",
    )
    parser.add_argument("midi_dir", type=Path, help="folder of .mid/.midi/.kar files (recursive)")
    parser.add_argument("--out", type=Path, help="dataset folder (default: data.dataset_dir)")
    parser.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "--workers", type=int, help="isolated worker processes (default: data.workers)"
    )
    parser.add_argument("--tokenization", choices=TOKENIZATIONS)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.json (or a model directory holding one) whose vocabulary to use, "
        "e.g. to fine-tune or score a trained model",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    if args.tokenization:
        overrides.append(f"--data.tokenization={args.tokenization}")
    try:
        config = load_config(args.config, overrides)
        summary = prepare_dataset(
            args.midi_dir,
            args.out or config.data.dataset_dir,
            config.data,
            workers=args.workers,
            progress=not args.no_progress,
            tokenizer=PolyTokenizer.load(args.tokenizer) if args.tokenizer else None,
        )
    except (ConfigError, PrepareError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
