"""MIDI folder -> validated, tokenized shards + manifest + report, in isolated worker processes.

    python -m polyphony.data.prepare MIDI_DIR --out DATASET_DIR [--config configs/x.yaml]
        [--workers N] [--tokenization remi|cpword] [--data.key=value ...]

The input is a folder of MIDI files nobody vetted. A 51-byte file can become half a million
tokens, a corrupt delta time can put a note 26,000 bars after the music, and a parser can stall
inside native code, where no Python signal reaches (LIBRARY_NOTES §6). So:

1. The parent walks the folder (.mid, .midi, .kar in any case; symlinked folders are not
   followed, so a link loop cannot trap the walk), hashes every file and drops exact duplicates.
2. Each new file goes to an isolated worker process with a deadline and a memory cap
   (``isolation.py``), which reads, validates and tokenizes it the way every reader of a
   user's file does (``midi_input.py``: strict parsing, lenient repair of out-of-range
   velocities and controller values, limits on ticks, notes, bars and tokens per note).
3. Every result, success or failure, is cached under ``DATASET_DIR/cache`` by content hash and
   tokenizer hash (``cache.py``), so a re-run processes only new files. The shards are then
   written from the cache in sha256 order (``shards.py``): the output bytes depend neither on
   the worker count nor on the cache.

Every skipped file gets one line in ``report.jsonl``: path, stage (read, validate, tokenize,
timeout, crash, memory, duplicate) and a reason naming the problem and what to do; a repaired
file gets one too (stage ``repaired``, with counts), and is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import TOKENIZATIONS, ConfigError, DataConfig, load_config
from ..instruments import instrument_name
from ..tokenizer import HEADER_FORMAT, PolyTokenizer
from .cache import FILE_LIMIT_FIELDS, PieceCache, write_text
from .isolation import run_in_process, run_isolated
from .midi_input import MIDI_SUFFIXES, MidiFile, PieceStats, Skip, Tokenized, limit_problem
from .shards import MANIFEST_FILE, ensure_validation, split_of, write_split

SPLITS = ("train", "validation", "test")
STAGES = ("read", "validate", "tokenize", "timeout", "crash", "memory", "duplicate")
REPORT_FILE = "report.jsonl"
FORMAT_VERSION = 1
# Everything that decides the dataset's content, recorded in the manifest. `workers` is not
# here: it changes the speed, never the bytes.
PREPARE_FIELDS = (
    "tokenization",
    *FILE_LIMIT_FIELDS,
    "validation_fraction",
    "test_fraction",
    "source_held_out",
    "min_validation_pieces",
    "note_order",
)


class PrepareError(RuntimeError):
    """The run cannot produce a dataset (no input folder, no MIDI files, nothing tokenizable)."""


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
    repaired: int = 0  # kept after clamping out-of-range values (report.jsonl says what)

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
        if self.repaired:
            lines.append(
                f"  repaired     {self.repaired:,} kept after clamping out-of-range values"
            )
            lines.extend(f"{'e.g.':>18} {_shorten(e)}" for e in self.examples["repaired"])
        lines.append(
            "  pieces       "
            + ", ".join(f"{s} {self.pieces[s]:,}" for s in SPLITS)
            + "  |  sources: "
            + _listing([(s or "(root)", n) for s, n in self.sources.items()])
        )
        lines.append(f"  tokens       {self.tokens:,}   music {self.hours:.2f} hours")
        top = list(self.instruments.items())
        lines.append(f"  instruments  {len(top)}: {_listing(top)}")
        if skipped or self.repaired:
            lines.append(
                f"  report       {self.out_dir / REPORT_FILE} (one line per skipped or repaired file)"
            )
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
    cache: PieceCache,
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
            run_in_process(jobs, tokenizer, data_config, on_result)
        else:
            run_isolated(jobs, tokenizer, data_config, workers, on_result)
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
    cache = PieceCache(out_dir, tokenizer, data_config)
    try:
        outcomes, processed = _process_new_files(
            unique, cache, tokenizer, data_config, workers, progress
        )
        members: dict[str, list[tuple[MidiFile, PieceStats]]] = {split: [] for split in SPLITS}
        for sha256 in sorted(unique):
            midi_file, outcome = unique[sha256], outcomes[sha256]
            if isinstance(outcome, PieceStats):
                # Limits may have changed since the entry was cached: apply today's.
                problem = limit_problem(
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
            if outcome.repaired:  # kept, and said so
                report.append(
                    {"path": midi_file.relpath, "stage": "repaired", "reason": outcome.repaired}
                )
            held_out = data_config.source_held_out.get(midi_file.source)
            split = split_of(
                sha256,
                held_out if held_out is not None else data_config.validation_fraction,
                held_out if held_out is not None else data_config.test_fraction,
            )
            members[split].append((midi_file, outcome))
        ensure_validation(members, data_config.min_validation_pieces)
        report.sort(key=lambda entry: entry["path"])

        out_dir.mkdir(parents=True, exist_ok=True)
        # The manifest is written last: a dataset folder without one is incomplete.
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        write_text(out_dir / REPORT_FILE, "".join(json.dumps(e) + "\n" for e in report))
        if not any(members.values()):
            examples = "; ".join(e for shown in _examples(report, 1).values() for e in shown)
            raise PrepareError(
                f"{midi_dir}: none of the {len(paths)} MIDI files could be tokenized "
                f"(see {out_dir / REPORT_FILE}), e.g. {examples}"
            )
        for split in SPLITS:
            write_split(out_dir / split, members[split], cache, tokenizer)
    finally:
        cache.close()
    tokenizer.save(out_dir)

    manifest = _manifest(midi_dir, tokenizer, data_config, len(paths), members, report)
    write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
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
        repaired=manifest["files"]["repaired"],
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
            "repaired": skipped["repaired"],
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
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse files with out-of-range velocities or controller values instead of "
        "clamping them (= --data.strict=true)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    if args.strict:
        overrides.append("--data.strict=true")
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
