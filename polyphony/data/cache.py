"""The per-file cache of prepare: every outcome, success or failure, by content hash and
tokenizer hash, so a re-run processes only new files. Also the atomic writes every output uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..tokenizer import PolyTokenizer
from .midi_input import PieceStats, Skip, Tokenized

CACHE_VERSION = 3  # bump when per-file processing changes, so stale cache entries are ignored
# DataConfig fields that decide a single file's outcome: a cached failure is reused only under
# the same values (raise data.file_timeout_s and the timed-out files are tried again).
FILE_LIMIT_FIELDS = (
    "file_timeout_s",
    "max_memory_mb",
    "max_bars",
    "max_notes",
    "max_tokens_per_note",
    "strict",
)


def write_atomic(path: Path, write: Callable) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        write(f)
    os.replace(temporary, path)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


class PieceCache:
    """Per-file outcomes by content hash, in append-only packs under
    ``cache/v<version>-<tokenizer hash>/<n>.pack``, one pack per run.

    A record is one JSON line (sha256 and either the PieceStats or the failure with the limits
    it was found under), followed for a tokenized file by its ids (int16 little-endian) and
    track ids (uint8) as raw bytes. Packs instead of one file per MIDI file: creating a file
    costs about as much as tokenizing a small piece on a VM disk. A later record for the same
    hash wins; a record cut short by an interrupted run is ignored (the file is redone).
    Deleting the cache folder is always safe.
    """

    def __init__(self, out_dir: Path, tokenizer: PolyTokenizer, limits: DataConfig):
        order = "" if limits.note_order == "canonical" else f"-{limits.note_order}"
        self.dir = out_dir / "cache" / f"v{CACHE_VERSION}-{tokenizer.hash}{order}"
        self.settings = {name: getattr(limits, name) for name in FILE_LIMIT_FIELDS}
        self.ids_shape = tokenizer.ids_shape
        self._ids_per_token = int(np.prod(self.ids_shape))
        # sha256 -> the record's JSON and, for a tokenized file, (pack, payload offset)
        self._records: dict[str, tuple[dict, tuple[Path, int] | None]] = {}
        self._packs = sorted(self.dir.glob("*.pack"), key=lambda p: int(p.stem))
        for pack in self._packs:
            self._scan(pack)
        self._writer = None
        self._readers: dict[Path, object] = {}

    def _payload_size(self, record: dict) -> int:
        n_tokens = record["stats"]["n_tokens"] if "stats" in record else 0
        return n_tokens * (2 * self._ids_per_token + 1)

    def _scan(self, pack: Path) -> None:
        size = pack.stat().st_size
        with open(pack, "rb") as f:
            while True:
                line = f.readline()
                try:
                    record = json.loads(line)
                    sha256, payload = record["sha256"], self._payload_size(record)
                    if "stats" in record:
                        PieceStats.from_dict(record["stats"])
                    else:
                        Skip(record["stage"], record["reason"])
                except (ValueError, KeyError, TypeError):
                    return  # the end of the pack, or a record cut short
                offset = f.tell()
                if offset + payload > size:
                    return
                self._records[sha256] = (record, (pack, offset) if payload else None)
                f.seek(payload, os.SEEK_CUR)

    def get(self, sha256: str) -> PieceStats | Skip | None:
        """The cached outcome, or None if the file must be (re)processed."""
        if sha256 not in self._records:
            return None
        record, _ = self._records[sha256]
        if "stats" in record:
            return PieceStats.from_dict(record["stats"])
        if record.get("settings") == self.settings:
            return Skip(record["stage"], record["reason"])
        return None  # failed under other limits: try again

    def put(self, sha256: str, result: Tokenized | Skip) -> None:
        if self._writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            number = int(self._packs[-1].stem) + 1 if self._packs else 0
            self._writer = open(self.dir / f"{number:06d}.pack", "xb")
        if isinstance(result, Skip):
            record = {"sha256": sha256, "stage": result.stage, "reason": result.reason}
            record["settings"] = self.settings
            payload = b""
        else:
            record = {"sha256": sha256, "stats": asdict(result.stats)}
            ids = np.ascontiguousarray(result.ids, dtype="<i2")
            payload = ids.tobytes() + np.ascontiguousarray(result.track_ids, np.uint8).tobytes()
        self._writer.write(json.dumps(record).encode() + b"\n")
        offset = self._writer.tell()
        self._writer.write(payload)
        self._records[sha256] = (record, (Path(self._writer.name), offset) if payload else None)

    def arrays(self, sha256: str) -> tuple[np.ndarray, np.ndarray]:
        record, (pack, offset) = self._records[sha256]
        if self._writer is not None:
            self._writer.flush()
        if pack not in self._readers:
            self._readers[pack] = open(pack, "rb")
        reader = self._readers[pack]
        reader.seek(offset)
        n_tokens = record["stats"]["n_tokens"]
        n_ids = n_tokens * self._ids_per_token
        data = reader.read(self._payload_size(record))
        ids = np.frombuffer(data, dtype="<i2", count=n_ids).reshape(n_tokens, *self.ids_shape)
        return ids, np.frombuffer(data, dtype=np.uint8, offset=2 * n_ids)

    def close(self) -> None:
        for f in [self._writer, *self._readers.values()]:
            if f is not None:
                f.close()
        self._writer, self._readers = None, {}
