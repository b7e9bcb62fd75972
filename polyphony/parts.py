"""Full-parts evaluation: does every requested instrument play a real part?

Measured on held-out band pieces (the validation and test splits' ``band`` source), cut into
16-bar excerpts, against what those excerpts really play. Four checks, each a function:

* :func:`requests_from_excerpts`: generate each excerpt's own instrument set (default
  densities), compare notes per bar per part and per family, thin parts, PCE/SC/GC, fidelity,
  and how a part repeats itself (``pitch_recurrence``: its pitches heard again 4 bars later);
* :func:`control`: ``sparse`` < ``medium`` < ``dense`` and a numeric request, per instrument;
* :func:`continuation`: prompt tracks keep playing after the prompt;
* :func:`arrangement`: added bass and drums land near their target density.

``scripts/evaluate_model.py --parts`` runs them and prints the tables (docs/generation.md).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from symusic import Score, Tempo, TimeSignature

from .densities import resolve
from .evaluate import split_pieces
from .instruments import DRUMS
from .metrics import (
    groove_consistency,
    instrument_fidelity,
    piece_bar_lines,
    pitch_class_entropy,
    pitch_recurrence,
    scale_consistency,
    track_densities,
)

THIN = 0.5  # notes per bar: a part below this plays less than one note every two bars
# What each part of a request is asked to play (requests_from_excerpts); "flat" is for models
# trained without densities (the parts ablation), not a choice of evaluate_model.py.
ASKED = ("default", "real", "flat")
# The families of the report, as GM program ranges (drums apart).
REPORT_FAMILIES = {
    "bass": range(32, 40),
    "piano/keys": range(0, 24),
    "guitar": range(24, 32),
    "strings": range(40, 56),
    "brass/reed": range(56, 80),
    "synth": range(80, 104),
    "other": range(104, 128),
}
MUSIC_METRICS: dict[str, Callable[[Score], float]] = {
    "pitch_class_entropy": pitch_class_entropy,
    "scale_consistency": scale_consistency,
    "groove_consistency": groove_consistency,
}


def report_family(instrument: int) -> str:
    if instrument == DRUMS:
        return "drums"
    return next(name for name, programs in REPORT_FAMILIES.items() if instrument in programs)


# ------------------------------------------------------------------------------- excerpts
def excerpt(score: Score, first_bar: int, n_bars: int) -> Score | None:
    """Bars ``first_bar .. first_bar + n_bars`` of ``score``, moved to tick 0 with the tempo
    and meter in force there; None if the piece is shorter."""
    starts, lengths = piece_bar_lines(score)
    if first_bar + n_bars > len(starts):
        return None
    last = first_bar + n_bars
    low = int(starts[first_bar])
    high = int(starts[last]) if last < len(starts) else int(starts[-1] + lengths[-1])
    cut = score.clip(low, high, clip_end=True).shift_time(-low)
    tempo = [t for t in score.tempos if t.time <= low][-1:] or [Tempo(0, 120.0)]
    meter = [ts for ts in score.time_signatures if ts.time <= low][-1:] or [TimeSignature(0, 4, 4)]
    cut.tempos = [Tempo(0, tempo[0].qpm), *(t for t in cut.tempos if t.time > 0)]
    cut.time_signatures = [
        TimeSignature(0, meter[0].numerator, meter[0].denominator),
        *(ts for ts in cut.time_signatures if ts.time > 0),
    ]
    cut.tracks = [t for t in cut.tracks if t.notes]
    return cut if cut.tracks else None


def band_excerpts(
    dataset_dir, midi_root, n_bars: int, per_piece: int, stride: int, source: str | None = "band"
) -> list[tuple[str, Score]]:
    """Up to ``per_piece`` excerpts of every held-out piece of ``source`` (validation and test
    splits; ``source=None``: every piece), starting every ``stride`` bars. ``midi_root`` is the
    folder the dataset was prepared from."""
    found = []
    for split in ("validation", "test"):
        for piece in split_pieces(dataset_dir, split):
            if source is not None and piece.get("source") != source:
                continue
            score = Score(str(Path(midi_root) / piece["path"]))
            for k in range(per_piece):
                cut = excerpt(score, k * stride, n_bars)
                if cut is not None:
                    found.append((f"{piece['path']}@{k * stride}", cut))
    return found


def instruments_of(score: Score) -> list[int]:
    return list(track_densities(score))


# ------------------------------------------------------------------------------- figures
def _median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def part_figures(
    pairs: list[tuple[Score, Score]], n_bars: int, asked: list[dict[int, float]] | None = None
) -> dict[str, Any]:
    """Generated vs real over (generated, real excerpt) pairs that ask for the same parts; a
    requested part that stayed silent counts as 0 notes per bar. ``asked``: the densities each
    request asked for (per pair), reported beside them, so that a gap can be told apart into
    the model missing its target and the target missing the music."""
    rates: dict[str, list[tuple[int, float]]] = {"generated": [], "real": []}
    metrics = {side: {name: [] for name in MUSIC_METRICS} for side in rates}
    # (instrument, distinct pitches, recurrence) of every pitched part that plays.
    phrases: dict[str, list[tuple[int, int, float]]] = {side: [] for side in rates}
    # Every pitched note's pitch, by family: where a part sits (a guitar at MIDI 115 is no guitar).
    pitches: dict[str, dict[str, list[int]]] = {side: {} for side in rates}
    fidelity = []
    for generated, real in pairs:
        played = track_densities(generated)
        for instrument, (notes, _) in track_densities(real).items():
            rates["real"].append((instrument, notes / n_bars))
            rates["generated"].append((instrument, played.get(instrument, (0, 0.0))[0] / n_bars))
        for side, score in (("generated", generated), ("real", real)):
            for name, metric in MUSIC_METRICS.items():
                value = metric(score)
                if np.isfinite(value):
                    metrics[side][name].append(value)
            phrases[side].extend((i, *figures) for i, figures in pitch_recurrence(score).items())
            for track in score.tracks:
                if not track.is_drum and len(track.notes):
                    family = pitches[side].setdefault(report_family(track.program), [])
                    family.extend(track.notes.numpy()["pitch"].tolist())
        fidelity.append(instrument_fidelity(generated))
    table = {}
    for side, parts in rates.items():
        by_family: dict[str, list[float]] = {}
        for instrument, per_bar in parts:
            by_family.setdefault(report_family(instrument), []).append(per_bar)
        table[side] = {
            "parts": len(parts),
            "thin_fraction": sum(v < THIN for _, v in parts) / max(len(parts), 1),
            "median_per_family": {f: _median(v) for f, v in sorted(by_family.items())},
            "parts_per_family": {f: len(v) for f, v in sorted(by_family.items())},
            **{name: float(np.mean(v)) if v else None for name, v in metrics[side].items()},
            **_phrase_figures(phrases[side]),
            **_register_figures(pitches[side], pitches["real"]),
        }
    if asked is not None:
        by_family = {}
        for targets in asked:
            for instrument, per_bar in targets.items():
                by_family.setdefault(report_family(instrument), []).append(per_bar)
        table["asked"] = {
            "median_per_family": {f: _median(v) for f, v in sorted(by_family.items())}
        }
    table["precision"] = float(np.mean([f["precision"] for f in fidelity if f]))
    table["recall"] = float(np.mean([f["recall"] for f in fidelity if f]))
    return table


def _phrase_figures(parts: list[tuple[int, int, float]]) -> dict[str, Any]:
    """Per family, medians over the parts of their distinct pitches and recurrence (a part too
    short to have a bar ``RECURRENCE_LAG`` bars back has no recurrence)."""
    distinct: dict[str, list[int]] = {}
    recurrence: dict[str, list[float]] = {}
    for instrument, pitches, share in parts:
        family = report_family(instrument)
        distinct.setdefault(family, []).append(pitches)
        if np.isfinite(share):
            recurrence.setdefault(family, []).append(share)
    return {
        "distinct_pitches_per_family": {f: _median(v) for f, v in sorted(distinct.items())},
        "recurrence_per_family": {f: _median(v) for f, v in sorted(recurrence.items())},
    }


def _register_figures(pitches: dict[str, list[int]], real: dict[str, list[int]]) -> dict:
    """Per family, the median pitch, and the share of notes outside the real notes' 1st-99th
    percentile of that family (the real side's own share is about 2 % by construction)."""
    outside = {}
    for family, values in pitches.items():
        if real.get(family):
            low, high = np.percentile(real[family], [1, 99])
            values = np.asarray(values)
            outside[family] = float(np.mean((values < low) | (values > high)))
    return {
        "median_pitch_per_family": {f: _median(v) for f, v in sorted(pitches.items())},
        "out_of_register_per_family": dict(sorted(outside.items())),
    }


def requests_from_excerpts(
    checkpoint, excerpts, n_bars: int, seed: int, asked: str = "default", **sampling
) -> dict[str, Any]:
    """Each excerpt's own instrument set, every part asked for at ``asked``: ``default``, the
    checkpoint's default densities (what a user who names instruments gets); ``real``, what
    the part plays in the excerpt (does the model play a part as full as it is asked, apart from
    whether the default suits this music); ``flat``, density bin 0 (models trained without
    densities). ``sampling``: generate()'s temperature / top_k / top_p / steer."""
    from .generation import generate

    if asked not in ASKED:
        raise ValueError(f"asked={asked!r}: one of {', '.join(ASKED)}")
    pairs, targets = [], []
    for index, (_, real) in enumerate(excerpts):
        request = instruments_of(real)
        pitched = [i for i in request if i != DRUMS][:15]
        request = pitched + ([DRUMS] if DRUMS in request else [])
        real.tracks = [t for t in real.tracks if (DRUMS if t.is_drum else t.program) in request]
        density = None
        if asked == "flat":
            density = {i: 0.0 for i in request}
        elif asked == "real":
            plays = track_densities(real)
            density = {i: plays[i][0] / n_bars for i in request}
        score = generate(
            request,
            bars=n_bars,
            seed=seed + index,
            checkpoint=checkpoint,
            density=density,
            **sampling,
        )
        pairs.append((score, real))
        targets.append(resolve(checkpoint.densities, request, density or {}))
    return part_figures(pairs, n_bars, targets)


# ------------------------------------------------------------------------------- controls
CONTROLLED = {"drums": DRUMS, "bass": 33, "piano": 0, "guitar": 25, "strings": 48}
COMPANIONS = {DRUMS: [0, 33], 33: [0, DRUMS], 0: [33, DRUMS], 25: [33, DRUMS], 48: [0, DRUMS]}


def control(checkpoint, n_bars: int, samples: int, seed: int) -> dict[str, Any]:
    """Per controlled instrument (with two companions): measured notes per bar of ``samples``
    pieces at each level and at a numeric request (the instrument's upper quartile x 1.25)."""
    from .generation import generate

    results = {}
    for name, instrument in CONTROLLED.items():
        request = [instrument, *COMPANIONS[instrument]]
        numeric = round(checkpoint.densities.quartiles(instrument)[2] * 1.25, 2)
        measured = {}
        for setting in ("sparse", "medium", "dense", numeric):
            scores = generate(
                request, bars=n_bars, seed=seed, checkpoint=checkpoint, num_samples=samples,
                density={instrument: setting},
            )  # fmt: skip
            per_bar = [track_densities(s).get(instrument, (0, 0.0))[0] / n_bars for s in scores]
            measured[str(setting)] = _median(per_bar)
        results[name] = {
            "requested_numeric": numeric,
            "medians": measured,
            "ordered": measured["sparse"] < measured["medium"] < measured["dense"],
            "numeric_error": measured[str(numeric)] / numeric - 1,
        }
    return results


def continuation(checkpoint, excerpts, prompt_bars: int, new_bars: int, seed: int) -> dict:
    """Per prompt track: notes per bar after / before (tracks silent in the prompt left out)."""
    from .generation import generate

    ratios, silent, pieces = [], 0, 0
    for index, (_, real) in enumerate(excerpts):
        prompt = excerpt(real, 0, prompt_bars)
        if prompt is None:
            continue
        pieces += 1
        before = {i: n / prompt_bars for i, (n, _) in track_densities(prompt).items()}
        score = generate(
            prompt=prompt, prompt_bars=prompt_bars, bars=new_bars, seed=seed + index,
            checkpoint=checkpoint,
        )  # fmt: skip
        after_part = excerpt(score, prompt_bars, new_bars) or Score(score.ticks_per_quarter)
        after = {i: n / new_bars for i, (n, _) in track_densities(after_part).items()}
        for instrument, rate in before.items():
            if rate == 0:
                continue
            ratio = after.get(instrument, 0.0) / rate
            ratios.append(ratio)
            silent += ratio == 0
    return {
        "pieces": pieces,
        "prompt_tracks": len(ratios),
        "median_ratio": _median(ratios),
        "silent_fraction": silent / max(len(ratios), 1),
    }


def arrangement(checkpoint, excerpts, seed: int, added=(33, DRUMS)) -> dict[str, Any]:
    """Remove bass and drums from each excerpt, add them back; measured vs target density."""
    from .generation import generate, make_plan

    errors: dict[int, list[float]] = {i: [] for i in added}
    for index, (_, real) in enumerate(excerpts):
        kept = real.copy()
        # Drums and every bass of the piece go (a second bass would double the added one).
        kept.tracks = [
            t for t in kept.tracks if not t.is_drum and report_family(t.program) != "bass"
        ]
        if not kept.tracks:
            continue
        plan = make_plan(checkpoint.tokenizer, checkpoint.densities, arrange=kept, add=list(added))
        score = generate(arrange=kept, add=list(added), seed=seed + index, checkpoint=checkpoint)
        played = track_densities(score)
        for instrument in added:
            rate = played.get(instrument, (0, 0.0))[0] / plan.target_bars
            errors[instrument].append(rate / plan.densities[instrument] - 1)
    return {
        ("drums" if i == DRUMS else "bass"): {"pieces": len(e), "median_error": _median(e)}
        for i, e in errors.items()
    }


# ------------------------------------------------------------------------------- report
def _number(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def _paired_rows(requests, title: str, heads, keys, specs) -> list[str]:
    """Two per-family figures (``keys``), each generated beside real."""
    lines = [f"{title:24}{heads[0]:>11}{'real':>9}{heads[1]:>9}{'real':>9}"]
    for family in requests["real"][keys[0]]:
        a, b, c, d = (requests[side][k].get(family) for k in keys for side in ("generated", "real"))
        lines.append(
            f"{family:24}{_number(a, specs[0]):>11}{_number(b, specs[0]):>9}"
            f"{_number(c, specs[1]):>9}{_number(d, specs[1]):>9}"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    requests = report["requests"]
    generated, real = requests["generated"], requests["real"]
    lines = [
        f"{report['excerpts']} requests (16-bar excerpts of held-out band pieces), "
        f"{real['parts']} parts",
        f"{'':24}{'generated':>11}{'real':>9}{'gap':>9}{'asked':>9}",
        f"{'thin parts (<0.5/bar)':24}{generated['thin_fraction']:>11.1%}"
        f"{real['thin_fraction']:>9.1%}"
        f"{100 * (generated['thin_fraction'] - real['thin_fraction']):>+8.1f}p",
    ]
    for family, value in real["median_per_family"].items():
        mine = generated["median_per_family"].get(family)
        gap = None if not value or mine is None else 100 * (mine / value - 1)
        parts_count = real["parts_per_family"][family]
        target = requests.get("asked", {}).get("median_per_family", {}).get(family)
        lines.append(
            f"{family + f' ({parts_count}) /bar':24}{_number(mine):>11}{_number(value):>9}"
            f"{_number(gap, '+.0f'):>8}%{_number(target):>9}"
        )
    for name in MUSIC_METRICS:
        mine, value = generated[name], real[name]
        gap = None if mine is None or not value else 100 * (mine / value - 1)
        lines.append(
            f"{name:24}{_number(mine, '.3f'):>11}{_number(value, '.3f'):>9}{_number(gap, '+.1f'):>8}%"
        )
    lines += _paired_rows(
        requests, "phrases (pitched parts)", ("recurrence", "pitches"),
        ("recurrence_per_family", "distinct_pitches_per_family"), (".2f", ".1f"),
    )  # fmt: skip
    lines += _paired_rows(
        requests, "register (pitched notes)", ("median", "outside"),
        ("median_pitch_per_family", "out_of_register_per_family"), (".0f", ".1%"),
    )  # fmt: skip
    lines.append(f"precision {requests['precision']:.3f}  recall {requests['recall']:.3f}")
    lines.append("density control (median notes/bar over the samples):")
    for name, result in report["control"].items():
        medians = result["medians"]
        values = "  ".join(f"{k}={_number(v)}" for k, v in medians.items())
        lines.append(
            f"  {name:8} {values}  ordered={result['ordered']}  numeric error "
            f"{result['numeric_error']:+.0%}"
        )
    c = report["continuation"]
    lines.append(
        f"continuation: {c['pieces']} pieces, {c['prompt_tracks']} prompt tracks, median after/before "
        f"{_number(c['median_ratio'])}, silent {c['silent_fraction']:.1%}"
    )
    for name, a in report["arrangement"].items():
        lines.append(
            f"arrangement: added {name} in {a['pieces']} pieces, median error vs target "
            f"{_number(None if a['median_error'] is None else 100 * a['median_error'], '+.0f')}%"
        )
    return "\n".join(lines)
