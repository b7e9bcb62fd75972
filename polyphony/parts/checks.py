"""The full-parts checks, each a function that generates and measures (see ``polyphony.parts``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from symusic import Score

from ..densities import resolve
from ..instruments import DRUMS
from ..metrics import drum_groove, track_densities
from .figures import (
    excerpt,
    instruments_of,
    median_of,
    part_figures,
    register_kept,
    register_summary,
    report_family,
)

# What each part of a request is asked to play (requests_from_excerpts); "flat" is for models
# trained without densities (the parts ablation), not a choice of evaluate_model.py.
ASKED = ("default", "real", "flat")


def requests_from_excerpts(
    checkpoint, excerpts, n_bars: int, seed: int, asked: str = "default", **sampling
) -> dict[str, Any]:
    """Each excerpt's own instrument set, every part asked for at ``asked``: ``default``, the
    checkpoint's default densities (what a user who names instruments gets); ``real``, what
    the part plays in the excerpt (does the model play a part as full as it is asked, apart from
    whether the default suits this music); ``flat``, density bin 0 (models trained without
    densities). ``sampling``: generate()'s temperature / top_k / top_p / steer."""
    from ..generation import generate

    if asked not in ASKED:
        raise ValueError(f"asked={asked!r}: one of {', '.join(ASKED)}")
    pairs, targets, pieces = [], [], []
    for index, (name, real) in enumerate(excerpts):
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
        pieces.append(name.rsplit("@", 1)[0])  # band_excerpts names them PATH@FIRST_BAR
    return part_figures(pairs, n_bars, targets, pieces)


# ------------------------------------------------------------------------------- controls
CONTROLLED = {"drums": DRUMS, "bass": 33, "piano": 0, "guitar": 25, "strings": 48}
COMPANIONS = {DRUMS: [0, 33], 33: [0, DRUMS], 0: [33, DRUMS], 25: [33, DRUMS], 48: [0, DRUMS]}


def control(checkpoint, n_bars: int, samples: int, seed: int, **sampling) -> dict[str, Any]:
    """Per controlled instrument (with two companions): measured notes per bar of ``samples``
    pieces at each level and at a numeric request (the instrument's upper quartile x 1.25).
    ``sampling``, here and in the checks below: generate()'s keywords of how to draw."""
    from ..generation import generate

    results = {}
    for name, instrument in CONTROLLED.items():
        request = [instrument, *COMPANIONS[instrument]]
        numeric = round(checkpoint.densities.quartiles(instrument)[2] * 1.25, 2)
        measured = {}
        for setting in ("sparse", "medium", "dense", numeric):
            scores = generate(
                request, bars=n_bars, seed=seed, checkpoint=checkpoint, num_samples=samples,
                density={instrument: setting}, **sampling,
            )  # fmt: skip
            per_bar = [track_densities(s).get(instrument, (0, 0.0))[0] / n_bars for s in scores]
            measured[str(setting)] = median_of(per_bar)
        results[name] = {
            "requested_numeric": numeric,
            "medians": measured,
            "ordered": measured["sparse"] < measured["medium"] < measured["dense"],
            "numeric_error": measured[str(numeric)] / numeric - 1,
        }
    return results


def continuation(
    checkpoint, excerpts, prompt_bars: int, new_bars: int, seed: int, **sampling
) -> dict:
    """Per prompt track: notes per bar after / before (tracks silent in the prompt left out), and
    whether it stays where it played (:func:`register_kept`), generated beside the real bars
    that follow the prompt."""
    from ..generation import generate

    ratios, silent, pieces = [], 0, 0
    moves: dict[str, list[tuple[float, int, int]]] = {"generated": [], "real": []}
    grooves: dict[str, list[float]] = {"generated": [], "real": []}  # of the new bars' drums
    for index, (_, real) in enumerate(excerpts):
        prompt = excerpt(real, 0, prompt_bars)
        if prompt is None:
            continue
        pieces += 1
        before = {i: n / prompt_bars for i, (n, _) in track_densities(prompt).items()}
        score = generate(
            prompt=prompt, prompt_bars=prompt_bars, bars=new_bars, seed=seed + index,
            checkpoint=checkpoint, **sampling,
        )  # fmt: skip
        after_part = excerpt(score, prompt_bars, new_bars) or Score(score.ticks_per_quarter)
        after = {i: n / new_bars for i, (n, _) in track_densities(after_part).items()}
        for instrument, rate in before.items():
            if rate == 0:
                continue
            ratio = after.get(instrument, 0.0) / rate
            ratios.append(ratio)
            silent += ratio == 0
        real_after = excerpt(real, prompt_bars, new_bars)
        for side, new in (("generated", after_part), ("real", real_after)):
            if new is not None:
                moves[side].extend(register_kept(prompt, new))
        whole = excerpt(real, 0, prompt_bars + new_bars)
        for side, both in (("generated", score), ("real", whole)):
            groove = math.nan if both is None else drum_groove(both, from_bar=prompt_bars)
            if not math.isnan(groove):
                grooves[side].append(groove)
    return {
        "pieces": pieces,
        "prompt_tracks": len(ratios),
        "median_ratio": median_of(ratios),
        "silent_fraction": silent / max(len(ratios), 1),
        "register": {side: register_summary(kept) for side, kept in moves.items()},
        "drum_groove": {side: float(np.mean(v)) if v else None for side, v in grooves.items()},
    }


def arrangement(checkpoint, excerpts, seed: int, added=(33, DRUMS), **sampling) -> dict[str, Any]:
    """Remove bass and drums from each excerpt, add them back; measured vs target density."""
    from ..generation import generate, make_plan

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
        score = generate(
            arrange=kept, add=list(added), seed=seed + index, checkpoint=checkpoint, **sampling
        )
        played = track_densities(score)
        for instrument in added:
            rate = played.get(instrument, (0, 0.0))[0] / plan.target_bars
            errors[instrument].append(rate / plan.densities[instrument] - 1)
    return {
        ("drums" if i == DRUMS else "bass"): {"pieces": len(e), "median_error": median_of(e)}
        for i, e in errors.items()
    }
