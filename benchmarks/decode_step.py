"""One decode step of the shipped model, eager against ``--compile`` (``compile_decoder``).

    python benchmarks/decode_step.py --threads 1

What ``benchmarks/generate.py`` times as a whole, taken apart: ``PolyphonyGPT.decode_step``
alone (no grammar, no sampling), ``--steps`` calls after a 40-token prefill (``--prompts``: each
of these lengths, to see what the keys in the cache cost), batch 1 and 8. An
eager and a compiled copy of the model alternate for ``--rounds`` rounds; the median is
reported, so both see the same machine load. Then one profiled compiled generation ("piano,
bass, drums", 256 tokens) gives what Dynamo's guard check ("TorchDynamo Cache Lookup") costs per
step, and ``--profile N`` lists the N operations with the most self time in 100 compiled steps
at each batch size after the longest ``--prompts`` prefill (microseconds per call, calls per step;
inductor's own fused kernels count as one "## Call CompiledFxGraph", or each under its own name
with ``--kernels``: inductor's ``cpp.enable_kernel_profile``, which compiles again). Last, the parts of a whole compiled generation's step at
batch 1 and 8 (the same request, median of ``--rounds``): milliseconds in the model's
``decode_step``, the grammar's ``choose`` (masks, logit adjustments, sampling) and ``advance``
(row state), the rest of the decode loop, and the tensor operations each dispatches outside
the compiled graph (a profiled run of its own). The parts are timed by wrapping those methods
of their classes for the duration (REMI). Prints tables, then one JSON line (``--json FILE``
also writes it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile, record_function

from polyphony.generation import (
    Sampling,
    compile_decoder,
    load_checkpoint,
    make_plan,
    sample_tokens,
)
from polyphony.generation.common import MAX_BARS
from polyphony.generation.remi import RemiGrammar
from polyphony.model import PolyphonyGPT

REPO = Path(__file__).resolve().parents[1]
PROMPT = 40
PARTS = {"model": (PolyphonyGPT, "decode_step"), "choose": (RemiGrammar, "choose"),
         "advance": (RemiGrammar, "advance")}  # fmt: skip


def ready(model, batch: int, prompt: int = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh cache of ``batch`` rows after a ``prompt``-token prefill and 5 decode steps;
    returns the token and track ids every step then feeds."""
    model.setup_cache(batch, model.config.max_seq_len)
    ids = torch.randint(0, 300, (batch, prompt), generator=torch.Generator().manual_seed(0))
    tracks = torch.zeros(batch, prompt, dtype=torch.long)
    model.prefill(ids, tracks, torch.full((batch,), prompt), ("next_token",))
    token, track = torch.full((batch,), 5), torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(5):
            model.decode_step(token, track, ("next_token",))
    return token, track


def step_ms(model, batch: int, steps: int, prompt: int = PROMPT) -> float:
    """Milliseconds per ``decode_step`` of ``batch`` rows after a ``prompt``-token prefill."""
    token, track = ready(model, batch, prompt)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(steps):
            model.decode_step(token, track, ("next_token",))
    return (time.perf_counter() - start) / steps * 1e3


def top_ops(model, batch: int, n: int, prompt: int = PROMPT, steps: int = 100) -> list[dict]:
    """The ``n`` operations with the most self time over ``steps`` compiled decode steps after
    a ``prompt``-token prefill."""
    token, track = ready(model, batch, prompt)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model.decode_step(token, track, ("next_token",))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key[:70],
            "us_per_call": round(e.self_cpu_time_total / e.count, 1),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in events[:n]
    ]


def request(checkpoint):
    """The generation every whole-step measurement runs: 256 tokens of piano, bass and drums."""
    return make_plan(
        checkpoint.tokenizer, checkpoint.densities, instruments="piano, bass, drums",
        bars=MAX_BARS, max_tokens=256,
    )  # fmt: skip


@contextlib.contextmanager
def parts_timed(seconds: dict[str, float], label: bool = False):
    """While open, every call of a PARTS method adds its wall time to ``seconds[part]`` (and,
    with ``label``, opens a profiler range named after the part)."""
    originals = {part: getattr(cls, name) for part, (cls, name) in PARTS.items()}

    def timed(part, method):
        def call(*args, **kwargs):
            with record_function(part) if label else contextlib.nullcontext():
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    seconds[part] += time.perf_counter() - start

        return call

    for part, (cls, name) in PARTS.items():
        setattr(cls, name, timed(part, originals[part]))
    try:
        yield
    finally:
        for part, (cls, name) in PARTS.items():
            setattr(cls, name, originals[part])


