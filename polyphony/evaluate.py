"""Measure a folder of generated MIDI, optionally beside a folder of real MIDI; and a model's
validation NLL per head on a prepared dataset.

    python -m polyphony.evaluate GENERATED_DIR [--reference REAL_DIR] [--json out.json]
    python -m polyphony.evaluate --nll CHECKPOINT_DIR --dataset DATASET_DIR [--split validation]

Prints one row per metric (generated mean ± std; with ``--reference`` also the reference mean ±
std and the relative gap) and writes the full report, per piece included, as JSON. Metrics are
defined in :mod:`polyphony.metrics`; a generated set whose files carry the generation request
also gets instrument fidelity. Files that cannot be read are listed and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from polyphony.config import CPWORD_FIELDS
from polyphony.instruments import DRUMS
from polyphony.metrics import PieceMetricsHook, compute_folder_metrics

LABELS = {
    "pitch_class_entropy": "pitch class entropy (bits)",
    "scale_consistency": "scale consistency",
    "groove_consistency": "groove consistency",
    "polyphony": "polyphony (pitches sounding)",
    "note_density": "note density (notes/bar)",
    "empty_bar_rate": "empty-bar rate",
    "n_instruments": "instruments per piece",
    "n_bars": "length (bars)",
}

# Failures listed on screen; the JSON report has all of them.
MAX_FAILURES_SHOWN = 20


def evaluate(
    generated: str | Path,
    reference: str | Path | None = None,
    extra_piece_metrics: PieceMetricsHook | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"generated": folder report, "reference": folder report | None, "gap_percent": ...}``.

    ``extra_piece_metrics`` is applied to both folders (see ``compute_folder_metrics``);
    ``gap_percent[name]`` is the relative difference of the generated mean from the reference
    mean, in percent, None where it is undefined.
    """
    report: dict[str, Any] = {
        "generated": compute_folder_metrics(generated, extra_piece_metrics, progress),
        "reference": None,
        "gap_percent": None,
    }
    if reference is not None:
        real = compute_folder_metrics(reference, extra_piece_metrics, progress)
        report["reference"] = real
        report["gap_percent"] = {
            name: relative_gap(summary["mean"], real["metrics"].get(name, {}).get("mean"))
            for name, summary in report["generated"]["metrics"].items()
        }
    return report


