"""Training and KV-cache decoding speed of PolyphonyGPT against Hugging Face GPT-2 of equal shape.

    python benchmarks/model.py                      # configs/small.yaml, 512 new tokens
    python benchmarks/model.py --new-tokens 64      # quicker

Both models get the layers, width, heads and vocabulary of the config (REMI vocabulary of
polyphony's tokenizer), dropout 0, float32, the same thread count. Training = forward + backward
on a [batch, seq_len] window (no optimizer step). Decoding = greedy generation of N new tokens
after a prompt, prefill included: ours through setup_cache/prefill/decode_step, GPT-2 through
``generate(use_cache=True, do_sample=False, min_new_tokens=N, max_new_tokens=N)``.
Prints a table, then one JSON line with tokens/s and our/HF ratios. Needs the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from polyphony.config import load_config
from polyphony.instruments import GLOBAL_TRACK
from polyphony.model import PolyphonyGPT
from polyphony.tokenizer import PolyTokenizer


def build_models(config_path: str, max_positions: int):
    config = load_config(config_path).model
    tok = PolyTokenizer.build("remi")
    config.vocab_sizes, config.token_types = list(tok.vocab_sizes), list(tok.token_types)
    config.n_token_types, config.dropout = tok.n_token_types, 0.0
    ours = PolyphonyGPT(config)
    hf_config = GPT2Config(
        vocab_size=config.vocab_sizes[0], n_positions=max_positions, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    hf = GPT2LMHeadModel(hf_config)
    return ours, hf


def best_of_alternating(fn_ours, fn_hf, repeats: int) -> tuple[float, float]:
    """Fastest of ``repeats`` calls of each, after one warm-up call each. The two run in turn so
    that both see the same background load, and the minimum is the least-disturbed run."""
    times = {fn_ours: [], fn_hf: []}
    for fn in (fn_ours, fn_hf):
        fn()
    for _ in range(repeats):
        for fn in (fn_ours, fn_hf):
            times[fn].append(timeit(fn))
    return min(times[fn_ours]), min(times[fn_hf])


def train_tokens_per_s(ours, hf, batch: int, seq_len: int, repeats: int):
    ids = torch.randint(5, ours.config.vocab_sizes[0], (batch, seq_len))
    tracks = torch.randint(0, ours.config.n_tracks, (batch, seq_len))
    ours.train()
    hf.train()

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids, tracks, labels=ids, label_track_ids=tracks).loss.backward()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()

    seconds_ours, seconds_hf = best_of_alternating(step_ours, step_hf, repeats)
    return batch * seq_len / seconds_ours, batch * seq_len / seconds_hf


def decode_tokens_per_s(ours, hf, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    prompt = torch.randint(5, ours.config.vocab_sizes[0], (batch, prompt_len))
    prompt_tracks = torch.full_like(prompt, GLOBAL_TRACK)
    lengths = torch.full((batch,), prompt_len)
    ours.eval()
    hf.eval()

    @torch.inference_mode()
    def generate_ours():
        ours.setup_cache(batch, prompt_len + new_tokens)
        out = ours.prefill(prompt, prompt_tracks, lengths)
        for _ in range(new_tokens - 1):
            token = out.logits["next_token"].argmax(-1)
            track = out.logits["next_instrument"].argmax(-1)  # the model's own track guess
            out = ours.decode_step(token, track)

    @torch.inference_mode()
    def generate_hf():
        hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), use_cache=True, do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )  # fmt: skip

    seconds_ours, seconds_hf = best_of_alternating(generate_ours, generate_hf, repeats)
    return batch * new_tokens / seconds_ours, batch * new_tokens / seconds_hf


def matmul_ceiling_tokens_per_s(ours, batch: int, repeats: int) -> float:
    """Tokens/s if a decode step were nothing but the model's weight matmuls on ``[batch, in]``
    inputs: the ceiling for any float32 implementation of this shape (GPT-2 included)."""
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features) for m in linears}

    @torch.inference_mode()
    def one_step():
        for linear in linears:
            linear(inputs[linear.in_features])

    one_step()
    best = min(timeit(one_step) for _ in range(repeats * 20))
    return batch / best


def timeit(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, hf = build_models(args.config, max(args.train_seq_len, args.prompt_len + args.new_tokens))
    print(f"{'tokens/s':<34}{'polyphony':>12}{'HF GPT-2':>12}{'ratio':>8}", flush=True)
    rows = []
    ceilings = {}

    def report(name, ours_tps, hf_tps):
        rows.append((name, ours_tps, hf_tps))
        print(f"{name:<34}{ours_tps:>12,.0f}{hf_tps:>12,.0f}{ours_tps / hf_tps:>8.2f}", flush=True)

    report(
        f"train fwd+bwd B={args.train_batch} T={args.train_seq_len}",
        *train_tokens_per_s(ours, hf, args.train_batch, args.train_seq_len, args.repeats),
    )
    # Both models do the same matmuls; this says how close to the CPU's FLOP rate they run.
    train_gflops = rows[0][1] * ours.flops_per_token(args.train_seq_len) / 1e9
    print(f"{'  polyphony training GFLOP/s':<34}{train_gflops:>12,.1f}", flush=True)
    for batch in args.decode_batches:
        report(
            f"decode B={batch} +{args.new_tokens} tokens",
            *decode_tokens_per_s(ours, hf, batch, args.prompt_len, args.new_tokens, args.repeats),
        )
        ceiling = matmul_ceiling_tokens_per_s(ours, batch, args.repeats)
        print(f"{f'  ceiling B={batch}: weight matmuls only':<34}{ceiling:>12,.0f}", flush=True)
        ceilings[f"decode B={batch}"] = round(ceiling, 1)
    result = {
        "config": args.config,
        "params": {"polyphony": ours.num_parameters(), "hf_gpt2": hf.num_parameters()},
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "train_gflops_polyphony": round(train_gflops, 1),
        "decode_matmul_ceiling_tok_s": ceilings,
        "results": [
            {
                "case": name,
                "polyphony_tok_s": round(a, 1),
                "hf_tok_s": round(b, 1),
                "ratio": round(a / b, 3),
            }
            for name, a, b in rows
        ],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
