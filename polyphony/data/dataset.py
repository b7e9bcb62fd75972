"""Prepared shards -> training windows: instrument header, track ids, labels, augmentation.

A *window* is one row of a batch: a header (``BOS <instrument, density>... SEP``) followed by a
stretch of the piece's body, ``max_seq_len`` positions in all, right-padded. The header is
*window-true*: it lists the instruments that play in that stretch, each with the density bin of
its notes per bar there (``PolyTokenizer.notes_per_bar``), so the model learns to write every
announced part at the announced density, wherever in the piece the window begins. Generation
writes the same header from the request.

Train windows are drawn at random, yet item ``i`` of epoch ``e`` is a pure function of
``(seed, e, i)`` (its own ``np.random.default_rng([seed, e, i])``): a resumed run sees exactly
the windows, and the augmentations, it would have seen without the interruption. A draw picks a
source (by ``source_weights``), a piece of that source (by its length in tokens), a start
(moved back to the bar line before it when ``bar_aligned``), then a transposition and a velocity shift.

Validation and test windows are fixed: every piece cut into consecutive, non-overlapping
chunks, in shard order, never augmented, so evaluation losses compare across runs.

Shards are opened with ``np.load(mmap_mode="r")``: a window reads only its own rows, and memory
does not grow with the size of the corpus (only the per-piece index, O(pieces), is in RAM).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import CPWORD_FIELDS, DataConfig
from ..instruments import DRUMS, GLOBAL_TRACK
from ..tokenizer import (
    HEADER_FORMAT,
    TOKENIZER_FILE,
    PolyTokenizer,
    density_bin,
)
from .fim import fill_in_the_middle
from .shards import MANIFEST_FILE

SPLITS = ("train", "validation", "test")
PIECES_FILE = "pieces.jsonl"
SHARD_FILES = ("ids.npy", "track_ids.npy", "offsets.npy")
PREPARE_COMMAND = "python -m polyphony.data.prepare MIDI_DIR --out DATASET_DIR --tokenization KIND"

_FIELD = {name: column for column, name in enumerate(CPWORD_FIELDS)}


class DatasetError(ValueError):
    """A dataset directory that cannot be used as asked; the message names the directory and the fix."""


def load_manifest(dataset_dir: str | Path) -> dict:
    """The ``manifest.json`` of a prepared dataset, with an actionable error if there is none."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset directory not found. Prepare one from a MIDI folder with "
            f"`{PREPARE_COMMAND}`, or set data.dataset_dir to an existing one."
        )
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(
            f"{root}: no {MANIFEST_FILE}, so this is not a prepared dataset (or prepare did not "
            f"finish). Run `{PREPARE_COMMAND}` with this directory as DATASET_DIR."
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{path}: unreadable manifest ({err}); re-run `{PREPARE_COMMAND}` into this directory."
        ) from err