def validation_nll(
    checkpoint: str | Path,
    dataset_dir: str | Path,
    split: str = "validation",
    batch_size: int = 8,
    max_windows: int | None = None,
    track_densities: bool = True,
) -> dict[str, Any]:
    """Mean NLL (nats) and perplexity per head over the fixed, unaugmented windows of ``split``,
    each head averaged over its own targets (as in training). Also NLL per note for the token
    heads, which makes REMI and CPWord comparable.

    Only the body is scored: targets up to the header's SEP are left out. The header is the
    request in generation, given, not predicted; scoring it would charge a model with density
    bins for predicting them and compare it unfairly with one without. ``track_densities``
    must match the training run's ``data.track_densities``.

    REMI models also get ``by_kind``: the next_token NLL split by the kind of token predicted
    (Bar, Position, Program, Pitch, ...), each as nats per note, so that they sum to the head's
    NLL per note and two models can be told apart by *what* they predict worse."""
    import torch

    from polyphony.data.dataset import WindowDataset, tokenizer_of
    from polyphony.model import PolyphonyGPT
    from polyphony.tokenizer import PolyTokenizer

    model = PolyphonyGPT.from_pretrained(checkpoint).eval()
    model_tokenizer = PolyTokenizer.load(checkpoint)
    if tokenizer_of(dataset_dir).hash != model_tokenizer.hash:
        raise ValueError(
            f"{dataset_dir} was prepared with another tokenizer than {checkpoint}: prepare it "
            f"again with the checkpoint's tokenizer.json"
        )
    dataset = WindowDataset(
        dataset_dir, split, model.config.max_seq_len, augment=False,
        track_densities=track_densities,
    )  # fmt: skip
    n_windows = len(dataset) if max_windows is None else min(len(dataset), max_windows)
    heads = list(model.config.heads)
    sums = torch.zeros(len(heads), dtype=torch.float64)
    counts = torch.zeros(len(heads), dtype=torch.long)
    notes = 0
    kind_of = None  # REMI: the kind of each token id ("Pitch" of "Pitch_60"), for by_kind
    if model_tokenizer.kind == "remi":
        names = [
            model_tokenizer.token_name(i).split("_")[0] for i in range(model.config.vocab_sizes[0])
        ]
        kinds = sorted(set(names))
        kind_of = torch.tensor([kinds.index(name) for name in names])
        kind_sums = torch.zeros(len(kinds), dtype=torch.float64)
        kind_counts = torch.zeros(len(kinds), dtype=torch.long)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(n_windows)), batch_size=batch_size
    )
    with torch.no_grad():
        for batch in loader:
            first = (
                batch["input_ids"] if model_tokenizer.kind == "remi" else batch["input_ids"][..., 0]
            )
            header_end = (first == model_tokenizer.sep_id).int().argmax(dim=1)  # SEP's position
            in_header = torch.arange(first.shape[1])[None] < header_end[:, None]
            batch["labels"][in_header] = -100
            batch["label_track_ids"][in_header] = -100
            output = model(**batch)
            count = model.target_counts(batch["labels"], batch["label_track_ids"])
            sums += torch.stack([output.losses[h].double() for h in heads]) * count
            counts += count
            notes += int(model_tokenizer.note_mask(batch["labels"].numpy()).sum())
            if kind_of is not None:
                scored = batch["labels"] != -100
                losses = torch.nn.functional.cross_entropy(
                    output.logits["next_token"][scored], batch["labels"][scored], reduction="none"
                )
                kind = kind_of[batch["labels"][scored]]
                kind_sums += torch.bincount(kind, losses.double(), minlength=len(kinds))
                kind_counts += torch.bincount(kind, minlength=len(kinds))
    result: dict[str, Any] = {"split": split, "windows": n_windows, "notes": notes, "heads": {}}
    for head, total, count in zip(heads, sums.tolist(), counts.tolist(), strict=True):
        mean = total / max(count, 1)
        result["heads"][head] = {
            "nll": mean,
            "ppl": math.exp(min(mean, 50.0)),
            "targets": count,
            "nll_per_note": total / notes if notes else None,
        }
    if kind_of is not None and notes:
        result["by_kind"] = {
            kind: {"nll_per_note": total / notes, "targets": count}
            for kind, total, count in zip(
                kinds, kind_sums.tolist(), kind_counts.tolist(), strict=True
            )
            if count
        }
    # The likelihood of the token stream itself: REMI's next_token head, or the sum of CPWord's
    # field heads (a compound's fields are one event). Auxiliary heads are left out.
    stream_heads = [h for h in heads if h == "next_token" or h in CPWORD_FIELDS]
    result["stream_nll_per_note"] = (
        sum(float(sums[heads.index(h)]) for h in stream_heads) / notes if notes else None
    )
    return result


def format_nll(result: dict[str, Any]) -> str:
    lines = [f"{result['split']}: {result['windows']} windows, {result['notes']} notes"]
    lines.append(f"{'head':<18}{'NLL (nats)':>12}{'perplexity':>12}{'NLL/note':>10}{'targets':>10}")
    for head, row in result["heads"].items():
        per_note = f"{row['nll_per_note']:.3f}" if row["nll_per_note"] is not None else "-"
        lines.append(
            f"{head:<18}{row['nll']:>12.4f}{row['ppl']:>12.2f}{per_note:>10}{row['targets']:>10}"
        )
    if result.get("stream_nll_per_note") is not None:
        lines.append(f"token stream NLL per note: {result['stream_nll_per_note']:.3f} nats")
    if result.get("by_kind"):
        lines.append("next_token NLL per note by the kind of token predicted:")
        ranked = sorted(result["by_kind"].items(), key=lambda item: -item[1]["nll_per_note"])
        for kind, row in ranked:
            lines.append(f"  {kind:<16}{row['nll_per_note']:>10.3f}{row['targets']:>10}")
    return "\n".join(lines)


# Instruments the development corpus has plenty of (docs/data.md): the lists a user asks for
# most, rather than all 129, most of which the corpus barely holds.
REQUEST_POOL = (0, 4, 19, 24, 25, 27, 29, 30, 32, 33, 38, 40, 41, 42, 48, 52, 56, 57, 60, 65, 71,
                73, 80, 81, 89)  # fmt: skip


