"""Worker processes that parse untrusted MIDI: a deadline, an address-space limit, and a fresh
process for every one that stalls, explodes or dies.

A parser can stall inside native code, where no Python signal reaches (LIBRARY_NOTES §6), so
each file goes to a worker *process* with a deadline (``data.file_timeout_s``) and an
address-space limit (``data.max_memory_mb`` beyond what the worker had mapped at start-up, so an
exploding file raises MemoryError instead of swapping the machine). The parent kills a worker
that misses its deadline and replaces one that dies (segfault, OOM kill).

Test hook: ``POLYPHONY_PREPARE_TEST_HOOK="action:glob[,action:glob]"`` makes a worker
misbehave on files whose name matches the glob: ``hang`` (sleeps for days), ``oom`` (allocates
more than ``data.max_memory_mb``) or ``segfault``. The tests use it to exercise the timeout,
memory and crash handling without a genuinely malicious file; unset, it does nothing.
"""

from __future__ import annotations

import faulthandler
import fnmatch
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

import psutil

from ..config import DataConfig
from ..tokenizer import PolyTokenizer
from .midi_input import MidiFile, Skip, Tokenized, process_file

TEST_HOOK_ENV = "POLYPHONY_PREPARE_TEST_HOOK"


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
            result = process_file(path, sha256, tokenizer, limits)
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


def run_isolated(
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


def run_in_process(jobs, tokenizer, limits, on_result) -> None:
    """workers=0: no isolation, no timeout, no memory guard. For debugging and benchmarks."""
    for job in jobs:
        on_result(job, process_file(str(job.path), job.sha256, tokenizer, limits))
