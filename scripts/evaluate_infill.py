"""Infilling quality on held-out band pieces (issue: Infilling).

    python scripts/evaluate_infill.py --checkpoint checkpoints/polyphony-mini \
        --dataset data/dev --corpus corpus --out runs/infill-eval

Each held-out band piece (validation and test splits) gives up to ``--per-piece`` 16-bar
excerpts, every 8 bars, as in the full-parts evaluation (parts.band_excerpts); bars 7-10 of each
are written again, once for every track and once for its bass and drums only, with the suffix
in view (infilling) and without it (the continuation baseline: the same constraints, the model
sees only what comes before). Reported per setting: the share of requests whose notes outside
the region are the input's, the median ratio of each regenerated track's notes per bar in the
region to the original's (and the share within +-35 %), and the region's pitch-class entropy
and scale consistency against the original bars'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from symusic import Score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyphony.generation import load_checkpoint, sample_tokens, to_score  # noqa: E402
from polyphony.generation.common import (  # noqa: E402
    DEFAULT_GROOVE,
    DEFAULT_LOOP,
    DEFAULT_RECALL,
    DEFAULT_REGISTER,
    DEFAULT_STEER,
    DEFAULT_TOP_P,
)
from polyphony.generation.grammar import grammar_for  # noqa: E402
from polyphony.generation.infill import plan_infill  # noqa: E402
from polyphony.generation.sampling import Sampling, parse_field_temperature  # noqa: E402
from polyphony.instruments import DRUMS, program_to_instrument  # noqa: E402
from polyphony.metrics import (  # noqa: E402
    notes_by_instrument,
    piece_bar_lines,
    pitch_class_entropy,
    scale_consistency,
)
from polyphony.parts import band_excerpts, excerpt, report_family  # noqa: E402

FIRST, LAST, EXCERPT_BARS = 7, 10, 16


def outside_kept(original: Score, result: Score, begin: int, end: int) -> bool:
    def outside(score):
        return {
            i: [n for n in rows if not begin <= n[0] < end]
            for i, rows in notes_by_instrument(score).items()
        }

    a, b = outside(original), outside(result)
    return all(a.get(i, []) == b.get(i, []) for i in set(a) | set(b))


def region_counts(score: Score, begin: int, end: int) -> dict[int, int]:
    return {
        i: sum(begin <= n[0] < end for n in rows) for i, rows in notes_by_instrument(score).items()
    }


def evaluate(checkpoint, excerpts, tracks_of, look_ahead: bool, seed: int, sampling) -> dict:
    tokenizer = checkpoint.tokenizer
    grammar = grammar_for(tokenizer, "cpu")
    ratios: dict[str, list[float]] = {}
    kept, requests = [], 0
    metric_pairs = {"pitch_class_entropy": [], "scale_consistency": []}
    for index, (_, real) in enumerate(excerpts):
        tracks = tracks_of(real)
        if not tracks:
            continue
        original = tokenizer.decode(tokenizer.encode(real).ids)  # what the tokenizer keeps
        plan = plan_infill(
            tokenizer, grammar, checkpoint.densities, real, (FIRST, LAST), tracks, None, None,
            checkpoint.model.config.max_seq_len, look_ahead=look_ahead,
        )  # fmt: skip
        row = sample_tokens(checkpoint, plan, sampling, 1, seed + index)[0]
        result = to_score(tokenizer, row, plan)
        requests += 1
        region = excerpt(original, FIRST - 1, LAST - FIRST + 1)
        new_region = excerpt(result, FIRST - 1, LAST - FIRST + 1)
        if region is None:
            continue
        starts = piece_bar_lines(original)[0]
        begin, end = int(starts[FIRST - 1]), int(starts[LAST])
        kept.append(outside_kept(original, result, begin, end))
        before, after = region_counts(original, begin, end), region_counts(result, begin, end)
        for instrument in plan.infill.tracks:
            if before.get(instrument, 0) == 0:
                continue
            ratio = after.get(instrument, 0) / before[instrument]
            ratios.setdefault(report_family(instrument), []).append(ratio)
        for name, metric in (
            ("pitch_class_entropy", pitch_class_entropy),
            ("scale_consistency", scale_consistency),
        ):
            real_value = metric(region)
            new_value = metric(new_region) if new_region is not None else float("nan")
            if np.isfinite(real_value) and np.isfinite(new_value):
                metric_pairs[name].append((new_value, real_value))
    every = [r for values in ratios.values() for r in values]
    return {
        "requests": requests,
        "outside_kept": sum(kept) / max(len(kept), 1),
        "tracks": len(every),
        "median_ratio": statistics.median(every) if every else None,
        "within_35": sum(0.65 <= r <= 1.35 for r in every) / max(len(every), 1),
        "median_ratio_per_family": {f: statistics.median(v) for f, v in sorted(ratios.items())},
        "tracks_per_family": {f: len(v) for f, v in sorted(ratios.items())},
        **{
            name: {
                "generated": float(np.mean([g for g, _ in pairs])) if pairs else None,
                "real": float(np.mean([r for _, r in pairs])) if pairs else None,
            }
            for name, pairs in metric_pairs.items()
        },
    }


def bass_and_drums(score: Score) -> list[int]:
    present = {program_to_instrument(t.program, t.is_drum) for t in score.tracks if t.notes}
    return sorted(i for i in present if i == DRUMS or report_family(i) == "bass")


def format_table(results: dict) -> str:
    lines = [
        f"{'setting':<34}{'requests':>9}{'outside kept':>13}{'tracks':>7}{'median ratio':>13}"
        f"{'within 35%':>11}{'PCE gen/real':>16}{'SC gen/real':>16}"
    ]
    for setting, r in results.items():
        pce, sc = r["pitch_class_entropy"], r["scale_consistency"]
        lines.append(
            f"{setting:<34}{r['requests']:>9}{r['outside_kept']:>13.3f}{r['tracks']:>7}"
            f"{r['median_ratio'] or 0:>13.2f}{r['within_35']:>11.2f}"
            f"{pce['generated'] or 0:>8.3f}/{pce['real'] or 0:<7.3f}"
            f"{sc['generated'] or 0:>8.3f}/{sc['real'] or 0:<7.3f}"
        )
        families = ", ".join(
            f"{f} {v:.2f} ({r['tracks_per_family'][f]})"
            for f, v in r["median_ratio_per_family"].items()
        )
        lines.append(f"{'':<4}per family: {families}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--per-piece", type=int, default=4, help="16-bar excerpts per piece")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steer", type=float, default=DEFAULT_STEER)
    parser.add_argument("--recall", type=float, default=DEFAULT_RECALL)
    parser.add_argument("--register", type=float, default=DEFAULT_REGISTER)
    parser.add_argument("--loop", type=float, default=DEFAULT_LOOP)
    parser.add_argument("--groove", type=float, default=DEFAULT_GROOVE)
    parser.add_argument(
        "--field-temperature", metavar="F=T,...", default="", help="default: generate's"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sampling = Sampling(
        top_p=DEFAULT_TOP_P,
        steer=args.steer,
        recall=args.recall,
        register=args.register,
        loop=args.loop,
        groove=args.groove,
        field_temperature=parse_field_temperature(args.field_temperature),
    )
    checkpoint = load_checkpoint(args.checkpoint, "cpu")
    excerpts = band_excerpts(args.dataset, args.corpus, EXCERPT_BARS, args.per_piece, stride=8)
    results = {}
    for tracks_name, tracks_of in (
        ("all tracks", lambda score: sorted(notes_by_instrument(score))),
        ("bass + drums", bass_and_drums),
    ):
        for look_ahead, mode in ((True, "infill"), (False, "continuation baseline")):
            key = f"{tracks_name}, {mode}"
            results[key] = evaluate(
                checkpoint, excerpts, tracks_of, look_ahead, args.seed, sampling
            )
            print(key, json.dumps(results[key]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infill.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
