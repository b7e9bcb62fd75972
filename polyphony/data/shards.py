"""Which split a piece belongs to, and writing a split's shards (ids.npy, track_ids.npy,
offsets.npy, pieces.jsonl) from the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..tokenizer import PolyTokenizer
from .cache import PieceCache, write_atomic, write_text
from .midi_input import MidiFile, PieceStats

MANIFEST_FILE = "manifest.json"  # a prepared dataset's summary, written last (dataset.py reads it)


def split_of(sha256: str, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split by content hash: a file keeps its split when others are added."""
    u = int(sha256[:8], 16) / 2**32
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def ensure_validation(members: dict[str, list], minimum: int) -> None:
    """Move training pieces to validation until it holds ``minimum`` (a small folder's hash
    split may leave it empty), keeping one to train on. Which pieces move depends only on
    their content hashes: the train list is in hash order."""
    while len(members["validation"]) < minimum and len(members["train"]) > 1:
        members["validation"].append(members["train"].pop(0))
    members["validation"].sort(key=lambda member: member[0].sha256)


def write_split(
    split_dir: Path,
    members: list[tuple[MidiFile, PieceStats]],
    cache: PieceCache,
    tokenizer: PolyTokenizer,
) -> None:
    """Stream one split's pieces from the cache into ids.npy / track_ids.npy (no full copy in
    memory), plus offsets.npy and pieces.jsonl."""
    lengths = np.array([stats.n_tokens for _, stats in members], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_rows = int(offsets[-1])

    def write_shards(ids_file, tracks_file) -> None:
        for f, dtype, shape in (
            (ids_file, np.int16, (n_rows, *tokenizer.ids_shape)),
            (tracks_file, np.uint8, (n_rows,)),
        ):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "shape": shape}
            np.lib.format.write_array_header_1_0(f, {**header, "fortran_order": False})
        for midi_file, _ in members:
            ids, track_ids = cache.arrays(midi_file.sha256)
            ids_file.write(np.ascontiguousarray(ids, dtype=np.int16).tobytes())
            tracks_file.write(np.ascontiguousarray(track_ids, dtype=np.uint8).tobytes())

    tracks_path = split_dir / "track_ids.npy"
    tracks_temporary = tracks_path.with_name(f"{tracks_path.name}.tmp{os.getpid()}")
    split_dir.mkdir(parents=True, exist_ok=True)
    with open(tracks_temporary, "wb") as tracks_file:
        write_atomic(split_dir / "ids.npy", lambda f: write_shards(f, tracks_file))
    os.replace(tracks_temporary, tracks_path)
    write_atomic(split_dir / "offsets.npy", lambda f: np.save(f, offsets))
    lines = [
        json.dumps(
            {
                "sha256": midi_file.sha256,
                "path": midi_file.relpath,
                "source": midi_file.source,
                "instruments": list(stats.instruments),
                "n_tokens": stats.n_tokens,
                "n_notes": stats.n_notes,
                "seconds": stats.seconds,
            }
        )
        for midi_file, stats in members
    ]
    write_text(split_dir / "pieces.jsonl", "".join(line + "\n" for line in lines))
