"""How much each part plays: the training data's notes-per-bar statistics and the user's requests.

A header announces every instrument with a density bin (tokenizer.py). In training the bin is
measured on the window; in generation it comes from the request:

* a number, notes per bar: ``--density "bass=4, drums=12"``;
* a level, ``sparse`` / ``medium`` / ``dense``: that instrument's lower quartile, median and
  upper quartile in the training data;
* nothing: the instrument's median in the training data (its GM family's, then all parts',
  when the training data never had it), or, for a track of a prompt or an arranged piece,
  what it plays there.

The statistics are measured once per training run on the train split (per piece: notes per bar
of each instrument over the whole piece) and saved as ``densities.json`` beside the model, so
defaults are data, not code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .instruments import DRUMS, instrument_name, parse_instruments
from .tokenizer import DENSITY_EDGES, PolyTokenizer, density_bin

DENSITY_FILE = "densities.json"
LEVELS = ("sparse", "medium", "dense")  # lower quartile, median, upper quartile


class DensityError(ValueError):
    """A density request that cannot be read; the message says what to write instead."""


def family_of(instrument: int) -> str:
    return "Drums" if instrument == DRUMS else f"family_{instrument // 8}"


@dataclass
class DensityStats:
    """Quartiles of notes per bar (per piece) by instrument, by GM family, and over all parts."""

    instruments: dict[int, tuple[float, float, float]]
    families: dict[str, tuple[float, float, float]]
    overall: tuple[float, float, float]
    pieces: dict[int, int]

    @classmethod
    def measure(cls, per_instrument: Mapping[int, Iterable[float]]) -> DensityStats:
        values = {int(i): np.asarray(list(v), dtype=float) for i, v in per_instrument.items()}
        values = {i: v for i, v in values.items() if len(v)}
        if not values:
            raise DensityError("no notes to measure densities on")

        def quartiles(v: np.ndarray) -> tuple[float, float, float]:
            return tuple(round(float(q), 3) for q in np.percentile(v, [25, 50, 75]))

        by_family: dict[str, list[np.ndarray]] = {}
        for instrument, v in values.items():
            by_family.setdefault(family_of(instrument), []).append(v)
        return cls(
            instruments={i: quartiles(v) for i, v in sorted(values.items())},
            families={f: quartiles(np.concatenate(v)) for f, v in sorted(by_family.items())},
            overall=quartiles(np.concatenate(list(values.values()))),
            pieces={i: len(v) for i, v in sorted(values.items())},
        )

    @classmethod
    def of_pieces(cls, tokenizer: PolyTokenizer, pieces) -> DensityStats:
        """From ``(ids, track_ids, header_length)`` of whole pieces."""
        per_instrument: dict[int, list[float]] = {}
        for ids, track_ids, header_length in pieces:
            body, tracks = ids[header_length:], track_ids[header_length:]
            for instrument, value in tokenizer.notes_per_bar(body, tracks, True).items():
                per_instrument.setdefault(instrument, []).append(value)
        return cls.measure(per_instrument)

    def falling_back_to(self, base: DensityStats) -> DensityStats:
        """These statistics where they measured an instrument or family, ``base``'s elsewhere:
        a fine-tune on a few pieces keeps the trained model's defaults for what they lack."""
        return DensityStats(
            instruments=dict(sorted((base.instruments | self.instruments).items())),
            families=dict(sorted((base.families | self.families).items())),
            overall=self.overall,
            pieces=dict(sorted((base.pieces | self.pieces).items())),
        )

    def quartiles(self, instrument: int) -> tuple[float, float, float]:
        if instrument in self.instruments:
            return self.instruments[instrument]
        return self.families.get(family_of(instrument), self.overall)

    def default(self, instrument: int) -> float:
        return self.quartiles(instrument)[1]

    # ------------------------------------------------------------------ file
    def to_json(self) -> str:
        return json.dumps(
            {
                "unit": "notes per bar, per piece of the train split; quartiles 25/50/75",
                "density_edges": list(DENSITY_EDGES),
                "instruments": {
                    str(i): {"name": instrument_name(i), "quartiles": q, "pieces": self.pieces[i]}
                    for i, q in self.instruments.items()
                },
                "families": {f: list(q) for f, q in self.families.items()},
                "overall": list(self.overall),
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
            return cls(
                instruments=instruments,
                families={f: tuple(q) for f, q in data["families"].items()},
                overall=tuple(data["overall"]),
                pieces={int(i): int(e["pieces"]) for i, e in data["instruments"].items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DensityError(f"{path}: unreadable density statistics ({err})") from err


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
    else the training data's median."""
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
            value = (measured or {}).get(instrument, stats.default(instrument))
        targets[instrument] = float(value)
    return targets


def level_value(quartiles: tuple[float, float, float], level: str) -> float:
    """Notes per bar of a level: its quartile, moved into the next bin when it shares the
    median's (drums' median and upper quartile, 14.6 and 19.9, are both in [14, 20)), so that
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
