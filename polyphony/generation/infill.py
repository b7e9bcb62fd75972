"""Infilling: regenerate some bars of some tracks with the music on both sides in view.

A request becomes a :class:`Plan` whose context is the layout the model was trained on
(data/fim.py): header, the bars before (prefix), MASK, the bars after (suffix), SEP, then the
region's bar line. The grammar replays only the prefix, so the new bars count from there. The
region's bar lines, meters and tempi, and the notes of the tracks that are not regenerated, are
forced as in arrangement (the ``existing`` stream), so the region keeps its exact length. The
output is the piece's own prefix and suffix tokens around the new bars (:func:`infill_ids`).
Only as much prefix and suffix as fits beside the region in the model's context is shown to it.
"""

from __future__ import annotations

import re

import numpy as np
from symusic import Score

from ..data.fim import fim_layout
from ..densities import family_of
from ..instruments import program_to_instrument as _instrument
from ..metrics import piece_bar_lines
from ..tokenizer import PolyTokenizer
from .common import CONTEXT_KEPT, FIELD, MAX_BARS, GenerationError
from .plan import (
    Infill,
    Plan,
    _check_budget,
    _default_budget,
    _densities,
    _encode,
    _header,
    _track_order,
    read_midi,
    resolve_instruments,
)

# Room the new bars take in the context, against the region's own tokens: parts may play denser.
MIDDLE_ROOM = 1.5


