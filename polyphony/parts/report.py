"""The full-parts report as text (``scripts/evaluate_model.py --parts``)."""

from __future__ import annotations

from typing import Any

from .figures import MUSIC_METRICS, REGISTER_MOVED


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
        f"{'':24}{'generated':>11}{'real':>9}{'gap':>9}{'asked':>9}{'gap, 90 % of pieces':>22}"
        f"{'training':>10}{'gap':>7}",
        f"{'thin parts (<0.5/bar)':24}{generated['thin_fraction']:>11.1%}"
        f"{real['thin_fraction']:>9.1%}"
        f"{100 * (generated['thin_fraction'] - real['thin_fraction']):>+8.1f}p",
    ]
    for family, value in real["median_per_family"].items():
        mine = generated["median_per_family"].get(family)
        gap = None if not value or mine is None else 100 * (mine / value - 1)
        parts_count = real["parts_per_family"][family]
        target = requests.get("asked", {}).get("median_per_family", {}).get(family)
        low, high = requests.get("gap_interval_per_family", {}).get(family, (None, None))
        interval = "-" if low is None else f"{100 * low:+.0f} .. {100 * high:+.0f} %"
        # The training pieces' own excerpts against the same real ones (family_medians).
        trained = requests.get("training", {}).get("median_per_family", {}).get(family)
        trained_gap = None if not value or trained is None else 100 * (trained / value - 1)
        lines.append(
            f"{family + f' ({parts_count}) /bar':24}{_number(mine):>11}{_number(value):>9}"
            f"{_number(gap, '+.0f'):>8}%{_number(target):>9}{interval:>22}"
            f"{_number(trained):>10}{_number(trained_gap, '+.0f'):>6}%"
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
        requests, "one pitch (pitched parts)", ("top share", "pedals"),
        ("top_pitch_share_per_family", "pedal_fraction_per_family"), (".2f", ".0%"),
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
    for side, r in c.get("register", {}).items():
        lines.append(
            f"  register, {side}: {r['tracks']} tracks, median move {_number(r['median_move'], '.1f')}"
            f" semitones, moved > {REGISTER_MOVED}: {r['moved_fraction']:.0%}, new notes outside "
            f"the prompt's range: {_number(r['outside_prompt_range'], '.1%')}"
        )
    if "drum_groove" in c:  # the drums' kit pieces where they were 1-4 bars before, new bars
        grooves = c["drum_groove"]
        lines.append(
            f"  drum groove, new bars: generated {_number(grooves['generated'])}, "
            f"real {_number(grooves['real'])}"
        )
    for name, a in report["arrangement"].items():
        lines.append(
            f"arrangement: added {name} in {a['pieces']} pieces, median error vs target "
            f"{_number(None if a['median_error'] is None else 100 * a['median_error'], '+.0f')}%"
        )
    return "\n".join(lines)
