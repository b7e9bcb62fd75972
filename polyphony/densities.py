"""How much and where each part plays: the training data's notes per bar and registers, and the
user's requests.

A header announces every instrument with a density bin (tokenizer.py). In training the bin is
measured on the window; in generation it comes from the request:

* a number, notes per bar: ``--density "bass=4, drums=12"``;
* a level, ``sparse`` / ``medium`` / ``dense``: that instrument's lower quartile, median and
  upper quartile in the training data;
* nothing: the instrument's median in the training data (its GM family's, then all parts',
  when the training data never had it), at least ``MIN_DEFAULT``; or, for a track of a
  prompt or an arranged piece, what it plays there.

The statistics are measured once per training run on the train split and saved as
``densities.json`` beside the model, so defaults are data, not code. Three choices make them what
a user of band music expects:

* a piece counts, for each instrument, its median notes per bar over the ``STRETCH_BARS``-bar
  stretches the instrument plays in: what the part plays when it is there, which is what a
  window's header announces in training (over the whole piece, a part's rests would count);
* each piece counts as much as its source does in training (``data.source_weights``): a
  chorale voice mapped to "Pad 4 (choir)" does not set the pad's default for a band;
* an instrument seen in few pieces is pulled toward its GM family: its quartiles are
  ``(n q_instrument + k q_family) / (n + k)`` for ``n`` pieces, ``k = SHRINK_PIECES``
  (Marimba's median over 4 pieces was 24 notes per bar, 3 of them in a marimba piece).

Beside them, each pitched instrument's *register*: the 0.5th and 99.5th percentile, the mean and
the standard deviation of the pitches of its notes in the train split (weighted like the
densities; an instrument with fewer than ``REGISTER_MIN_NOTES`` notes takes its GM family's).
Generation keeps the notes it starts between the percentiles and draws them toward the mean
(docs/generation.md, "Registers"): a guitar at MIDI 115 is no guitar part.

``python -m polyphony.densities DATASET --config CONFIG --out MODEL_DIR`` measures them again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .instruments import DRUMS, instrument_name, parse_instruments
from .tokenizer import DENSITY_EDGES, PolyTokenizer, density_bin

DENSITY_FILE = "densities.json"
LEVELS = ("sparse", "medium", "dense")  # lower quartile, median, upper quartile
# Densities are measured per stretch of this many bars: generate.py's default --bars.
STRETCH_BARS = 16
SHRINK_PIECES = 10.0  # pieces' worth of family evidence added to each instrument's own
# An unrequested part plays at least this much: someone who names an instrument wants to hear
# it, and the training median of sound effects (0.06 notes per bar: one hit in a stretch) would
# leave it nearly silent. A request or a prompt's own track may ask for less.
MIN_DEFAULT = 1.0
REGISTER_PERCENTILES = (0.5, 99.5)
REGISTER_MIN_NOTES = 200
# A register: lowest and highest pitch (REGISTER_PERCENTILES), mean and standard deviation.
Register = tuple[int, int, float, float]


class DensityError(ValueError):
    """A density request that cannot be read; the message says what to write instead."""


def family_of(instrument: int) -> str:
    return "Drums" if instrument == DRUMS else f"family_{instrument // 8}"


@dataclass
class DensityStats:
    """Quartiles of notes per bar (per piece) by instrument, by GM family, and over all parts;
    registers by pitched instrument and GM family."""

    instruments: dict[int, tuple[float, float, float]]
    families: dict[str, tuple[float, float, float]]
    overall: tuple[float, float, float]
    pieces: dict[int, int]
    registers: dict[int, Register] = field(default_factory=dict)
    family_registers: dict[str, Register] = field(default_factory=dict)

    @classmethod
    def measure(
        cls,
        per_instrument: Mapping[int, Iterable[float]],
        weights: Mapping[int, Iterable[float]] | None = None,
        shrink: float = 0.0,
    ) -> DensityStats:
        """Quartiles of each instrument's values (one per piece); ``weights``: one per value
        (weighted quartiles); ``shrink``: pieces' worth of the family's quartiles mixed into
        each instrument's (0: none)."""
        values = {int(i): np.asarray(list(v), dtype=float) for i, v in per_instrument.items()}
        values = {i: v for i, v in values.items() if len(v)}
        if not values:
            raise DensityError("no notes to measure densities on")
        weighting = {
            i: np.asarray(list(weights[i]), dtype=float) if weights is not None else None
            for i in values
        }
        if weights is not None:  # a source that does not train (weight 0) does not count
            kept = {i: w > 0 for i, w in weighting.items()}
            values = {i: v[kept[i]] for i, v in values.items() if kept[i].any()}
            weighting = {i: weighting[i][kept[i]] for i in values}

        def quartiles(v: np.ndarray, w: np.ndarray | None) -> np.ndarray:
            if w is None:
                return np.percentile(v, [25, 50, 75])
            return np.percentile(v, [25, 50, 75], weights=w, method="inverted_cdf")

        def join(parts: list[np.ndarray | None]) -> np.ndarray | None:
            return None if weights is None else np.concatenate(parts)

        by_family: dict[str, list[int]] = {}
        for instrument in values:
            by_family.setdefault(family_of(instrument), []).append(instrument)
        families = {
            f: quartiles(np.concatenate([values[i] for i in members]),
                         join([weighting[i] for i in members]))
            for f, members in by_family.items()
        }  # fmt: skip
        instruments = {}
        for i, v in values.items():
            n = len(v)
            instruments[i] = (n * quartiles(v, weighting[i]) + shrink * families[family_of(i)]) / (
                n + shrink
            )

        def rounded(q: np.ndarray) -> tuple[float, float, float]:
            return tuple(round(float(x), 3) for x in q)

        return cls(
            instruments={i: rounded(q) for i, q in sorted(instruments.items())},
            families={f: rounded(q) for f, q in sorted(families.items())},
            overall=rounded(
                quartiles(np.concatenate(list(values.values())), join(list(weighting.values())))
            ),
            pieces={i: len(v) for i, v in sorted(values.items())},
        )

    @classmethod
    def of_pieces(
        cls,
        tokenizer: PolyTokenizer,
        pieces,
        weights: Iterable[float] | None = None,
        shrink: float = SHRINK_PIECES,
    ) -> DensityStats:
        """From ``(ids, track_ids, header_length)`` of whole pieces; ``weights``: each piece's
        share of training (WindowDataset.piece_weights); ``shrink``: see the module's doc."""
        per_instrument: dict[int, list[float]] = {}
        per_weight: dict[int, list[float]] = {}
        histograms: dict[int, np.ndarray] = {}  # weighted notes per pitch, by instrument
        counted: dict[int, int] = {}  # notes of pieces that train (weight > 0), by instrument
        weights = iter(weights) if weights is not None else None
        for ids, track_ids, header_length in pieces:
            weight = next(weights) if weights is not None else 1.0
            body, tracks = ids[header_length:], track_ids[header_length:]
            for instrument, value in _while_playing(tokenizer, body, tracks).items():
                per_instrument.setdefault(instrument, []).append(value)
                per_weight.setdefault(instrument, []).append(weight)
            pitches = tokenizer.note_pitches(body)
            pitched = pitches >= 0
            for instrument in np.unique(tracks[pitched]).tolist():
                counts = np.bincount(pitches[pitched & (tracks == instrument)], minlength=128)
                histograms[instrument] = histograms.get(instrument, 0) + weight * counts
                counted[instrument] = counted.get(instrument, 0) + int(weight > 0) * counts.sum()
        stats = cls.measure(per_instrument, per_weight if weights is not None else None, shrink)
        stats.registers, stats.family_registers = _registers(histograms, counted)
        return stats

    def falling_back_to(self, base: DensityStats) -> DensityStats:
        """These statistics where they measured an instrument or family, ``base``'s elsewhere:
        a fine-tune on a few pieces keeps the trained model's defaults for what they lack."""
        return DensityStats(
            instruments=dict(sorted((base.instruments | self.instruments).items())),
            families=dict(sorted((base.families | self.families).items())),
            overall=self.overall,
            pieces=dict(sorted((base.pieces | self.pieces).items())),
            registers=dict(sorted((base.registers | self.registers).items())),
            family_registers=dict(sorted((base.family_registers | self.family_registers).items())),
        )

    def quartiles(self, instrument: int) -> tuple[float, float, float]:
        if instrument in self.instruments:
            return self.instruments[instrument]
        return self.families.get(family_of(instrument), self.overall)

    def default(self, instrument: int) -> float:
        return self.quartiles(instrument)[1]

    def register(self, instrument: int) -> Register | None:
        """Where ``instrument`` plays: its own register, its GM family's, or None (drums, or
        statistics from before registers: anywhere)."""
        if instrument in self.registers:
            return self.registers[instrument]
        return self.family_registers.get(family_of(instrument))

    # ------------------------------------------------------------------ file
    def to_json(self) -> str:
        return json.dumps(
            {
                "unit": "notes per bar of the train split's pieces (each: its median over the "
                f"{STRETCH_BARS}-bar stretches a part plays in), quartiles 25/50/75 "
                "(weighting and shrinkage: polyphony/densities.py)",
                "density_edges": list(DENSITY_EDGES),
                "instruments": {
                    str(i): {"name": instrument_name(i), "quartiles": q, "pieces": self.pieces[i]}
                    for i, q in self.instruments.items()
                },
                "families": {f: list(q) for f, q in self.families.items()},
                "overall": list(self.overall),
                "registers": {
                    "unit": f"lowest and highest pitch (percentiles {REGISTER_PERCENTILES}), "
                    "mean and standard deviation of the pitches of the train split's notes of "
                    "each instrument (family)",
                    "instruments": {str(i): list(r) for i, r in self.registers.items()},
                    "families": {f: list(r) for f, r in self.family_registers.items()},
                },
            },
            indent=1,
        )

    @classmethod
    def load(cls, directory: str | Path) -> DensityStats:
        path = Path(directory) / DENSITY_FILE
        if not path.is_file():
            raise DensityError(
                f"{path}: not found; a model trained with per-track densities is exported with "
                f"it (`python train.py --config CONFIG --export DIR`)"
            )
        try:
            data = json.loads(path.read_text())
            instruments = {int(i): tuple(e["quartiles"]) for i, e in data["instruments"].items()}
            registers = data.get("registers", {})  # none in statistics from before registers
            return cls(
                instruments=instruments,
                families={f: tuple(q) for f, q in data["families"].items()},
                overall=tuple(data["overall"]),
                pieces={int(i): int(e["pieces"]) for i, e in data["instruments"].items()},
                registers={
                    int(i): _register(r) for i, r in registers.get("instruments", {}).items()
                },
                family_registers={
                    f: _register(r) for f, r in registers.get("families", {}).items()
                },
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DensityError(f"{path}: unreadable density statistics ({err})") from err


def _while_playing(tokenizer: PolyTokenizer, body, tracks) -> dict[int, float]:
    """Each instrument's median notes per bar over the ``STRETCH_BARS``-bar stretches of a
    piece it plays in: what it plays when it is there, as a window's header counts it. Over the
    whole piece, the rests of a part that sits out half the song would halve its density (a lead
    synth's 1.9 notes per bar against 3.0 in the stretches it plays)."""
    bars = np.flatnonzero(tokenizer.is_bar(body))
    cuts = [0, *bars[STRETCH_BARS::STRETCH_BARS].tolist(), len(body)]
    found: dict[int, list[float]] = {}
    for start, end in zip(cuts, cuts[1:], strict=False):
        last = end == len(body)
        end = end if last else end + 1  # through the next bar line, which closes the stretch
        stretch = tokenizer.notes_per_bar(body[start:end], tracks[start:end], last)
        for instrument, value in stretch.items():
            if value > 0:
                found.setdefault(instrument, []).append(value)
    return {i: float(np.median(v)) for i, v in found.items()}


def _register(values) -> Register:
    low, high, mean, spread = values
    return int(low), int(high), float(mean), float(spread)


def _registers(
    histograms: Mapping[int, np.ndarray], counted: Mapping[int, int]
) -> tuple[dict[int, Register], dict[str, Register]]:
    """Registers from weighted notes per pitch: each instrument's with ``REGISTER_MIN_NOTES``
    notes or more (``counted``), and each family's (all its instruments' notes together)."""

    def span(counts: np.ndarray) -> Register:
        share = counts / counts.sum()
        low, high = (np.searchsorted(np.cumsum(share), q / 100) for q in REGISTER_PERCENTILES)
        mean = float(share @ np.arange(128))
        spread = float(np.sqrt(share @ (np.arange(128) - mean) ** 2))
        return int(low), int(high), round(mean, 2), round(spread, 2)

    by_family: dict[str, np.ndarray] = {}
    for instrument, counts in histograms.items():
        by_family[family_of(instrument)] = by_family.get(family_of(instrument), 0) + counts
    instruments = {
        i: span(c) for i, c in sorted(histograms.items()) if counted[i] >= REGISTER_MIN_NOTES
    }  # fmt: skip
    families = {f: span(c) for f, c in sorted(by_family.items()) if c.sum() > 0}
    return instruments, families


def parse_density(spec: str | Mapping | None) -> dict[int, float | str]:
    """``"bass=4, drums=12, piano=dense"`` (or a mapping) -> {instrument: notes per bar or level}."""
    if spec is None:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else _pairs(spec)
    parsed: dict[int, float | str] = {}
    for name, value in items:
        try:
            (instrument,) = parse_instruments(str(name))
        except ValueError as err:
            raise DensityError(f"--density {name}={value}: {err}") from err
        parsed[instrument] = _value(name, value)
    return parsed


def _pairs(spec: str) -> list[tuple[str, str]]:
    pairs = []
    for item in spec.replace(";", ",").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise DensityError(
                f"--density {item.strip()!r}: write INSTRUMENT=VALUE, e.g. "
                f'"bass=4, drums=12, piano=dense" (notes per bar, or {"/".join(LEVELS)})'
            )
        name, value = item.split("=", 1)
        pairs.append((name.strip(), value.strip()))
    return pairs


def _value(name, value) -> float | str:
    if isinstance(value, str) and value.strip().lower() in LEVELS:
        return value.strip().lower()
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number < 0:
        raise DensityError(
            f"--density {name}={value}: give notes per bar (a number >= 0) or one of "
            f"{', '.join(LEVELS)}"
        )
    return number


def resolve(
    stats: DensityStats,
    instruments: Iterable[int],
    requested: Mapping[int, float | str],
    measured: Mapping[int, float] | None = None,
) -> dict[int, float]:
    """Notes per bar for each instrument: requested, else measured (prompt/arranged tracks),
    else the training data's median (at least MIN_DEFAULT)."""
    instruments = list(instruments)
    stray = [i for i in requested if i not in instruments]
    if stray:
        names = ", ".join(instrument_name(i) for i in stray)
        raise DensityError(f"--density names {names}, which the piece will not have")
    targets = {}
    for instrument in instruments:
        value = requested.get(instrument)
        if isinstance(value, str):
            value = level_value(stats.quartiles(instrument), value)
        elif value is None:
            value = (measured or {}).get(instrument, max(stats.default(instrument), MIN_DEFAULT))
        targets[instrument] = float(value)
    return targets


def level_value(quartiles: tuple[float, float, float], level: str) -> float:
    """Notes per bar of a level: its quartile, moved into the next bin when it shares the
    median's (a median of 14.6 and an upper quartile of 19.9 are both in [14, 20)), so that
    ``sparse`` < ``medium`` < ``dense`` always ask for three different header bins."""
    value = quartiles[LEVELS.index(level)]
    middle = density_bin(quartiles[1])
    if level == "dense" and density_bin(value) <= middle < len(DENSITY_EDGES):
        return DENSITY_EDGES[middle]  # the lower edge of the next bin
    if level == "sparse" and density_bin(value) >= middle > 0:
        return DENSITY_EDGES[middle - 2] if middle >= 2 else 0.0  # inside the bin below
    return value


def bins(targets: Mapping[int, float]) -> dict[int, int]:
    """Notes per bar -> the header's density bins."""
    return {i: density_bin(v) for i, v in targets.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure a model's densities.json again from the dataset it was trained on."""
    import argparse
    import dataclasses
    import sys

    from .config import ConfigError, load_config
    from .data.dataset import DatasetError, WindowDataset, tokenizer_of

    parser = argparse.ArgumentParser(prog="python -m polyphony.densities", description=main.__doc__)
    parser.add_argument("dataset", type=Path, help="the prepared dataset the model trained on")
    parser.add_argument("--config", type=Path, required=True, help="its training config")
    parser.add_argument("--out", type=Path, required=True, help="the model directory")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [])
        data = dataclasses.replace(cfg.data, dataset_dir=str(args.dataset))
        tokenizer = tokenizer_of(args.dataset)
        model_tokenizer = PolyTokenizer.load(args.out)
        if model_tokenizer.hash != tokenizer.hash:
            raise DensityError(f"{args.dataset} is not {args.out}'s training data (tokenizer)")
        train = WindowDataset.from_config(data, "train", seed=cfg.train.seed)
        stats = DensityStats.of_pieces(tokenizer, train.whole_pieces(), train.piece_weights())
    except (ConfigError, DatasetError, DensityError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (args.out / DENSITY_FILE).write_text(stats.to_json() + "\n")
    print(f"wrote {args.out / DENSITY_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DENSITY_FILE",
    "DensityError",
    "DensityStats",
    "LEVELS",
    "bins",
    "level_value",
    "parse_density",
    "resolve",
]