def tokenizer_of(dataset_dir: str | Path) -> PolyTokenizer:
    """The tokenizer a dataset was prepared with, checked against the manifest's hash."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    if not (root / TOKENIZER_FILE).is_file():
        raise DatasetError(
            f"{root}: {TOKENIZER_FILE} is missing; re-run `{PREPARE_COMMAND}` into this directory."
        )
    if manifest.get("header_format", 1) != HEADER_FORMAT:
        raise DatasetError(
            f"{root}: prepared with header format {manifest.get('header_format', 1)}, this "
            f"polyphony reads format {HEADER_FORMAT} (canonical note order, per-track densities); "
            f"re-run `{PREPARE_COMMAND}` into a fresh directory."
        )
    tokenizer = PolyTokenizer.load(root)
    if manifest.get("tokenizer_hash") != tokenizer.hash:
        raise DatasetError(
            f"{root}: {TOKENIZER_FILE} (hash {tokenizer.hash}) does not match the tokenizer the "
            f"shards were written with ({MANIFEST_FILE}: {manifest.get('tokenizer_hash')}); "
            f"the directory was modified by hand. Re-run `{PREPARE_COMMAND}` into a fresh directory."
        )
    return tokenizer


@dataclass
class Window:
    """One window before padding: ``ids``/``track_ids`` hold up to ``max_seq_len + 1`` rows
    (the extra row is the last label). ``start`` is the row of the piece where the body slice
    begins (the header length when the window starts at the top of the piece)."""

    piece: int
    start: int
    transpose: int  # semitones applied to pitched notes
    velocity_bins: int  # velocity bins added to every note
    ids: np.ndarray
    track_ids: np.ndarray


class WindowDataset(Dataset):
    """Fixed-length training windows over the shards of one split of a prepared dataset."""

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        max_seq_len: int,
        seed: int = 0,
        source_weights: dict[str, float] | None = None,
        augment: bool = True,
        bar_aligned: bool = True,
        transpose_semitones: int = 5,
        velocity_shift: int = 8,
        windows_per_epoch: int | None = None,
        track_densities: bool = True,
        fim_rate: float = 0.0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}: a window needs at least 2 positions")
        self.root = Path(dataset_dir)
        self.split = split
        self.max_seq_len = int(max_seq_len)
        self.seed = int(seed)
        self.epoch = 0
        self.is_train = split == "train"
        # Evaluation windows must be identical from run to run: never augmented.
        self.augment = bool(augment) and self.is_train
        self.bar_aligned = bool(bar_aligned)
        self.transpose_semitones = int(transpose_semitones)
        self.track_densities = bool(track_densities)
        if not 0.0 <= fim_rate <= 1.0:
            raise ValueError(f"data.fim_rate={fim_rate}: a share of windows, 0..1")
        self.fim_rate = float(fim_rate) if self.is_train else 0.0
        self.manifest = load_manifest(self.root)
        self.tokenizer = tokenizer_of(self.root)

        self.split_dir = self.root / split
        missing = [n for n in (*SHARD_FILES, PIECES_FILE) if not (self.split_dir / n).is_file()]
        if missing:
            raise DatasetError(
                f"{self.split_dir}: missing {', '.join(missing)}; the dataset is incomplete. "
                f"Re-run `{PREPARE_COMMAND}` into {self.root}."
            )
        self._ids: np.ndarray | None = None
        self._track_ids: np.ndarray | None = None
        self.offsets = np.load(self.split_dir / "offsets.npy").astype(np.int64)
        self._read_pieces()
        self._check_shards()
        self._build_token_tables(velocity_shift)

        lengths = np.diff(self.offsets)
        # The header stored with each piece (whole-piece densities); windows write their own.
        self.header_lengths = np.array(
            [self.tokenizer.header_length(len(i)) for i in self.instruments], dtype=np.int64
        )
        self.piece_lengths = lengths
        if self.is_train:
            self._build_sampler(source_weights or {})
            if windows_per_epoch is None:
                windows_per_epoch = max(int(lengths.sum()) // self.max_seq_len, self.n_pieces)
            self.windows_per_epoch = int(windows_per_epoch)
        elif windows_per_epoch is not None:
            raise ValueError(
                f"windows_per_epoch applies to the train split only; {split} always has one "
                "window per chunk of every piece"
            )
        else:
            capacity = self._body_capacity(self.header_lengths)
            chunks = -(-(lengths - self.header_lengths) // capacity)  # ceil division
            self._chunk_starts = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
            self.windows_per_epoch = int(self._chunk_starts[-1])

    @classmethod
    def from_config(cls, data_cfg: DataConfig, split: str, seed: int = 0) -> WindowDataset:
        """The split of ``data_cfg.dataset_dir``, refusing shards of another tokenization."""
        manifest = load_manifest(data_cfg.dataset_dir)
        prepared_kind = manifest.get("tokenization")
        prepare = f"`{PREPARE_COMMAND.replace('KIND', data_cfg.tokenization)}`"
        if prepared_kind != data_cfg.tokenization:
            raise DatasetError(
                f"{data_cfg.dataset_dir}: prepared with tokenization {prepared_kind!r}, but "
                f"data.tokenization={data_cfg.tokenization!r}. Set data.tokenization="
                f"{prepared_kind!r}, or prepare a {data_cfg.tokenization} dataset with {prepare} "
                "into another directory."
            )
        return cls(
            data_cfg.dataset_dir,
            split,
            data_cfg.max_seq_len,
            seed=seed,
            source_weights=data_cfg.source_weights,
            augment=split == "train",
            bar_aligned=data_cfg.bar_aligned_windows,
            transpose_semitones=data_cfg.transpose_semitones,
            velocity_shift=data_cfg.velocity_shift,
            track_densities=data_cfg.track_densities,
            fim_rate=data_cfg.fim_rate,
        )

    # ----------------------------------------------------------------- shards and pieces
    def _read_pieces(self) -> None:
        """Keep only what windows need per piece (instruments, source), not the whole record."""
        self.instruments: list[tuple[int, ...]] = []
        source_names: list[str] = []
        with open(self.split_dir / PIECES_FILE) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.instruments.append(tuple(int(i) for i in record["instruments"]))
                    source_names.append(str(record.get("source", "")))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise DatasetError(
                        f"{self.split_dir / PIECES_FILE}:{number}: bad piece record ({err}); "
                        f"re-run `{PREPARE_COMMAND}` into {self.root}."
                    ) from err
        self.sources = sorted(set(source_names))
        code = {name: index for index, name in enumerate(self.sources)}
        self.piece_sources = np.array([code[n] for n in source_names], dtype=np.int32)

    def _check_shards(self) -> None:
        ids, track_ids = self.shards
        problem = None
        if len(self.offsets) != len(self.instruments) + 1:
            problem = f"{len(self.offsets) - 1} pieces in offsets.npy, {len(self.instruments)} in {PIECES_FILE}"
        elif (
            self.offsets[0] != 0
            or self.offsets[-1] != len(ids)
            or (np.diff(self.offsets) <= 0).any()
        ):
            problem = f"offsets.npy does not partition the {len(ids)} rows of ids.npy"
        elif ids.shape[1:] != self.tokenizer.ids_shape:
            problem = f"ids.npy rows have shape {ids.shape[1:]}, the {self.tokenizer.kind} tokenizer {self.tokenizer.ids_shape}"
        elif len(track_ids) != len(ids):
            problem = f"track_ids.npy has {len(track_ids)} rows, ids.npy {len(ids)}"
        if problem:
            raise DatasetError(
                f"{self.split_dir}: inconsistent shards ({problem}); re-run `{PREPARE_COMMAND}`."
            )

    @property
    def shards(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, track_ids) memmaps, opened on first use in each process (see __getstate__)."""
        if self._ids is None:
            self._ids = np.load(self.split_dir / "ids.npy", mmap_mode="r")
            self._track_ids = np.load(self.split_dir / "track_ids.npy", mmap_mode="r")
        return self._ids, self._track_ids

    def __getstate__(self) -> dict:
        # Pickling an np.memmap copies its whole contents; DataLoader workers reopen instead.
        state = dict(self.__dict__)
        state["_ids"] = state["_track_ids"] = None
        return state

    @property
    def n_pieces(self) -> int:
        return len(self.instruments)

    def source_of(self, piece: int) -> str:
        """The source (first folder below the MIDI root, "" if none) a piece came from."""
        return self.sources[self.piece_sources[piece]]

    def source_counts(self) -> dict[str, int]:
        """Pieces per source in this split."""
        counts = np.bincount(self.piece_sources, minlength=len(self.sources))
        return {name: int(n) for name, n in zip(self.sources, counts, strict=True)}

    def piece_ids(self, piece: int) -> np.ndarray:
        """All rows of one piece (header, body, EOS) as stored in the shard."""
        ids, _ = self.shards
        return np.asarray(ids[self.offsets[piece] : self.offsets[piece + 1]], dtype=np.int64)

    def piece_weights(self) -> np.ndarray:
        """Each piece's share of training: its source's probability (source_weights) split
        evenly over the source's pieces (train split only)."""
        weights = np.zeros(self.n_pieces)
        for pieces, probability in zip(
            self._pieces_of_source, self._active_probabilities, strict=True
        ):
            weights[pieces] = probability / len(pieces)
        return weights

    def whole_pieces(self):
        """``(ids, track_ids, header_length)`` of every piece, as stored (for statistics)."""
        ids, track_ids = self.shards
        for piece in range(self.n_pieces):
            rows = slice(int(self.offsets[piece]), int(self.offsets[piece + 1]))
            yield (
                np.asarray(ids[rows], dtype=np.int64),
                np.asarray(track_ids[rows], dtype=np.int64),
                int(self.header_lengths[piece]),
            )

    # ----------------------------------------------------------------- token lookup tables
    def _build_token_tables(self, velocity_shift: int) -> None:
        """id -> pitch / velocity bin tables (and back), so augmentation is array indexing."""
        tokenizer = self.tokenizer
        if tokenizer.kind == "remi":
            pitch_field, velocity_field = 0, 0
        else:
            pitch_field, velocity_field = _FIELD["pitch"], _FIELD["velocity"]
            self.drum_program_id = tokenizer.program_token(DRUMS)

        # Pitch_x only: drums are PitchDrum_x tokens, absent from this table, so never moved.
        self._pitch_of, self._pitch_id = self._value_table(pitch_field, "Pitch_")
        velocity_of, velocity_id = self._value_table(velocity_field, "Velocity_")
        pitches = np.flatnonzero(self._pitch_id >= 0)
        if not len(pitches) or len(pitches) != pitches[-1] - pitches[0] + 1:
            raise DatasetError(f"{self.root}: the tokenizer's pitches are not a contiguous range")
        self.pitch_range = (int(pitches[0]), int(pitches[-1]))
        # Velocities as bins (0..n-1), so a shift moves every note by the same number of bins.
        velocities = np.flatnonzero(velocity_id >= 0)
        self._velocity_bin_of = np.where(
            velocity_of >= 0, np.searchsorted(velocities, velocity_of), -1
        )
        self._velocity_id = velocity_id[velocities]
        # velocity_shift is in MIDI velocity units; the vocabulary moves in whole bins.
        bin_width = (velocities[-1] - velocities[0]) / max(len(velocities) - 1, 1)
        self.velocity_bins_max = int(round(velocity_shift / bin_width)) if bin_width else 0

    def _value_table(self, field: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """(id -> value or -1, value -> id or -1) for tokens named ``<prefix><int value>``."""
        size = self.tokenizer.vocab_sizes[field]
        value_of = np.full(size, -1, dtype=np.int64)
        for token_id in range(size):
            name = self.tokenizer.token_name(token_id, field)
            if name.startswith(prefix):
                value_of[token_id] = int(name[len(prefix) :])
        id_of = np.full(int(value_of.max()) + 1, -1, dtype=np.int64)
        id_of[value_of[value_of >= 0]] = np.flatnonzero(value_of >= 0)
        return value_of, id_of

    # ----------------------------------------------------------------- windows
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.windows_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.window(index)
        return self._to_item(window.ids, window.track_ids)

    def window(self, index: int) -> Window:
        """Item ``index`` of the current epoch, before padding (for inspection and tests)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range ({len(self)} windows)")
        if self.is_train:
            return self._train_window(index)
        return self._evaluation_window(index)

    def _body_capacity(self, header_length):
        # Rows of body per window: T inputs + 1 label, minus the header (at least one row, so a
        # piece whose header fills the window still advances).
        return np.maximum(self.max_seq_len + 1 - header_length, 1)

    def _build_sampler(self, source_weights: dict[str, float]) -> None:
        unknown = sorted(set(source_weights) - set(self.sources))
        if unknown:
            warnings.warn(
                f"source_weights name sources with no {self.split} pieces in {self.root}: "
                f"{', '.join(unknown)} (sources here: {', '.join(map(repr, self.sources))})",
                stacklevel=3,
            )
        weights = []
        for name in self.sources:
            weight = float(source_weights.get(name, 1.0))
            if not math.isfinite(weight) or weight < 0:
                raise DatasetError(
                    f"source_weights[{name!r}]={weight}: must be a finite number >= 0"
                )
            weights.append(weight)
        weights = np.array(weights)
        if not len(weights) or weights.sum() <= 0:
            raise DatasetError(
                f"{self.split_dir}: nothing to sample (sources {self.sources}, weights "
                f"{weights.tolist()}); prepare more data or give a source a weight > 0."
            )
        self.source_probabilities = {
            name: float(w / weights.sum()) for name, w in zip(self.sources, weights, strict=True)
        }
        self._active_sources = np.flatnonzero(weights > 0)
        self._active_probabilities = weights[self._active_sources] / weights.sum()
        self._pieces_of_source = [
            np.flatnonzero(self.piece_sources == s) for s in self._active_sources
        ]
        lengths = np.diff(self.offsets)
        self._cumulative_tokens = [np.cumsum(lengths[p]) for p in self._pieces_of_source]

    def _train_window(self, index: int) -> Window:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        source = rng.choice(len(self._active_sources), p=self._active_probabilities)
        cumulative = self._cumulative_tokens[source]
        draw = rng.integers(cumulative[-1])
        piece = int(self._pieces_of_source[source][np.searchsorted(cumulative, draw, side="right")])
        length = int(self.piece_lengths[piece])
        header_length = int(self.header_lengths[piece])
        capacity = int(self._body_capacity(header_length))
        # Starts run from the top of the body to the last one that still fills the window.
        start = int(rng.integers(header_length, max(header_length, length - capacity) + 1))
        if self.bar_aligned:
            start = self._bar_line_at_or_before(piece, start, capacity)
        ids, track_ids = self._assemble(piece, start, capacity)
        transpose = velocity_bins = 0
        if self.augment:
            ids, transpose, velocity_bins = self._augment(ids, rng)
        # Drawn after everything else, so the windows of fim_rate 0 are those of fim_rate > 0
        # left as they were (the FIM-for-free comparison runs on the same data).
        if rng.random() < self.fim_rate:
            ids, track_ids = fill_in_the_middle(
                self.tokenizer, ids, track_ids, self.max_seq_len + 1, rng
            )
        return Window(piece, start, transpose, velocity_bins, ids, track_ids)

    def _evaluation_window(self, index: int) -> Window:
        piece = int(np.searchsorted(self._chunk_starts, index, side="right") - 1)
        header_length = int(self.header_lengths[piece])
        capacity = int(self._body_capacity(header_length))
        start = header_length + (index - int(self._chunk_starts[piece])) * capacity
        ids, track_ids = self._assemble(piece, start, capacity)
        return Window(piece, start, 0, 0, ids, track_ids)

    def _bar_line_at_or_before(self, piece: int, start: int, capacity: int) -> int:
        """The last bar line at or before ``start``, read backwards one window at a time (a
        bar is rarely longer than a window). The body opens with a bar line, so one exists."""
        ids, _ = self.shards
        base, header_length = int(self.offsets[piece]), int(self.header_lengths[piece])
        high = start + 1
        while high > header_length:
            low = max(header_length, high - capacity)
            bars = np.flatnonzero(self.tokenizer.is_bar(np.asarray(ids[base + low : base + high])))
            if len(bars):
                return low + int(bars[-1])
            high = low
        return header_length

    def _assemble(self, piece: int, start: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Window-true header + piece rows ``start:start+capacity``, at most T+1 rows, as int64
        copies. The header is never longer than the piece's own, so the window always fits."""
        ids, track_ids = self.shards
        base, piece_end = int(self.offsets[piece]), int(self.offsets[piece + 1])
        end = min(base + start + capacity, piece_end)
        # Stored track ids, not recomputed: a slice that begins mid-note (REMI, no bar
        # alignment) still knows the instrument of its leading Pitch/Velocity/Duration tokens.
        body = np.asarray(ids[base + start : end], dtype=np.int64)
        body_tracks = np.asarray(track_ids[base + start : end], dtype=np.int64)
        densities = self.tokenizer.notes_per_bar(body, body_tracks, ends_piece=end == piece_end)
        header = self.tokenizer.header(
            {i: density_bin(d) if self.track_densities else 0 for i, d in densities.items()}
        )
        header_tracks = self.tokenizer.track_ids(header)
        limit = self.max_seq_len + 1
        return (
            np.concatenate([header, body])[:limit],
            np.concatenate([header_tracks, body_tracks])[:limit],
        )

    def _augment(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        """Transpose pitched notes and shift all note velocities, in place on a copy.

        The transposition is drawn from the shifts that keep every pitch of the window inside
        the vocabulary, so no note is lost. Drum notes (REMI ``PitchDrum_x``; CPWord note
        compounds of program -1, whose pitch field holds PitchDrum_x) are never transposed:
        their pitch is an instrument, not a note. Velocities move by whole bins, clamped to the
        vocabulary's bins.
        """
        if self.tokenizer.kind == "remi":
            pitch_slot, velocity_slot = ids, ids
            notes = np.ones(len(ids), dtype=bool)
        else:
            notes = ids[:, 0] == self.tokenizer.family_note_id
            pitch_slot = ids[:, _FIELD["pitch"]]
            velocity_slot = ids[:, _FIELD["velocity"]]
        pitches = self._pitch_of[pitch_slot]
        pitched = (pitches >= 0) & notes
        if self.tokenizer.kind == "cpword":
            pitched &= ids[:, _FIELD["program"]] != self.drum_program_id
        low, high = -self.transpose_semitones, self.transpose_semitones
        if pitched.any():
            low = max(low, self.pitch_range[0] - int(pitches[pitched].min()))
            high = min(high, self.pitch_range[1] - int(pitches[pitched].max()))
        transpose = int(rng.integers(low, high + 1))
        velocity_bins = int(rng.integers(-self.velocity_bins_max, self.velocity_bins_max + 1))

        pitch_slot[pitched] = self._pitch_id[pitches[pitched] + transpose]
        bins = self._velocity_bin_of[velocity_slot]
        has_velocity = (bins >= 0) & notes
        moved = np.clip(bins[has_velocity] + velocity_bins, 0, len(self._velocity_id) - 1)
        velocity_slot[has_velocity] = self._velocity_id[moved]
        return ids, transpose, velocity_bins

    def _to_item(self, ids: np.ndarray, track_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Pad to T+1 rows, then split into inputs (first T) and next-position labels."""
        rows = self.max_seq_len + 1
        missing = rows - len(ids)
        if missing:
            padding = np.full((missing, *self.tokenizer.ids_shape), self.tokenizer.pad_id)
            ids = np.concatenate([ids, padding])
            # Padded inputs get the global track: still a valid embedding row, ignored by labels.
            track_ids = np.concatenate([track_ids, np.full(missing, GLOBAL_TRACK)])
        labels, label_track_ids = self.tokenizer.labels_for(ids, track_ids)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(ids[:-1], dtype=np.int64)),
            "track_ids": torch.from_numpy(np.ascontiguousarray(track_ids[:-1], dtype=np.int64)),
            "labels": torch.from_numpy(labels),
            "label_track_ids": torch.from_numpy(label_track_ids),
        }


__all__ = [
    "DatasetError",
    "SPLITS",
    "Window",
    "WindowDataset",
    "load_manifest",
    "tokenizer_of",
]
