"""Training throughput and MFU: PolyphonyGPT against Hugging Face GPT-2 of equal size.

    python benchmarks/train.py                                   # configs/small.yaml, 2 x 1024
    python benchmarks/train.py --configs configs/small.yaml configs/base.yaml --seq-len 256
    python benchmarks/train.py --loop-dataset DATASET_DIR        # + polyphony's real training loop

A step is what the training loop does per optimizer step: forward, backward, gradient clipping
and an AdamW step, on random in-vocabulary windows of ``batch x seq_len`` tokens (ours with
random track ids and its configured heads, GPT-2 with its single LM head). Both models get the
layers, width, heads and REMI vocabulary of the config, dropout 0, the same thread count and
precision; steps of the two are interleaved, so a busy machine slows both alike, and the median
step is reported. ``--loop-dataset`` adds a row for ``polyphony.training.train`` itself
(accelerate, data loading, the global loss normalisation) on a prepared dataset.

MFU = tokens/s x training FLOPs per token / peak FLOP/s. FLOPs per token follow
``PolyphonyGPT.flops_per_token`` (6 N + 12 L D T; N = parameters doing matmuls, a tied token
table included), computed the same way for GPT-2. The peak is ``--peak-tflops`` when given (a
datasheet number), otherwise the best dense matmul throughput measured in this run at the same
precision: on a CPU there is no meaningful datasheet figure, so MFU there is relative to what
torch's matmul reaches on this machine. Prints a table, then one JSON line (also --json FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from polyphony.config import load_config  # noqa: E402
from polyphony.model import PolyphonyGPT  # noqa: E402
from polyphony.tokenizer import PolyTokenizer  # noqa: E402
from polyphony.tracking import read_metrics  # noqa: E402
from polyphony.training import train  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# train.mixed_precision values; "no" quoted, as YAML reads a bare no as false
PRECISION = {"fp32": "'no'", "bf16": "bf16"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul: the machine's practical dense peak at this precision."""
    torch_dtype = DTYPES[dtype] or torch.float32
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    best = 0.0
    for _ in range(repeats + 1):  # the first call warms up
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def build_models(config_path: str, seq_len: int):
    config = load_config(config_path).model
    tokenizer = PolyTokenizer.build("remi")
    config.vocab_sizes, config.token_types = (
        list(tokenizer.vocab_sizes),
        list(tokenizer.token_types),
    )
    config.n_token_types, config.dropout = tokenizer.n_token_types, 0.0
    ours = PolyphonyGPT(config)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config.vocab_sizes[0], n_positions=seq_len, n_embd=config.d_model,
            n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id, tie_word_embeddings=True,
        )
    )  # fmt: skip
    return config, ours, gpt2


