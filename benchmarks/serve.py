"""The studio's request time: a new piece through its HTTP API, eager and ``--compile``, on one
thread (``polyphony serve``'s default) and on torch's default (every core).

    python benchmarks/serve.py                 # 2 rounds of 3 requests per configuration
    python benchmarks/serve.py --rounds 1 --requests 2 --bars 8   # quicker

Each configuration runs in a child process of its own, as a server would: the thread count is
set before anything runs (inductor compiles its kernels for it) and ``create_app`` loads the
shipped model (and, with ``--compile``, compiles and traces the decode step). The child then
POSTs ``--requests`` requests of ``--bars`` bars of piano, bass and drums (seeds 1, 2, ...) to
``/api/generate`` through FastAPI's test client. Configurations alternate for ``--rounds``
rounds; the median request time is reported. Prints a table, then one JSON line. Needs the
``studio`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date

CONFIGS = [(False, 1), (True, 1), (False, 0), (True, 0)]  # (compile, threads; 0 = torch's default)


def child(compile: bool, threads: int, requests: int, bars: int) -> dict:
    """Start a studio app and time its requests (run in a fresh process)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from fastapi.testclient import TestClient

    from polyphony.serve import create_app

    start = time.perf_counter()
    client = TestClient(create_app(compile=compile))
    startup = time.perf_counter() - start
    seconds = []
    for seed in range(1, requests + 1):
        body = {"instruments": "piano, bass, drums", "bars": bars, "seed": seed}
        start = time.perf_counter()
        response = client.post("/api/generate", json=body)
        seconds.append(time.perf_counter() - start)
        response.raise_for_status()
    return {"startup_s": startup, "request_s": seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--bars", type=int, default=16)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)  # compile, threads
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(bool(args.child[0]), args.child[1], args.requests, args.bars)))
        return

    load_before = os.getloadavg()
    runs: dict[tuple[bool, int], list[dict]] = {config: [] for config in CONFIGS}
    for _ in range(args.rounds):
        for compile, threads in CONFIGS:
            command = [sys.executable, __file__, "--child", str(int(compile)), str(threads),
                       "--requests", str(args.requests), "--bars", str(args.bars)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[compile, threads].append(json.loads(done.stdout.splitlines()[-1]))
    rows = []
    for (compile, _), results in runs.items():
        seconds = [s for result in results for s in result["request_s"]]
        rows.append({
            "decoder": "--compile" if compile else "eager",
            "threads": results[0]["threads"],
            "median_request_s": round(statistics.median(seconds), 2),
            "startup_s": [round(result["startup_s"], 1) for result in results],
        })  # fmt: skip
    report = {
        "bars": args.bars,
        "requests_per_round": args.requests,
        "rows": rows,
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": date.today().isoformat(),
    }
    print(f"| decoder | threads | median request s ({args.bars} bars) | startup s |")
    print("| --- | ---: | ---: | --- |")
    for row in rows:
        startup = ", ".join(str(s) for s in row["startup_s"])
        print(f"| {row['decoder']} | {row['threads']} | {row['median_request_s']} | {startup} |")
    print(f"load average (1, 5, 15 min) before: {report['load_average_before']}, "
          f"after: {report['load_average_after']}")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
