"""Generation speed: polyphony's constrained, KV-cached decoding against Hugging Face
``GPT2LMHeadModel.generate`` of the same size, and the peak memory of a CPU generation.

    python benchmarks/generate.py                        # configs/small.yaml, 256 new tokens
    python benchmarks/generate.py --new-tokens 64 --rounds 1   # quicker
    python benchmarks/generate.py --device cuda                # on a GPU (both models)
    python benchmarks/generate.py --no-compile --batches 1 8 32   # no torch.compile rows
    python benchmarks/generate.py --groove 0                   # without the drums' groove

Both models are randomly initialised with the config's layers, width and heads and the REMI
vocabulary (632 tokens), float32, dropout 0, the same thread count. Each generation samples
(temperature 1, no top-k / top-p) ``--new-tokens`` tokens after the instrument header of
"piano, bass, drums", prefill included:

* polyphony: ``polyphony.generation.sample_tokens`` (grammar and instrument constraints, per-row
  state, tqdm off) with a bar budget too large to end the piece, so it runs to the token cap
  (the closing rules end it within the last few tokens); eager, and with ``--compile``
  (``compile_decoder``: torch.compile of the whole decode step as one graph, compiled during the
  warm-up run, whose time is reported); CPWord rows for reference;
* GPT-2: ``generate(do_sample=True, top_k=0, min_new_tokens=N, max_new_tokens=N, use_cache=True)``.

notes/s counts the notes of the decoded output (GPT-2's unconstrained tokens are decoded by the
same, lenient, tokenizer). Rounds alternate between the models and batch sizes and the median is
reported, so all see the same machine load; batch 8 / batch 1 is the median of each round's ratio.
Peak RSS is the peak resident memory (``VmHWM``) of a child process that imports polyphony, builds
the model and generates once (batch 1). A second child writes a long piece with the shipped
checkpoint as a user would (``LONG_PIECE``, default sampling, seed 0) and reports its wall time and
peak RSS. Prints a table, then one JSON line
(``--json FILE`` also writes it). Needs the ``bench`` extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from polyphony.config import CPWORD_FIELDS, load_config
from polyphony.densities import DensityStats
from polyphony.generation import (
    Checkpoint,
    Sampling,
    compile_decoder,
    load_checkpoint,
    make_plan,
    sample_tokens,
    to_score,
)
from polyphony.generation.common import DEFAULT_GROOVE, MAX_BARS
from polyphony.instruments import DRUMS
from polyphony.model import PolyphonyGPT
from polyphony.tokenizer import DecodeError, PolyTokenizer, note_count

REPO = Path(__file__).resolve().parents[1]
INSTRUMENTS = "piano, bass, drums"
# Random-weight models have no training data: these notes per bar only fill the header.
DENSITIES = DensityStats.measure({0: [8.0], 33: [5.0], DRUMS: [14.0]})
# The long request: 64 bars of four instruments with the shipped model.
LONG_PIECE = {"instruments": "piano, bass, drums, strings", "bars": 64}
EAGER, COMPILED = "polyphony (REMI)", "polyphony (REMI, --compile)"
HF, CPWORD = "HF GPT-2 generate", "polyphony (CPWord)"


def build_ours(config_path: str, kind: str, device: str = "cpu") -> Checkpoint:
    config = load_config(config_path).model
    tokenizer = PolyTokenizer.build(kind)
    config.tokenization, config.dropout = kind, 0.0
    config.vocab_sizes, config.token_types = (
        list(tokenizer.vocab_sizes),
        list(tokenizer.token_types),
    )
    config.n_token_types = tokenizer.n_token_types
    if kind == "cpword":
        config.heads = {name: 1.0 for name in CPWORD_FIELDS}
    torch.manual_seed(0)
    model = PolyphonyGPT(config).eval().to(device)
    return Checkpoint(model=model, tokenizer=tokenizer, densities=DENSITIES)


def build_hf(config_path: str, tokenizer: PolyTokenizer, device: str = "cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = load_config(config_path).model
    hf_config = GPT2Config(
        vocab_size=tokenizer.vocab_sizes[0], n_positions=config.max_seq_len, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(hf_config).eval().to(device)


def run_ours(
    checkpoint: Checkpoint, batch: int, new_tokens: int, seed: int, groove: float = DEFAULT_GROOVE
) -> tuple[float, int, int]:
    """(seconds, new tokens, notes) of one batched generation; ``groove``: Sampling.groove."""
    plan = make_plan(
        checkpoint.tokenizer,
        DENSITIES,
        instruments=INSTRUMENTS,
        bars=MAX_BARS,
        max_tokens=new_tokens,
    )
    start = time.perf_counter()
    # No top-p, as GPT-2 below: the same sampling work on both sides.
    sampling = Sampling(top_p=1.0, groove=groove)
    rows = sample_tokens(checkpoint, plan, sampling, num_samples=batch, seed=seed)
    seconds = time.perf_counter() - start
    tokens = sum(len(row) - len(plan.header) for row in rows)
    notes = sum(note_count(to_score(checkpoint.tokenizer, row, plan)) for row in rows)
    return seconds, tokens, notes


def run_hf(model, tokenizer: PolyTokenizer, batch: int, new_tokens: int, seed: int):
    prompt = make_plan(tokenizer, DENSITIES, instruments=INSTRUMENTS).header  # the same header
    device = model.device
    header = torch.as_tensor(prompt, device=device)[None].expand(batch, -1)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            header, attention_mask=torch.ones_like(header), do_sample=True, top_k=0,
            min_new_tokens=new_tokens, max_new_tokens=new_tokens, use_cache=True,
        )  # fmt: skip
    if device.type == "cuda":  # generate() returns before the GPU is done
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    notes = 0
    for row in output.cpu().numpy():
        try:
            notes += note_count(tokenizer.decode(row))
        except DecodeError:
            pass
    return seconds, (output.shape[1] - header.shape[1]) * batch, notes


def measure(runs: dict, rounds: int) -> dict:
    """Alternate the runs ``rounds`` times after a warm-up; median seconds per run, and each
    round's tokens/s (for ratios of runs taken in the same round)."""
    warm_up = {}
    for name, run in runs.items():
        warm_up[name] = run(seed=0)[0]
    samples = {name: [] for name in runs}
    for round_ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run(seed=round_ + 1))
    results = {}
    for name, values in samples.items():
        seconds, tokens, notes = sorted(values)[len(values) // 2]
        results[name] = {
            "seconds": round(seconds, 3),
            "new_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "notes_per_s": round(notes / seconds, 1),
            "warm_up_seconds": round(warm_up[name], 2),  # includes compilation
            "rounds_tokens_per_s": [round(t / s, 1) for s, t, _ in values],
        }
    return results


def peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM belongs to the process image: ru_maxrss also
    counts the parent's memory at fork time (Linux keeps it across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def long_piece() -> dict:
    """Generate LONG_PIECE with the shipped checkpoint (run in a fresh process)."""
    checkpoint = load_checkpoint(None, "cpu")
    plan = make_plan(checkpoint.tokenizer, checkpoint.densities, **LONG_PIECE)
    start = time.perf_counter()
    (row,) = sample_tokens(checkpoint, plan, Sampling(), seed=0)
    seconds = time.perf_counter() - start
    return {
        **LONG_PIECE,
        "seconds": round(seconds, 2),
        "new_tokens": len(row) - len(plan.header),
        "notes": note_count(to_score(checkpoint.tokenizer, row, plan)),
        "peak_rss_mb": round(peak_rss_kib() / 1024, 1),
    }


def in_child(config: str, new_tokens: int, threads: int | None, child: str) -> dict:
    """Run ``--child CHILD`` in a fresh process (its peak memory is its own); its last line."""
    command = [sys.executable, __file__, "--config", config, "--new-tokens", str(new_tokens),
               "--child", child] + (["--threads", str(threads)] if threads else [])  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def machine(load_before: tuple[float, ...], device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": date.today().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "small.yaml"))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--groove", type=float, default=DEFAULT_GROOVE, help="the drums' groove (0: its cost off)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both models run")
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the --compile rows (no torch.compile)"
    )
    parser.add_argument("--child", choices=["rss", "long"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "rss":  # the measured process of peak_rss_mb_cpu_generation
        run_ours(build_ours(args.config, "remi"), 1, args.new_tokens, seed=0)
        print(json.dumps({"peak_rss_mb": round(peak_rss_kib() / 1024, 1)}))
        return
    if args.child == "long":
        print(json.dumps(long_piece()))
        return

    load_before = os.getloadavg()  # 1, 5 and 15 minutes: was the machine idle?
    remi = build_ours(args.config, "remi", args.device)
    cpword = build_ours(args.config, "cpword", args.device)
    compiled = None
    if not args.no_compile:
        compiled = build_ours(args.config, "remi", args.device)  # same weights (same seed)
        compile_decoder(compiled.model)
    hf = build_hf(args.config, remi.tokenizer, args.device)
    n = args.new_tokens
    # Every batch size in the same rounds: this VM's speed swings by up to 2x within minutes, so
    # batch 8 / batch 1 is the median of ratios taken a few seconds apart.
    runs = {}
    for batch in args.batches:
        runs |= {
            (EAGER, batch): lambda seed, b=batch: run_ours(remi, b, n, seed, args.groove),
            (HF, batch): lambda seed, b=batch: run_hf(hf, remi.tokenizer, b, n, seed),
            (COMPILED, batch): lambda seed, b=batch: run_ours(compiled, b, n, seed, args.groove),
            (CPWORD, batch): lambda seed, b=batch: run_ours(cpword, b, n, seed, args.groove),
        }
        if compiled is None:
            del runs[COMPILED, batch]
    results = measure(runs, args.rounds)
    rows = [{"implementation": name, "batch": batch, **r} for (name, batch), r in results.items()]
    ratios = {
        f"batch_{batch}": {
            kind: round(
                results[name, batch]["tokens_per_s"] / results[HF, batch]["tokens_per_s"], 2
            )
            for kind, name in (("eager", EAGER), ("compiled", COMPILED))
            if (name, batch) in results
        }
        for batch in args.batches
    }
    batch_ratios = {}
    if {1, 8} <= set(args.batches):
        for name in (EAGER,) if compiled is None else (EAGER, COMPILED):
            per_round = [
                eight / one
                for one, eight in zip(
                    results[name, 1]["rounds_tokens_per_s"], results[name, 8]["rounds_tokens_per_s"],
                    strict=True,
                )
            ]  # fmt: skip
            batch_ratios[name] = round(statistics.median(per_round), 2)

    report = {
        "config": Path(args.config).name,
        "groove": args.groove,
        "parameters": {
            "polyphony": remi.model.num_parameters(),
            "hf_gpt2": sum(p.numel() for p in hf.parameters()),
        },
        "new_tokens": n,
        "rows": rows,
        "ratio_tokens_per_s_polyphony_over_hf": ratios,
        "batch_8_over_batch_1": batch_ratios,
        "peak_rss_mb_cpu_generation": in_child(args.config, n, args.threads, "rss")["peak_rss_mb"],
        "long_piece": in_child(args.config, n, args.threads, "long"),
        "machine": machine(load_before, args.device),
    }
    print("| implementation | batch | new tokens | seconds | tokens/s | notes/s | warm-up s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['implementation']} | {row['batch']} | {row['new_tokens']} | "
            f"{row['seconds']:.2f} | {row['tokens_per_s']:.1f} | {row['notes_per_s']:.1f} | "
            f"{row['warm_up_seconds']:.1f} |"
        )
    for batch, ratio in ratios.items():
        print(
            f"polyphony / HF tokens/s at {batch.replace('_', ' ')}: "
            + ", ".join(f"{value:.2f}x ({kind})" for kind, value in ratio.items())
        )
    for name, ratio in batch_ratios.items():
        print(f"{name} batch 8 / batch 1 tokens/s (median of the rounds' ratios): {ratio:.2f}x")
    print(f"peak RSS of a CPU generation: {report['peak_rss_mb_cpu_generation']} MiB")
    long = report["long_piece"]
    print(
        f"{long['bars']} bars of {long['instruments']} (shipped model): {long['seconds']} s, "
        f"{long['new_tokens']} tokens, {long['notes']} notes, peak RSS {long['peak_rss_mb']} MiB"
    )
    print(f"load average (1, 5, 15 min) before: {report['machine']['load_average_before']}, "
          f"after: {report['machine']['load_average_after']}")  # fmt: skip
    line = json.dumps(report)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