def gpt2_flops_per_token(model: GPT2LMHeadModel, seq_len: int) -> int:
    """The formula of PolyphonyGPT.flops_per_token: the position table is a lookup only."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    cfg = model.config
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


def make_step(model, forward, device, dtype: str):
    """One optimizer step of ``model`` on a fixed batch; returns a callable."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[dtype])
        if DTYPES[dtype]
        else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict, rounds: int, device) -> dict[str, float]:
    """Median seconds per step of each callable; one warm-up step each, then ``rounds``
    rounds that run every callable once in turn."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def loop_tokens_per_s(
    config_path: str, dataset: str, batch: int, seq_len: int, steps: int, dtype: str
) -> float:
    """tokens/s that polyphony.training.train logs over ``steps`` steps after ``steps`` warm-up
    steps (evaluation and checkpoints are outside the timed window)."""
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [
            f"--data.dataset_dir={dataset}", f"--data.max_seq_len={seq_len}",
            f"--model.max_seq_len={seq_len}", "--model.dropout=0.0",
            f"--train.out_dir={out_dir}/run", f"--train.batch_size={batch}",
            f"--train.max_steps={2 * steps}", f"--train.log_every={steps}",
            f"--train.eval_every={10 * steps}", f"--train.save_every={10 * steps}",
            "--train.trackers=[csv]", f"--train.mixed_precision={PRECISION[dtype]}",
        ]  # fmt: skip
        train(load_config(config_path, overrides))
        return read_metrics(Path(out_dir) / "run" / "metrics.csv")[-1]["tokens_per_s"]


def measure_config(config_path: str, args, device: torch.device) -> list[dict]:
    """Rows (one per model) of tokens/s and FLOPs per token for one config."""
    config, ours, gpt2 = build_models(config_path, args.seq_len)
    ours, gpt2 = ours.to(device), gpt2.to(device)
    shape = (args.batch_size, args.seq_len)
    ids = torch.randint(0, config.vocab_sizes[0], shape, device=device)
    tracks = torch.randint(0, config.n_tracks, shape, device=device)
    steps = {
        "polyphony": make_step(
            ours, lambda: ours(ids, tracks, ids, tracks).loss, device, args.dtype
        ),
        "gpt2 (HF)": make_step(
            gpt2, lambda: gpt2(input_ids=ids, labels=ids).loss, device, args.dtype
        ),
    }
    seconds = time_interleaved(steps, args.rounds, device)
    flops = {
        "polyphony": ours.flops_per_token(args.seq_len),
        "gpt2 (HF)": gpt2_flops_per_token(gpt2, args.seq_len),
    }
    params = {
        "polyphony": ours.num_parameters(),
        "gpt2 (HF)": sum(p.numel() for p in gpt2.parameters()),
    }
    tokens_per_s = {name: args.batch_size * args.seq_len / s for name, s in seconds.items()}
    if args.loop_dataset:
        loop = "polyphony train()"
        tokens_per_s[loop] = loop_tokens_per_s(
            config_path, args.loop_dataset, args.batch_size, args.seq_len, args.rounds, args.dtype
        )
        seconds[loop] = args.batch_size * args.seq_len / tokens_per_s[loop]
        flops[loop], params[loop] = flops["polyphony"], params["polyphony"]
    return [
        {
            "config": Path(config_path).stem, "model": name, "parameters": params[name],
            "step_s": seconds[name], "tokens_per_s": tokens_per_s[name],
            "flops_per_token": flops[name],
        }
        for name in tokens_per_s
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/small.yaml"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--peak-tflops", type=float, help="datasheet peak; default: measured matmul"
    )
    parser.add_argument("--loop-dataset", help="prepared dataset: also time polyphony's train()")
    parser.add_argument("--json", help="also write the JSON result here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured_peak = matmul_peak(device, args.dtype)
    results = [row for path in args.configs for row in measure_config(path, args, device)]

    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak
    for row in results:
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak

    print(
        f"\n{device_name(device)} | {args.dtype} | batch {args.batch_size} x {args.seq_len} tokens | "
        f"peak {peak / 1e9:,.1f} GFLOP/s ({'given' if args.peak_tflops else 'measured matmul'})"
    )
    header = f"{'config':<8} {'model':<18} {'params':>10} {'step s':>8} {'tokens/s':>10} {'GFLOP/token':>12} {'MFU':>7}"
    print(header + "\n" + "-" * len(header))
    for row in results:
        print(
            f"{row['config']:<8} {row['model']:<18} {row['parameters'] / 1e6:>9.2f}M {row['step_s']:>8.2f} "
            f"{row['tokens_per_s']:>10,.0f} {row['flops_per_token'] / 1e9:>12.3f} {row['mfu']:>7.1%}"
        )
    ratios = {}
    for config_name in dict.fromkeys(row["config"] for row in results):
        by_model = {row["model"]: row for row in results if row["config"] == config_name}
        ratios[config_name] = (
            by_model["polyphony"]["tokens_per_s"] / by_model["gpt2 (HF)"]["tokens_per_s"]
        )
        print(f"{config_name}: polyphony / GPT-2 tokens/s = {ratios[config_name]:.2f}")
    summary = {
        "benchmark": "train", "date": date.today().isoformat(), "device": device_name(device),
        "torch": torch.__version__, "dtype": args.dtype, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "peak_flops": peak, "peak_source": "given" if args.peak_tflops else "measured matmul",
        "results": results, "tokens_per_s_ratio_polyphony_over_gpt2": ratios,
    }  # fmt: skip
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