def parse_bars(spec: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"9-12"``, ``"9"`` or ``(9, 12)``: the first and last bar, 1-based, inclusive."""
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
        if not match:
            raise GenerationError(f"--infill-bars {spec!r}: give bars as FIRST-LAST, e.g. 9-12")
        first, last = int(match[1]), int(match[2] or match[1])
    else:
        first, last = (int(x) for x in spec)
    if not 1 <= first <= last:
        raise GenerationError(
            f"--infill-bars {first}-{last}: bars count from 1 and the first comes before the last"
        )
    return first, last


def without_tracks(tokenizer: PolyTokenizer, body: np.ndarray, instruments) -> np.ndarray:
    """``body`` without the notes of ``instruments``. REMI also drops the Positions left empty
    (its grammar has none; a Position that carries a Tempo stays: the tempo change is the
    piece's); a CPWord Position compound may stand alone, and carries the tempo."""
    tracks = tokenizer.track_ids(body)
    kept = body[~np.isin(tracks, list(instruments))]
    if tokenizer.kind != "remi" or not len(kept):
        return kept
    names = [tokenizer.token_name(int(i)).split("_", 1)[0] for i in kept]
    empty = [
        kind == "Position" and (index + 1 == len(names) or names[index + 1] in ("Position", "Bar"))
        for index, kind in enumerate(names)
    ]
    return kept[~np.array(empty, dtype=bool)]


def _piece_tracks(requested: list[int], in_piece: list[int]) -> list[int]:
    """The piece's tracks a request names: an instrument the piece has, else the piece's tracks
    of its GM family ("bass" is the piece's picked bass), else a new track."""
    named = []
    for instrument in requested:
        kin = [i for i in in_piece if family_of(i) == family_of(instrument)]
        named += [instrument] if instrument in in_piece or not kin else kin
    return list(dict.fromkeys(named))


def _tempo_before(tokenizer: PolyTokenizer, prefix: np.ndarray) -> int:
    """The tempo in force after ``prefix`` (REMI: its last Tempo token; CPWord: the last tempo
    field value), -1 if none: the shown prefix may have cut it off, and the grammar lets the
    model open a Position only once a tempo is known."""
    if tokenizer.kind == "remi":
        names = [tokenizer.token_name(int(i)) for i in prefix]
        values = [int(i) for i, n in zip(prefix, names, strict=True) if n.startswith("Tempo_")]
    else:
        column = FIELD["tempo"]
        values = [
            int(v)
            for v in prefix[:, column]
            if tokenizer.token_name(int(v), column).startswith("Tempo_")
        ]
    return values[-1] if values else -1


def _tail_from_bar_line(tokenizer, body: np.ndarray, room: int) -> np.ndarray:
    """The last bars of ``body`` that fit in ``room`` tokens (from a bar line)."""
    lines = np.flatnonzero(tokenizer.is_bar(body))
    fitting = lines[lines >= len(body) - room]
    return body[int(fitting[0]) :] if len(fitting) else body[:0]


def _head_to_bar_line(tokenizer, body: np.ndarray, room: int) -> np.ndarray:
    """The first bars of ``body`` that fit in ``room`` tokens (to a bar line or its end)."""
    if len(body) <= room:
        return body
    lines = np.flatnonzero(tokenizer.is_bar(body))
    fitting = lines[(lines > 0) & (lines <= room)]
    return body[: int(fitting[-1])] if len(fitting) else body[:0]


def plan_infill(
    tokenizer: PolyTokenizer,
    grammar,
    stats,
    infill,
    infill_bars,
    tracks,
    max_tokens: int | None,
    density,
    context_length: int,
    look_ahead: bool = True,
) -> Plan:
    """Regenerate bars ``infill_bars`` of ``tracks`` (default: all) of the file ``infill``.
    ``look_ahead=False`` hides the suffix: a continuation of the prefix under the same
    constraints, the baseline infilling is measured against."""
    score, name = read_midi(infill, "infill")
    first, last = parse_bars(infill_bars)
    in_piece, body = _encode(tokenizer, score, name)
    lines = np.append(np.flatnonzero(grammar.bar_of(body)), len(body))
    n_bars = len(lines) - 1
    if last > n_bars:
        raise GenerationError(
            f"{name}: --infill-bars {first}-{last} outside the piece, which has {n_bars} bar(s); "
            f"choose bars within 1-{n_bars}"
        )
    if last - first + 1 > MAX_BARS:
        raise GenerationError(f"--infill-bars {first}-{last}: at most {MAX_BARS} bars at once")
    order = _track_order(score, in_piece)
    redo = order if tracks is None else _piece_tracks(resolve_instruments(tracks), order)
    order = order + [i for i in redo if i not in order]
    prefix, region, suffix = (
        body[: lines[first - 1]],
        body[lines[first - 1] : lines[last]],
        body[lines[last] :],
    )
    region_tracks = tokenizer.track_ids(region)
    played = [i for i in redo if i not in in_piece or (region_tracks == i).any()]
    kept = without_tracks(tokenizer, region, redo)

    # Prefix and suffix share what the context has left beside the header and the new bars.
    header_stub = _header(tokenizer, dict.fromkeys(order, 0.0))
    room = int(context_length * CONTEXT_KEPT) - len(header_stub) - 3
    room -= int(MIDDLE_ROOM * len(region))
    room = max(room, 0)
    shown_suffix = _head_to_bar_line(tokenizer, suffix, room // 2) if look_ahead else suffix[:0]
    shown_prefix = _tail_from_bar_line(tokenizer, prefix, room - len(shown_suffix))
    if look_ahead:
        shown_suffix = _head_to_bar_line(tokenizer, suffix, room - len(shown_prefix))

    # The header describes the bars in view, as a training window's does: the tracks that play
    # there at their density there, and a new track at its default (or --density).
    window = np.concatenate([shown_prefix, region, shown_suffix])
    ends_piece = len(shown_suffix) == len(suffix)
    measured = tokenizer.notes_per_bar(window, tokenizer.track_ids(window), ends_piece)
    in_view = [i for i in order if i in measured or i not in in_piece]
    densities = _densities(stats, in_view, density, measured)
    header = _header(tokenizer, densities)
    bar_line = region[:1]
    context = np.concatenate([shown_prefix, bar_line])
    if look_ahead:
        parts = [(part, tokenizer.track_ids(part)) for part in (header, shown_prefix, shown_suffix)]
        layout, _ = fim_layout(tokenizer, *parts)
        context = np.concatenate([layout[len(header) :], bar_line])
    n_region = last - first + 1
    budget = max_tokens or _default_budget(n_region, len(redo))
    _check_budget(budget, grammar, len(redo))
    return Plan(
        instruments=order,
        densities=densities,
        header=header,
        prompt_body=np.concatenate([shown_prefix, bar_line]),
        allowed=redo,
        required=played,
        target_bars=int(grammar.bar_of(shown_prefix).sum()) + n_region,
        max_new_tokens=budget,
        existing=kept[1:],  # after the region's bar line, which the prompt ends with
        source=name,
        context=context,
        infill=Infill((first, last), redo, prefix, suffix, _tempo_before(tokenizer, prefix)),
    )


def infill_ids(tokenizer: PolyTokenizer, plan: Plan, row: np.ndarray) -> np.ndarray:
    """A decoded row (header, context, new bars, EOS) -> the whole piece: header, the piece's
    prefix, the region's bar line and new bars, the piece's suffix, EOS."""
    new = row[len(plan.header) + len(plan.context) :]
    first = new if new.ndim == 1 else new[:, 0]
    ends = np.flatnonzero(first == tokenizer.eos_id)
    new = new[: int(ends[0])] if len(ends) else new
    region = np.concatenate([plan.prompt_body[-1:], new])
    parts = [plan.header, plan.infill.prefix, region, plan.infill.suffix, tokenizer.eos()]
    return np.concatenate(parts)


def clip_to_region(score: Score, plan: Plan) -> None:
    """New notes end where the region does: no note of a regenerated track that starts in the
    region rings into the suffix."""
    starts, _ = piece_bar_lines(score)
    first, last = plan.infill.bars
    if last >= len(starts):
        return
    begin, end = int(starts[first - 1]), int(starts[last])
    for track in score.tracks:
        if _instrument(track.program, track.is_drum) not in plan.infill.tracks:
            continue
        for note in track.notes:
            if begin <= note.time < end:
                note.duration = min(note.duration, end - note.time)
