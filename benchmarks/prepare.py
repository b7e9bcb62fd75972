"""Ingestion speed and memory: polyphony.data.prepare (isolated / in-process) vs miditok.

    python benchmarks/prepare.py                         # corpus/ if built, else fixtures x20
    python benchmarks/prepare.py --fixtures --repeat 20  # tests/fixtures/midi, 20 copies each
    python benchmarks/prepare.py --corpus corpus/band --trials 1
    python benchmarks/prepare.py --fixtures --repeat 40 --tokenization cpword

Same files, same tokenizer, five ways:
  polyphony workers=0  prepare_dataset in this process (no timeout, no memory guard)
  polyphony workers=1  one isolated worker process (the guarded path)
  polyphony workers=2  two isolated workers
  miditok 1 / 2        ``DatasetMIDI(files, tokenizer.miditok, max_seq_len, pre_tokenize=True)``
                       with parallel_workers_size 1 / 2
polyphony's numbers include hashing, validation, the header and track ids, the cache and the
shards; miditok's only load + encode into memory. Each measurement runs in a fresh Python
process (imports excluded from the time), trials are interleaved so that a busy machine slows
all of them alike, and the median is reported. CPU seconds (user + system of the process and
its workers) are reported beside wall time: on a shared machine they are the steadier measure
of cost. Peak memory is the highest sum of PSS over the
process and its children (PSS, not RSS: forked workers share the parent's pages), sampled every
0.1 s. Without corpus/, the fixtures are repeated with a distinct track name per copy, so that
deduplication keeps every copy. Prints a table, then one JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from polyphony.data.midi_input import MIDI_SUFFIXES  # noqa: E402

METHODS = ("polyphony-w0", "polyphony-w1", "polyphony-w2", "miditok-w1", "miditok-w2")


class PeakMemory:
    """Highest total PSS of a process and its children, sampled from outside it (a sampling
    thread inside would compete with the measured work for the GIL)."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.process, self.interval_s, self.peak_mb = psutil.Process(pid), interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        total = 0
        try:
            tree = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        for process in tree:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def measure(method: str, corpus: Path, tokenization: str, max_seq_len: int) -> dict:
    """One timed run in this (fresh) process: seconds (imports excluded), files, outcome."""
    from polyphony.config import DataConfig
    from polyphony.data.prepare import prepare_dataset
    from polyphony.tokenizer import PolyTokenizer

    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)
    workers = int(method[-1])
    result = {"method": method, "files": len(files)}
    with tempfile.TemporaryDirectory() as out_dir:
        cpu_started = cpu_seconds()
        started = time.perf_counter()
        if method.startswith("polyphony"):
            config = DataConfig(tokenization=tokenization)
            summary = prepare_dataset(corpus, out_dir, config, workers=workers, progress=False)
            result.update(
                ok=summary.ok, skipped=sum(summary.skipped.values()), tokens=summary.tokens
            )
        else:
            from miditok.pytorch_data import DatasetMIDI

            tokenizer = PolyTokenizer.build(tokenization).miditok
            try:
                dataset = DatasetMIDI(
                    files,
                    tokenizer,
                    max_seq_len,
                    pre_tokenize=True,
                    parallel_workers_size=workers,
                )
                result.update(ok=len(dataset.samples), skipped=len(files) - len(dataset.samples))
            except Exception as err:  # one bad file stops miditok's whole run (LIBRARY_NOTES §6.2)
                result["error"] = f"{type(err).__name__}: {err}"[:200]
        result["seconds"] = time.perf_counter() - started
        result["cpu_seconds"] = cpu_seconds() - cpu_started
    return result


def repeated_fixtures(fixtures: Path, copies: int, into: Path) -> Path:
    """``copies`` distinct copies of every fixture: same music, a different track name."""
    from symusic import Score

    for path in sorted(p for p in fixtures.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES):
        score = Score(path)
        relative = path.relative_to(fixtures)
        for copy in range(copies):
            if score.tracks:
                score.tracks[0].name = f"copy {copy}"
            target = into / relative.parent / f"{relative.stem}_{copy:03d}.mid"
            target.parent.mkdir(parents=True, exist_ok=True)
            score.dump_midi(target)
    return into