def step_parts(checkpoint, batch: int, rounds: int) -> dict:
    """Milliseconds per step in each part of a whole generation (median of ``rounds``), and the
    tensor operations each dispatches per step (top-level aten calls; a compiled graph's own
    kernels are not aten calls)."""
    plan, sampling = request(checkpoint), Sampling(top_p=1.0)
    sample_tokens(checkpoint, plan, sampling, num_samples=batch, seed=1)  # compiled and warm
    per_round = []
    for seed in range(rounds):
        seconds = dict.fromkeys(PARTS, 0.0)
        with parts_timed(seconds):
            start = time.perf_counter()
            rows = sample_tokens(checkpoint, plan, sampling, num_samples=batch, seed=seed)
            total = time.perf_counter() - start
        steps = max(len(row) for row in rows) - len(plan.header)
        seconds["rest"] = total - sum(seconds.values())
        per_round.append({part: 1e3 * value / steps for part, value in seconds.items()})
    ms = {part: round(statistics.median(r[part] for r in per_round), 3) for part in per_round[0]}
    with parts_timed(dict.fromkeys(PARTS, 0.0), label=True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rows = sample_tokens(checkpoint, plan, sampling, num_samples=batch, seed=0)
    steps = max(len(row) for row in rows) - len(plan.header)
    ops = dict.fromkeys([*PARTS, "rest"], 0)
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent and parent.name.startswith("aten::")):
            continue
        while parent is not None and parent.name not in PARTS:
            parent = parent.cpu_parent
        ops[parent.name if parent is not None else "rest"] += 1
    return {
        "batch": batch, "ms": ms, "total_ms": round(sum(ms.values()), 3),
        "ops": {part: round(count / steps, 1) for part, count in ops.items()},
    }  # fmt: skip


def guard_us_per_step(checkpoint) -> float:
    """Microseconds of Dynamo's guard check per decode step of a compiled generation."""
    plan = request(checkpoint)
    sample_tokens(checkpoint, plan, Sampling(top_p=1.0), seed=1)  # compiled and warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample_tokens(checkpoint, plan, Sampling(top_p=1.0), seed=0)
    lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    return lookups[0].cpu_time_total / lookups[0].count if lookups else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "polyphony-mini"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--profile", type=int, default=0, help="list the N costliest operations")
    parser.add_argument(
        "--kernels", action="store_true", help="--profile names inductor's fused kernels"
    )
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[PROMPT],
        help="prefill lengths (the keys each step attends to, plus the steps taken)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint, "cpu")
    eager = checkpoint.model
    if max(args.prompts) + 5 + args.steps > eager.config.max_seq_len:
        parser.error(f"--prompts + --steps + 5 must fit the {eager.config.max_seq_len}-token cache")
    compiled = copy.deepcopy(eager)
    inductor_config.cpp.enable_kernel_profile = args.kernels
    compile_decoder(compiled)
    rows = []
    for batch in (1, 8):
        step_ms(compiled, batch, 5)  # compile for this batch size
        for prompt in args.prompts:
            times = {"eager": [], "compiled": []}
            for _ in range(args.rounds):
                times["eager"].append(step_ms(eager, batch, args.steps, prompt))
                times["compiled"].append(step_ms(compiled, batch, args.steps, prompt))
            eager_ms, compiled_ms = (statistics.median(times[k]) for k in ("eager", "compiled"))
            rows.append({
                "batch": batch, "prompt": prompt, "eager_ms": round(eager_ms, 3),
                "compiled_ms": round(compiled_ms, 3), "speedup": round(eager_ms / compiled_ms, 2),
            })  # fmt: skip
    checkpoint.model = compiled
    guard = guard_us_per_step(checkpoint)
    print("| batch | prefill | eager ms/step | compiled ms/step | eager / compiled |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = (r["batch"], r["prompt"], r["eager_ms"], r["compiled_ms"], f"{r['speedup']}x")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"Dynamo guard check per compiled step: {guard:.0f} us")
    longest = max(args.prompts)
    profiles = {b: top_ops(compiled, b, args.profile, longest) for b in (1, 8) if args.profile}
    for batch, ops in profiles.items():
        print(f"\ncompiled step, batch {batch}, prefill {longest}: costliest operations")
        print("| operation | us per call | calls per step |\n| --- | ---: | ---: |")
        for op in ops:
            print(f"| `{op['op']}` | {op['us_per_call']} | {op['calls_per_step']} |")
    parts = [step_parts(checkpoint, batch, args.rounds) for batch in (1, 8)]
    print("\nwhole compiled generation, per step: ms (tensor operations outside the graph)")
    print("| batch | " + " | ".join(PARTS) + " | rest | total ms |")
    print("| ---: |" + " ---: |" * (len(PARTS) + 2))
    for p in parts:
        cells = [f"{p['ms'][k]} ({p['ops'][k]})" for k in [*PARTS, "rest"]]
        print(f"| {p['batch']} | " + " | ".join(cells) + f" | {p['total_ms']} |")
    result = {
        "rows": rows,
        "parts": parts,
        "guard_us_per_step": round(guard, 1),
        "profile": profiles or None,
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
