"""Generate pieces with a model and compare them to the real validation pieces.

    python scripts/evaluate_model.py --checkpoint checkpoints/polyphony-mini \\
        --dataset data/dev --corpus corpus --pieces 100 --bars 8 --nll --out runs/eval-mini

Writes ``OUT/generated/*.mid`` (each carries its request marker), links the dataset's validation
pieces into ``OUT/reference/``, prints ``python -m polyphony.evaluate`` of the two side by side
and saves it as ``OUT/metrics.json``. ``--requests random`` (default) draws instrument lists
with a fixed seed (``polyphony.evaluate.random_request``: 1 to 4 common instruments, drums in
about half); ``--requests validation`` asks for the validation pieces' own instrument sets. With
``--nll`` it also scores the checkpoint on the validation split (``OUT/nll.json``).

``--parts`` runs the full-parts checks instead (polyphony/parts/), on 16-bar excerpts of the
held-out band pieces: generated vs real notes per bar per part and family (each family's gap
with its 5th-95th percentile over the held-out pieces drawn again with replacement, and the
training pieces' own excerpts against the same real ones), thin parts,
how each part repeats its phrases (recurrence 4 bars back, distinct pitches) and where it sits,
PCE/SC/GC and instrument fidelity; density controls; continuation (parts kept alive, and in
their register); arrangement (``OUT/parts.json``). ``--parts --shares 0.1 0.2`` runs no model:
how far the training pieces' own family medians sit from the held-out ones at each held-out
share, i.e. how much of a family gap a split of that size decides by itself:

    python scripts/evaluate_model.py --checkpoint checkpoints/polyphony-mini \
        --dataset data/dev --corpus corpus --parts --out runs/parts-mini
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polyphony import parts
from polyphony.evaluate import evaluate_model, format_nll, format_table, validation_nll
from polyphony.generation import (
    DEFAULT_GROOVE,
    DEFAULT_LOOP,
    DEFAULT_RECALL,
    DEFAULT_REGISTER,
    DEFAULT_STEER,
    DEFAULT_TOP_P,
    load_checkpoint,
    parse_field_temperature,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="prepared dataset")
    parser.add_argument("--corpus", type=Path, required=True, help="MIDI root it was prepared from")
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", choices=["random", "validation"], default="random")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--steer", type=float, default=DEFAULT_STEER, help="--parts: every check")
    parser.add_argument("--recall", type=float, default=DEFAULT_RECALL, help="--parts: every check")
    parser.add_argument(
        "--register", type=float, default=DEFAULT_REGISTER, help="--parts: every check"
    )
    parser.add_argument("--loop", type=float, default=DEFAULT_LOOP, help="--parts: every check")
    parser.add_argument("--groove", type=float, default=DEFAULT_GROOVE, help="--parts: every check")
    parser.add_argument(
        "--field-temperature", metavar="F=T,...", help="--parts: every check (default: generate's)"
    )
    parser.add_argument("--nll", action="store_true", help="also score the validation split")
    parser.add_argument("--parts", action="store_true", help="the full-parts checks instead")
    parser.add_argument("--per-piece", type=int, default=4, help="--parts: excerpts per piece")
    parser.add_argument(
        "--asked",
        choices=[a for a in parts.ASKED if a != "flat"],
        default="default",
        help="--parts requests: each part at its default density, or at what it plays in the "
        "real excerpt (the model's side of a gap apart from the default's)",
    )
    parser.add_argument("--samples", type=int, default=20, help="--parts: pieces per control")
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--requests-only", action="store_true", help="--parts: only the requests (sweeps)"
    )
    only.add_argument(
        "--checks-only",
        action="store_true",
        help="--parts: only control, continuation and arrangement (run beside --requests-only)",
    )
    only.add_argument(
        "--shares",
        type=float,
        nargs="+",
        metavar="SHARE",
        help="--parts: no model; the training pieces' family medians against the held-out ones "
        "if validation and test each held this share of the band pieces (OUT/shares.json)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.parts:
        run_parts(args)
        return

    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    report = evaluate_model(
        args.checkpoint, args.dataset, args.corpus, args.out, args.pieces, args.bars, args.seed,
        args.requests, sampling,
    )  # fmt: skip
    print(format_table(report))
    summary = {
        **report["protocol"],
        "generated": report["generated"]["metrics"],
        "reference": report["reference"]["metrics"],
        "gap_percent": report["gap_percent"],
        "fidelity": report["generated"].get("fidelity"),
    }
    if args.nll:
        nll = validation_nll(args.checkpoint, args.dataset)
        print(format_nll(nll))
        (args.out / "nll.json").write_text(json.dumps(nll, indent=2) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def run_parts(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.shares:
        table = parts.share_gaps(args.dataset, args.corpus, args.shares, 16, args.per_piece, 8)
        for share, row in table.items():
            gaps = "  ".join(f"{f} {g:+.0%}" for f, g in row["gap_per_family"].items())
            print(f"share {share}: {row['held_out_pieces']} held-out pieces  {gaps}")
        (args.out / "shares.json").write_text(json.dumps(table, indent=2) + "\n")
        return
    checkpoint = load_checkpoint(args.checkpoint)
    # 16-bar excerpts every 8 bars (they overlap by half), up to --per-piece per held-out band
    # piece long enough; continuation and arrangement take each piece's first excerpt.
    excerpts = parts.band_excerpts(args.dataset, args.corpus, 16, args.per_piece, stride=8)
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "steer": args.steer,
        "recall": args.recall,
        "register": args.register,
        "loop": args.loop,
        "groove": args.groove,
    }
    if args.field_temperature is not None:
        sampling["field_temperature"] = parse_field_temperature(args.field_temperature)
    report = {"excerpts": len(excerpts), "sampling": sampling, "asked": args.asked}
    if not args.checks_only:
        report["requests"] = parts.requests_from_excerpts(
            checkpoint, excerpts, 16, args.seed, args.asked, **sampling
        )
        # The training pieces cut the same way: what reproducing them would score.
        trained = parts.band_excerpts(
            args.dataset, args.corpus, 16, args.per_piece, stride=8, splits=("train",)
        )
        report["requests"]["training"] = {"median_per_family": parts.family_medians(trained, 16)}
    if not args.requests_only:
        firsts = parts.band_excerpts(args.dataset, args.corpus, 16, 1, stride=8)
        report["control"] = parts.control(checkpoint, 8, args.samples, args.seed, **sampling)
        report["continuation"] = parts.continuation(checkpoint, firsts, 4, 8, args.seed, **sampling)
        report["arrangement"] = parts.arrangement(checkpoint, firsts, args.seed, **sampling)
    if args.requests_only or args.checks_only:  # half a report: its figures as they are
        print(json.dumps(report, indent=1))
    else:
        print(parts.format_report(report))
    (args.out / "parts.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