def random_request(rng: random.Random) -> list[int]:
    """1 to 3 pitched instruments of REQUEST_POOL, plus drums or one more (drums in half)."""
    pitched = rng.sample(REQUEST_POOL, rng.randint(1, 3))
    extra = [DRUMS] if rng.random() < 0.5 else rng.sample(REQUEST_POOL, 1)
    return sorted(set(pitched + extra))


def split_pieces(dataset_dir: str | Path, split: str = "validation") -> list[dict[str, Any]]:
    """The records (path, source, instruments, ...) of every piece of a prepared split."""
    lines = (Path(dataset_dir) / split / "pieces.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def split_requests(dataset_dir: str | Path, split: str = "validation") -> list[list[int]]:
    """The instrument set of every piece of a prepared split, in order."""
    return [sorted(piece["instruments"]) for piece in split_pieces(dataset_dir, split)]


def evaluate_model(
    checkpoint: str | Path,
    dataset_dir: str | Path,
    corpus_dir: str | Path,
    out_dir: str | Path,
    pieces: int = 100,
    bars: int = 8,
    seed: int = 0,
    requests: str = "random",
    sampling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate ``pieces`` pieces of ``bars`` bars into ``OUT/generated`` and measure them against
    the real pieces of the dataset's validation split (linked into ``OUT/reference``).

    ``requests="random"`` draws instrument lists with :func:`random_request` (seed ``seed``);
    ``"validation"`` cycles through the validation pieces' own instrument sets, so that both
    sides ask for the same instruments. ``sampling`` holds generate()'s temperature/top_k/top_p.
    """
    from polyphony.generation import generate, load_checkpoint, write_midi

    out = Path(out_dir)
    generated, reference = out / "generated", out / "reference"
    generated.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    real_pieces = split_pieces(dataset_dir)
    if requests == "random":
        rng = random.Random(seed)
        lists = [random_request(rng) for _ in range(pieces)]
    elif requests == "validation":
        real_sets = [sorted(piece["instruments"]) for piece in real_pieces]
        lists = [real_sets[index % len(real_sets)] for index in range(pieces)]
    else:
        raise ValueError(f"requests={requests!r}: expected 'random' or 'validation'")
    model = load_checkpoint(checkpoint)
    for index, request in enumerate(lists):
        score = generate(
            instruments=[str(i) for i in request],
            bars=bars,
            seed=seed * 100_000 + index,
            checkpoint=model,
            **(sampling or {}),
        )
        write_midi(score, generated / f"piece_{index:03d}.mid")
    for piece in real_pieces:
        relative = piece["path"]
        link = reference / relative.replace("/", "__")
        if not link.exists():
            link.symlink_to((Path(corpus_dir) / relative).resolve())
    report = evaluate(generated, reference, progress=False)
    report["protocol"] = {
        "checkpoint": str(checkpoint),
        "pieces": pieces,
        "bars": bars,
        "seed": seed,
        "requests": requests,
        "sampling": sampling or {},
    }
    return report


def relative_gap(generated_mean: float | None, reference_mean: float | None) -> float | None:
    """(generated - reference) / |reference| in percent; None without both or for reference 0."""
    if generated_mean is None or reference_mean is None or reference_mean == 0:
        return None
    return 100 * (generated_mean - reference_mean) / abs(reference_mean)


def _mean_std(summary: dict[str, Any] | None) -> str:
    if not summary or summary["mean"] is None:
        return "-"
    if summary["std"] is None:  # a pooled value: one number over all pieces
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _count(summary: dict[str, Any] | None) -> str:
    return str(summary["n"]) if summary else "-"


def _gap(generated: dict[str, Any] | None, reference: dict[str, Any] | None) -> str:
    if not generated or not reference:
        return "-"
    gap = relative_gap(generated["mean"], reference["mean"])
    return "-" if gap is None else f"{gap:+.1f}%"


def _rows(report: dict[str, Any]) -> list[tuple[str, dict | None, dict | None]]:
    """(label, generated summary, reference summary) for every row of the table."""
    generated, reference = report["generated"], report["reference"]
    real_metrics = reference["metrics"] if reference else {}
    rows = [
        (LABELS.get(name, name.replace("_", " ")), summary, real_metrics.get(name))
        for name, summary in generated["metrics"].items()
    ]
    # Pitch spans of the instruments the generated pieces play (a corpus may hold dozens more).
    real_ranges = reference["pitch_range"] if reference else {}
    for instrument, ranges in generated["pitch_range"].items():
        real_span = real_ranges[instrument]["span"] if instrument in real_ranges else None
        rows.append((f"pitch span: {ranges['instrument']}", ranges["span"], real_span))
    fidelity = generated["fidelity"]
    if fidelity is not None:
        for kind in ("precision", "recall"):
            rows.append((f"instrument {kind} (macro)", fidelity["macro"][kind], None))
        for kind in ("precision", "recall"):
            pooled = {"mean": fidelity["micro"][kind], "std": None, "n": fidelity["n_pieces"]}
            rows.append((f"instrument {kind} (micro)", pooled, None))
    return rows


def _folder_line(role: str, folder: dict[str, Any]) -> str:
    skipped = len(folder["failed"])
    note = f"; {skipped} unreadable file{'s' if skipped != 1 else ''} skipped" if skipped else ""
    return f"{role}: {folder['folder']} ({folder['n_pieces']} pieces{note})"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table, one metric per row, then the skipped files."""
    generated, reference = report["generated"], report["reference"]
    header = ["metric", "generated", "n"]
    if reference:
        header += ["reference", "n", "gap"]
    table = [header]
    for label, gen, real in _rows(report):
        row = [label, _mean_std(gen), _count(gen)]
        if reference:
            row += [_mean_std(real), _count(real), _gap(gen, real)]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [_folder_line("generated", generated)]
    if reference:
        lines.append(_folder_line("reference", reference))
    lines.append("")
    for index, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    if generated["fidelity"] is None:
        lines.append(
            "(no instrument fidelity: no generated file carries a 'polyphony:instruments=' marker)"
        )
    for role, folder in (("generated", generated), ("reference", reference)):
        if not folder or not folder["failed"]:
            continue
        lines.append(f"\nskipped in {role} ({folder['folder']}):")
        for failure in folder["failed"][:MAX_FAILURES_SHOWN]:
            lines.append(f"  {failure['file']}: {failure['error']}")
        hidden = len(folder["failed"]) - MAX_FAILURES_SHOWN
        if hidden > 0:
            lines.append(f"  ... and {hidden} more (all are in the --json report)")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """nan / inf -> None, so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyphony.evaluate",
        description="Musical metrics and instrument fidelity of a folder of generated MIDI.",
    )
    parser.add_argument(
        "generated", type=Path, nargs="?", help="folder of generated .mid files (recursive)"
    )
    parser.add_argument("--reference", type=Path, help="folder of real .mid files to compare with")
    parser.add_argument("--json", type=Path, help="write the full report (per piece too) here")
    parser.add_argument("--nll", type=Path, metavar="CHECKPOINT", help="model directory to score")
    parser.add_argument("--dataset", type=Path, help="with --nll: a prepared dataset directory")
    parser.add_argument("--split", default="validation", help="with --nll (default validation)")
    parser.add_argument(
        "--max-windows", type=int, help="with --nll: score only the first N windows"
    )
    args = parser.parse_args(argv)

    if args.nll is not None:
        if args.dataset is None:
            parser.error(
                "--nll needs --dataset DATASET_DIR (from python -m polyphony.data.prepare)"
            )
        try:
            result = validation_nll(
                args.nll, args.dataset, args.split, max_windows=args.max_windows
            )
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        print(format_nll(result))
        if args.json:
            args.json.write_text(json.dumps(_json_ready(result), indent=2) + "\n")
        return 0
    if args.generated is None:
        parser.error("give a folder of generated MIDI files (or --nll CHECKPOINT --dataset DIR)")
    try:
        report = evaluate(args.generated, args.reference)
    except FileNotFoundError as error:
        parser.error(str(error))
    if report["generated"]["n_files"] == 0:
        parser.error(f"no .mid or .midi files under {args.generated}")
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_ready(report), indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