def run_in_subprocess(method: str, args: argparse.Namespace, corpus: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        method,
        "--corpus",
        str(corpus),
        "--tokenization",
        args.tokenization,
        "--max-seq-len",
        str(args.max_seq_len),
    ]
    quiet = {**os.environ, "TQDM_DISABLE": "1"}  # miditok's progress bars
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quiet
    )
    with PeakMemory(child.pid) as memory:
        stdout, stderr = child.communicate()
    if child.returncode != 0:
        return {"method": method, "error": (stderr.strip().splitlines() or ["?"])[-1]}
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_mb": memory.peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, help="MIDI folder (default: corpus/ if it exists)")
    parser.add_argument(
        "--fixtures", action="store_true", help="use the repeated fixtures even if corpus/ exists"
    )
    parser.add_argument("--repeat", type=int, default=20, help="copies of each fixture file")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokenization", choices=["remi", "cpword"], default="remi")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.corpus, args.tokenization, args.max_seq_len)))
        return

    scratch = None
    corpus = args.corpus or (ROOT / "corpus")
    if args.fixtures or not corpus.is_dir():
        scratch = Path(tempfile.mkdtemp(prefix="polyphony_bench_"))
        corpus = repeated_fixtures(ROOT / "tests" / "fixtures" / "midi", args.repeat, scratch)
    try:
        for path in corpus.rglob("*"):  # warm the page cache so the first method is not penalised
            if path.is_file():
                path.read_bytes()
        runs: dict[str, list[dict]] = {method: [] for method in args.methods}
        for _ in range(args.trials):
            for method in args.methods:
                runs[method].append(run_in_subprocess(method, args, corpus))
    finally:
        if scratch:
            shutil.rmtree(scratch)

    rows = {}
    print(f"corpus {corpus if not scratch else f'fixtures x{args.repeat}'}, {args.tokenization}, "
          f"{args.trials} trial(s), {os.cpu_count()} CPUs, {platform.platform()}")  # fmt: skip
    print(f"{'method':<14} {'files':>6} {'ok':>6} {'wall s':>7} {'files/s':>8} "
          f"{'cpu s':>7} {'cpu ms/file':>11} {'peak MB':>8}")  # fmt: skip
    for method, trials in runs.items():
        good = [t for t in trials if "error" not in t]
        if not good:
            print(f"{method:<14} failed: {trials[0]['error']}")
            rows[method] = {"error": trials[0]["error"]}
            continue
        files = good[0]["files"]
        seconds = statistics.median(t["seconds"] for t in good)
        cpu = statistics.median(t["cpu_seconds"] for t in good)
        row = {
            "files": files,
            "ok": good[0]["ok"],
            "seconds": round(seconds, 3),
            "files_per_s": round(files / seconds, 1),
            "cpu_seconds": round(cpu, 3),
            "cpu_ms_per_file": round(1000 * cpu / files, 2),
            "peak_mb": round(max(t["peak_mb"] for t in good)),
        }
        rows[method] = row
        print(f"{method:<14} {files:>6} {row['ok']:>6} {seconds:>7.2f} {row['files_per_s']:>8.1f} "
              f"{cpu:>7.2f} {row['cpu_ms_per_file']:>11.2f} {row['peak_mb']:>8}")  # fmt: skip

    def ratio(a: str, b: str, key: str) -> float | None:
        if key in rows.get(a, {}) and key in rows.get(b, {}):
            return round(rows[a][key] / rows[b][key], 3)
        return None

    # Time ratios: isolation > 1 means the isolated run is slower; polyphony_speed > 1 means
    # polyphony is faster than miditok.
    ratios = {
        "isolation_w1_over_w0_wall": ratio("polyphony-w1", "polyphony-w0", "seconds"),
        "isolation_w1_over_w0_cpu": ratio("polyphony-w1", "polyphony-w0", "cpu_seconds"),
        "polyphony_speed_vs_miditok_w1": ratio("miditok-w1", "polyphony-w1", "seconds"),
        "polyphony_speed_vs_miditok_w2": ratio("miditok-w2", "polyphony-w2", "seconds"),
    }
    print(json.dumps({"results": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
