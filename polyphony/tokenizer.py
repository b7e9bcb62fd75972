"""miditok REMI / CPWord set-up, the instrument header, per-token track ids, encode and decode.

Every sequence polyphony trains on or generates has the same shape::

    BOS  <per instrument (programs ascending, drums last): its program, its density>  SEP
    <miditok body>  EOS

REMI writes each header entry as its own ``Program_x`` token followed by a ``Density_k``
token. CPWord writes one compound per header entry: ``[BOS]*8``, then
``[BOS, Density_k, Ignore, .., Program_x, Ignore, Ignore]`` per instrument (family column BOS
marks a header row; the density sits in the position column), then ``[SEP]*8``; EOS is
``[EOS]*8``. ``Density_k`` tokens are ours, appended after miditok's ids: bin ``k`` of the
instrument's notes per bar (``DENSITY_EDGES``, docs/tokenization.md).

The header is how generation is conditioned on an instrument list and on how much each part
plays: the prompt *is* the header. A training window's header lists the instruments that play
*in that window* with their density there (data/dataset.py).

Notes are put in a canonical order before miditok sees them (``canonical_score``): at one
onset, instruments in header order, and within an instrument pitches ascending. miditok sorts
the stream by time only (stably), so without this the order at an onset would be the file's
track order, which differs from file to file.

Track ids give every token the instrument it belongs to (0..127 programs, 128 drums) or
``GLOBAL_TRACK`` (bar, position, tempo, meter, specials). They are computed from the ids alone,
so generation can extend them token by token. BPE is deliberately not used: merged tokens
straddle notes of different instruments and would have no single track id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from miditok import REMI, CPWord, MusicTokenizer, TokenizerConfig
from symusic import Note, Score

from .config import CPWORD_FIELDS
from .instruments import (
    DRUMS,
    GLOBAL_TRACK,
    instrument_name,
    instrument_to_program,
    program_to_instrument,
)

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ["PAD", "BOS", "EOS", "MASK", "SEP"]
N_SPECIALS = len(SPECIAL_TOKENS)  # ids 0..4 in every vocabulary (each CPWord column too)
# Meters of real music beyond miditok's default set; a piece in any other meter is refused
# (miditok would silently re-bar it as 4/4).
TIME_SIGNATURES = {
    8: [1, 2, 3, 4, 5, 6, 7, 9, 12],
    4: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    2: [1, 2, 3, 4],
}
# Density bins: bin k holds notes per bar in [DENSITY_EDGES[k-1], DENSITY_EDGES[k]); bin 0 is
# below the first edge (a part that barely plays), the last bin at or above the last edge.
# Log-spaced (ratio ~1.4-2) over the corpus' range: per-piece medians are 3-14 notes per bar
# for band parts, 95% of windows fall below 28 (docs/tokenization.md has the distribution).
DENSITY_EDGES = (0.5, 1.0, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0)
N_DENSITY_BINS = len(DENSITY_EDGES) + 1
HEADER_FORMAT = 2  # 1: programs only, per piece; 2: program + density, per window
CPWORD_DENSITY_COLUMN = CPWORD_FIELDS.index("position")  # header rows leave it free
# Token families of REMI, the targets of the `next_type` head.
REMI_TOKEN_TYPES = (
    "PAD", "BOS", "EOS", "MASK", "SEP", "Bar", "Position", "Tempo", "TimeSig",
    "Program", "Pitch", "PitchDrum", "Velocity", "Duration", "Density",
)  # fmt: skip
_NOTE_ATTRIBUTES = ("Pitch", "PitchDrum", "Velocity", "Duration")


class TokenizationError(ValueError):
    """A piece that cannot be tokenized faithfully (e.g. a meter outside the vocabulary)."""


class DecodeError(ValueError):
    """Token ids that do not form a decodable piece."""


@dataclass
class EncodedPiece:
    ids: np.ndarray  # [T] (REMI) or [T, 8] (CPWord), int64
    track_ids: np.ndarray  # [T] int64, instrument id per token or GLOBAL_TRACK
    instruments: tuple[int, ...]  # sorted, drums last
    densities: dict[int, float]  # notes per bar of each instrument over the whole piece

    @property
    def header_length(self) -> int:
        return len(self.instruments) * (1 if self.ids.ndim == 2 else 2) + 2

    def __len__(self) -> int:
        return len(self.ids)


def miditok_config(tokenization: str) -> TokenizerConfig:
    return TokenizerConfig(
        use_programs=True,
        one_token_stream_for_programs=True,
        use_tempos=True,
        use_time_signatures=True,
        use_rests=False,
        pitch_range=(0, 127),
        drums_pitch_range=(0, 127),
        special_tokens=list(SPECIAL_TOKENS),
        time_signature_range=TIME_SIGNATURES,
    )


class PolyTokenizer:
    """A miditok REMI or CPWord tokenizer plus polyphony's header and track ids."""

    def __init__(self, miditok_tokenizer: MusicTokenizer):
        self.miditok = miditok_tokenizer
        if isinstance(miditok_tokenizer, CPWord):
            self.kind = "cpword"
        elif isinstance(miditok_tokenizer, REMI):
            self.kind = "remi"
        else:
            raise TypeError(
                f"unsupported tokenizer {type(miditok_tokenizer).__name__}: use REMI or CPWord"
            )
        self._build_tables()

    # ----------------------------------------------------------------- construction / IO
    @classmethod
    def build(cls, tokenization: str = "remi") -> PolyTokenizer:
        classes = {"remi": REMI, "cpword": CPWord}
        if tokenization not in classes:
            raise ValueError(f"unknown tokenization {tokenization!r}: expected remi or cpword")
        return cls(classes[tokenization](miditok_config(tokenization)))

    @classmethod
    def load(cls, path: str | Path) -> PolyTokenizer:
        """Load ``tokenizer.json`` (the file, or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found (expected {TOKENIZER_FILE})")
        try:
            kind = json.loads(path.read_text())["tokenization"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a miditok tokenizer.json ({err})") from err
        classes = {"REMI": REMI, "CPWord": CPWord}
        if kind not in classes:
            raise ValueError(f"{path}: tokenization {kind!r} is not supported (REMI or CPWord)")
        # `params=` with a file path: from_pretrained(<file>) fails in miditok 3.1 (LIBRARY_NOTES §2).
        return cls(classes[kind](params=path))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self.miditok.save(path)
        return path

    @property
    def hash(self) -> str:
        """Identifies the vocabulary: models and datasets record it and refuse a mismatch."""
        state = {"kind": self.kind, "config": self.miditok.config.to_dict(serialize=True)}
        state["density_edges"] = list(DENSITY_EDGES)
        blob = json.dumps(state, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ----------------------------------------------------------------- vocabulary tables
    def _build_tables(self) -> None:
        if self.kind == "remi":
            vocab = self.miditok.vocab
            self.density_base = len(vocab)
            size = len(vocab) + N_DENSITY_BINS
            names = [None] * size
            for token, index in vocab.items():
                names[index] = token
            for k in range(N_DENSITY_BINS):
                names[self.density_base + k] = f"Density_{k}"
            kinds = [name.split("_", 1)[0] for name in names]
            self.token_types = [REMI_TOKEN_TYPES.index(k) for k in kinds]
            self.n_token_types = len(REMI_TOKEN_TYPES)
            self._is_program = np.array([k == "Program" for k in kinds])
            # A header's Density token belongs to the instrument whose Program precedes it.
            self._is_note_attribute = np.array([k in (*_NOTE_ATTRIBUTES, "Density") for k in kinds])
            self._instrument_of = np.full(size, GLOBAL_TRACK, dtype=np.int64)
            for index, name in enumerate(names):
                if kinds[index] == "Program":
                    self._instrument_of[index] = program_to_instrument(int(name.split("_", 1)[1]))
            self._token_names = names
            self._pitch_of = _pitch_table(names)
            self.vocab_sizes = [size]
            self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.sep_id = (
                vocab[f"{s}_None"] for s in ("PAD", "BOS", "EOS", "MASK", "SEP")
            )
        else:
            vocabs = self.miditok.vocab
            self.vocab_sizes = [len(v) for v in vocabs]
            self.density_base = self.vocab_sizes[CPWORD_DENSITY_COLUMN]
            self.vocab_sizes[CPWORD_DENSITY_COLUMN] += N_DENSITY_BINS
            self.token_types = []
            self.n_token_types = 0
            self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.sep_id = (
                vocabs[0][f"{s}_None"] for s in ("PAD", "BOS", "EOS", "MASK", "SEP")
            )
            self.ignore_id = vocabs[1]["Ignore_None"]
            self.family_metric_id = vocabs[0]["Family_Metric"]
            self.family_note_id = vocabs[0]["Family_Note"]
            program_vocab = vocabs[CPWORD_FIELDS.index("program")]
            self._instrument_of = np.full(len(program_vocab), GLOBAL_TRACK, dtype=np.int64)
            for token, index in program_vocab.items():
                if token.startswith("Program_"):
                    self._instrument_of[index] = program_to_instrument(int(token.split("_", 1)[1]))
            self._token_names = [
                {index: token for token, index in vocab.items()} for vocab in vocabs
            ]
            for k in range(N_DENSITY_BINS):
                self._token_names[CPWORD_DENSITY_COLUMN][self.density_base + k] = f"Density_{k}"
            self._pitch_of = _pitch_table(self._token_names[CPWORD_FIELDS.index("pitch")])

    def program_token(self, instrument: int) -> int:
        """The id of the Program token (REMI) / program-field value (CPWord) of an instrument."""
        name = f"Program_{instrument_to_program(instrument)}"
        if self.kind == "remi":
            return self.miditok.vocab[name]
        return self.miditok.vocab[CPWORD_FIELDS.index("program")][name]

    def token_name(self, token_id: int, field: int = 0) -> str:
        return (
            self._token_names[token_id]
            if self.kind == "remi"
            else self._token_names[field][token_id]
        )

    @property
    def ids_shape(self) -> tuple[int, ...]:
        """Trailing shape of one position's ids: () for REMI, (8,) for CPWord."""
        return () if self.kind == "remi" else (len(CPWORD_FIELDS),)

    # ----------------------------------------------------------------- header and tracks
    def header(self, densities: dict[int, int]) -> np.ndarray:
        """BOS, then per instrument (sorted, drums last) its program and density bin, SEP.

        ``densities`` maps each instrument to its density bin (``density_bin``)."""
        ordered = sorted(int(i) for i in densities)
        for instrument in ordered:
            instrument_name(instrument)  # raises on an out-of-range id
            if not 0 <= int(densities[instrument]) < N_DENSITY_BINS:
                raise ValueError(
                    f"density bin {densities[instrument]}: expected 0..{N_DENSITY_BINS - 1}"
                )
        if self.kind == "remi":
            entries = [
                token
                for i in ordered
                for token in (self.program_token(i), self.density_base + int(densities[i]))
            ]
            return np.array([self.bos_id, *entries, self.sep_id], dtype=np.int64)
        n_fields = len(CPWORD_FIELDS)
        rows = [np.full(n_fields, self.bos_id, dtype=np.int64)]
        for instrument in ordered:
            row = np.full(n_fields, self.ignore_id, dtype=np.int64)
            row[0] = self.bos_id
            row[CPWORD_DENSITY_COLUMN] = self.density_base + int(densities[instrument])
            row[CPWORD_FIELDS.index("program")] = self.program_token(instrument)
            rows.append(row)
        rows.append(np.full(n_fields, self.sep_id, dtype=np.int64))
        return np.stack(rows)

    def header_length(self, n_instruments: int) -> int:
        return n_instruments * (2 if self.kind == "remi" else 1) + 2

    def header_densities(self, header: np.ndarray) -> dict[int, int]:
        """Instrument -> density bin, read back from a header."""
        header = np.asarray(header, dtype=np.int64)
        tracks = self.track_ids(header)
        if self.kind == "remi":
            is_density = header >= self.density_base
            return {
                int(t): int(v - self.density_base)
                for t, v in zip(tracks[is_density], header[is_density], strict=True)
            }
        column = header[:, CPWORD_DENSITY_COLUMN]
        is_density = (header[:, 0] == self.bos_id) & (column >= self.density_base)
        return {
            int(t): int(v - self.density_base)
            for t, v in zip(tracks[is_density], column[is_density], strict=True)
        }

    # ----------------------------------------------------------------- densities
    def is_bar(self, ids: np.ndarray) -> np.ndarray:
        """True at every bar line (REMI Bar token, CPWord Bar compound)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "remi":
            return ids == self.miditok.vocab["Bar_None"]
        bar = self.miditok.vocab[CPWORD_FIELDS.index("position")]["Bar_None"]
        return (ids[:, 0] == self.family_metric_id) & (
            ids[:, CPWORD_FIELDS.index("position")] == bar
        )

    def notes_per_bar(
        self, body: np.ndarray, body_tracks: np.ndarray, ends_piece: bool
    ) -> dict[int, float]:
        """Notes per bar of every instrument that plays in ``body`` (a stretch of a piece).

        Counted over whole bars: from the first bar line to the last one (the bar after it is
        cut off), or to the end when ``body`` ends the piece. A stretch inside one bar counts
        as one bar. An instrument that plays only outside the counted bars gets 0.0.
        """
        body = np.asarray(body, dtype=np.int64)
        body_tracks = np.asarray(body_tracks, dtype=np.int64)
        notes = self.note_mask(body)
        present = np.unique(body_tracks[notes])
        bars = np.flatnonzero(self.is_bar(body))
        start, end, n_bars = 0, len(body), 1
        if len(bars):
            start = int(bars[0])
            n_bars = len(bars) if ends_piece else len(bars) - 1
            if n_bars >= 1 and not ends_piece:
                end = int(bars[-1])
            n_bars = max(n_bars, 1)
        counted = body_tracks[start:end][notes[start:end]]
        counts = np.bincount(counted, minlength=GLOBAL_TRACK + 1)
        return {int(i): float(counts[i]) / n_bars for i in present}

    def note_pitches(self, ids: np.ndarray) -> np.ndarray:
        """The pitch of every pitched note (REMI Pitch token, CPWord Note compound of a pitched
        program), -1 elsewhere (drum notes included): where a part plays (densities.py)."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self._pitch_of
        if self.kind == "remi":
            return table[np.clip(ids, 0, len(table) - 1)]
        column = ids[:, CPWORD_FIELDS.index("pitch")]
        return np.where(self.note_mask(ids), table[np.clip(column, 0, len(table) - 1)], -1)

    def eos(self) -> np.ndarray:
        if self.kind == "remi":
            return np.array([self.eos_id], dtype=np.int64)
        return np.full((1, len(CPWORD_FIELDS)), self.eos_id, dtype=np.int64)

    def track_ids(self, ids: np.ndarray) -> np.ndarray:
        """Instrument id per token (0..128) or GLOBAL_TRACK, from the ids alone.

        REMI: a Program token sets the current instrument and Pitch/Velocity/Duration inherit it.
        CPWord: the program field of a note (or header) compound.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "cpword":
            program_column = ids[:, CPWORD_FIELDS.index("program")]
            has_program = ids[:, 0] == self.family_note_id
            has_program |= (ids[:, 0] == self.bos_id) & (program_column >= N_SPECIALS)
            tracks = self._instrument_of[np.clip(program_column, 0, len(self._instrument_of) - 1)]
            return np.where(has_program, tracks, GLOBAL_TRACK).astype(np.int64)
        is_program = self._is_program[ids]
        last_program = np.where(is_program, np.arange(len(ids)), -1)
        np.maximum.accumulate(last_program, out=last_program)
        inherited = np.where(
            last_program >= 0, self._instrument_of[ids[np.maximum(last_program, 0)]], GLOBAL_TRACK
        )
        tracks = np.where(self._is_note_attribute[ids], inherited, GLOBAL_TRACK)
        return np.where(is_program, self._instrument_of[ids], tracks).astype(np.int64)

    def note_mask(self, ids: np.ndarray) -> np.ndarray:
        """True at the one position per note that carries its pitch (REMI Pitch/PitchDrum, CPWord
        Note compound); -100 and padding are False. Counts notes, e.g. for NLL per note."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "cpword":
            return ids[..., 0] == self.family_note_id
        is_pitch = np.isin(
            np.asarray(self.token_types),
            [REMI_TOKEN_TYPES.index("Pitch"), REMI_TOKEN_TYPES.index("PitchDrum")],
        )
        return (ids >= 0) & is_pitch[np.clip(ids, 0, len(is_pitch) - 1)]

    def labels_for(self, ids: np.ndarray, track_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Next-position targets for a window ``ids[0..T]``: returns (labels, label_track_ids) of
        length T-1 aligned with ``ids[:-1]``. PAD, and for CPWord non-family fields that are
        ``Ignore`` or special, become -100 (nothing to predict there)."""
        labels = np.array(ids[1:], dtype=np.int64, copy=True)
        label_tracks = np.array(track_ids[1:], dtype=np.int64, copy=True)
        if self.kind == "remi":
            padding = labels == self.pad_id
            labels[padding] = -100
        else:
            padding = labels[:, 0] == self.pad_id
            labels[padding] = -100
            fields = labels[:, 1:]
            fields[(fields >= 0) & (fields <= self.ignore_id)] = -100
        label_tracks[padding] = -100
        return labels, label_tracks

    # ----------------------------------------------------------------- encode / decode
    def instruments_of(self, score: Score) -> tuple[int, ...]:
        present = {
            program_to_instrument(t.program, t.is_drum) for t in score.tracks if t.note_num() > 0
        }
        return tuple(sorted(present))

    def encode(self, score: Score, with_eos: bool = True, canonical: bool = True) -> EncodedPiece:
        """Score -> header + body (+ EOS), with track ids. ``canonical=False`` keeps miditok's
        own order at each onset (the file's track order; for ablations only).

        Raises TokenizationError for a meter outside the vocabulary or a piece with no notes.
        """
        if self.miditok.score_has_time_signatures_not_in_vocab(score):
            supported = {f"{n}/{d}" for d, ns in TIME_SIGNATURES.items() for n in ns}
            present = {f"{ts.numerator}/{ts.denominator}" for ts in score.time_signatures}
            meters = sorted(present - supported)
            raise TokenizationError(
                f"time signature(s) {', '.join(meters)} not in the vocabulary "
                f"(supported: {self.supported_meters()}); the piece would be re-barred as 4/4"
            )
        prepared = self.miditok.preprocess_score(score)
        if canonical:
            prepared = canonical_score(prepared)
        body = np.asarray(
            self.miditok.encode(prepared, no_preprocess_score=True).ids, dtype=np.int64
        )
        if body.size == 0:
            raise TokenizationError(
                "no notes left after tokenization (empty or out-of-range piece)"
            )
        # Instruments from the body itself: tracks with notes dropped by the tokenizer
        # (e.g. out-of-range pitches) must not be announced in the header.
        body_tracks = self.track_ids(body)
        instruments = tuple(sorted(set(body_tracks[body_tracks != GLOBAL_TRACK].tolist())))
        if not instruments:
            raise TokenizationError(
                "no notes left after tokenization (empty or out-of-range piece)"
            )
        densities = self.notes_per_bar(body, body_tracks, ends_piece=True)
        header = self.header({i: density_bin(d) for i, d in densities.items()})
        parts = [header, body]
        if with_eos:
            parts.append(self.eos())
        ids = np.concatenate(parts)
        return EncodedPiece(
            ids=ids, track_ids=self.track_ids(ids), instruments=instruments, densities=densities
        )

    def supported_meters(self) -> str:
        return ", ".join(f"{n}/{d}" for d, ns in TIME_SIGNATURES.items() for n in ns)

    def split_header(self, ids: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
        """(instruments announced in the header, body ids without specials and after EOS)."""
        ids = np.asarray(ids, dtype=np.int64)
        first = ids if self.kind == "remi" else ids[:, 0]
        sep = np.flatnonzero(first == self.sep_id)
        header_end = int(sep[0]) + 1 if len(sep) else 0
        header_tracks = self.track_ids(ids[:header_end])
        instruments = tuple(sorted(set(header_tracks[header_tracks != GLOBAL_TRACK].tolist())))
        body = ids[header_end:]
        first = body if self.kind == "remi" else body[:, 0]
        eos = np.flatnonzero(first == self.eos_id)
        if len(eos):
            body = body[: eos[0]]
            first = first[: eos[0]]
        return instruments, body[first >= N_SPECIALS]

    def decode(self, ids) -> Score:
        """Token ids (with or without header / EOS) -> symusic Score, tracks named by GM names.

        Never writes files (miditok's ``output_path`` makes a directory: LIBRARY_NOTES §2).
        Invalid compounds (CPWord) are dropped; anything undecodable raises DecodeError.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != len(self.ids_shape) + 1 or ids.shape[1:] != self.ids_shape:
            raise DecodeError(
                f"expected ids of shape [T{', 8' if self.kind == 'cpword' else ''}], got {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= max(self.vocab_sizes)):
            raise DecodeError("token ids out of the vocabulary range")
        _, body = self.split_header(ids)
        if self.kind == "cpword":
            body = self._valid_compounds(body)
        if len(body) == 0:
            return self._empty_score()
        try:
            score = self.miditok.decode(body.tolist())
        except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as err:
            raise DecodeError(f"token ids do not decode: {err}") from err
        for track in score.tracks:
            track.name = instrument_name(program_to_instrument(track.program, track.is_drum))
        return score

    def _empty_score(self) -> Score:
        return Score(self.miditok.time_division)

    def _valid_compounds(self, body: np.ndarray) -> np.ndarray:
        """Keep CPWord rows whose fields are legal for their family (miditok raises otherwise)."""
        if len(body) == 0:
            return body
        for column, vocab in enumerate(self.vocab_sizes):
            if (body[:, column] >= vocab).any():
                body = body[(body < np.array(self.vocab_sizes)).all(axis=1)]
                break
        regular = body >= N_SPECIALS + 1  # neither special nor Ignore
        ignore = body == self.ignore_id
        col = {name: i for i, name in enumerate(CPWORD_FIELDS)}
        is_metric = body[:, 0] == self.family_metric_id
        is_note = body[:, 0] == self.family_note_id
        metric_ok = (
            is_metric
            & regular[:, col["position"]]
            & (regular[:, col["tempo"]] | ignore[:, col["tempo"]])
            & (regular[:, col["meter"]] | ignore[:, col["meter"]])
        )
        note_ok = is_note & regular[
            :, [col[f] for f in ("pitch", "velocity", "duration", "program")]
        ].all(axis=1)
        keep = metric_ok | note_ok
        # Bar compounds carry the meter; Position compounds carry the tempo. A wrong pairing
        # (a tempo on a Bar) is what makes miditok raise, so check the token kinds too.
        names = self._token_names
        for index in np.flatnonzero(keep & is_metric):
            position_name = names[col["position"]][int(body[index, col["position"]])]
            tempo = int(body[index, col["tempo"]])
            meter = int(body[index, col["meter"]])
            is_bar = position_name.startswith("Bar")
            if (is_bar and tempo != self.ignore_id) or (not is_bar and meter != self.ignore_id):
                keep[index] = False
        return body[keep]


def canonical_score(score: Score) -> Score:
    """The score with tracks in header order (programs ascending, drums last) and each track's
    notes sorted by (onset, pitch, duration, velocity): miditok's stable sort by time then gives
    one order at every onset, whatever the file's track order. In place; returns ``score``.

    Apply it to a score miditok has preprocessed (quantised, same-program tracks merged), so
    notes that quantise to one onset are ordered by pitch too."""
    score.tracks = sorted(score.tracks, key=lambda t: program_to_instrument(t.program, t.is_drum))
    for track in score.tracks:
        notes = track.notes.numpy()
        if len(notes["time"]) < 2:
            continue
        order = np.lexsort((notes["velocity"], notes["duration"], notes["pitch"], notes["time"]))
        track.notes = Note.from_numpy(**{key: value[order] for key, value in notes.items()})
    return score


def density_bin(notes_per_bar: float) -> int:
    """The density bin of a part that plays ``notes_per_bar`` notes per bar."""
    return int(np.searchsorted(DENSITY_EDGES, notes_per_bar, side="right"))


def note_count(score: Score) -> int:
    return sum(track.note_num() for track in score.tracks)


def _pitch_table(names) -> np.ndarray:
    """Token id (or field value) -> its pitch for ``Pitch_N`` names, -1 for any other."""
    items = enumerate(names) if isinstance(names, list) else names.items()
    size = len(names) if isinstance(names, list) else max(names) + 1
    table = np.full(size, -1, dtype=np.int64)
    for index, name in items:
        if name is not None and name.startswith("Pitch_"):
            table[index] = int(name.split("_", 1)[1])
    return table


__all__ = [
    "CPWORD_FIELDS",
    "DENSITY_EDGES",
    "HEADER_FORMAT",
    "N_DENSITY_BINS",
    "canonical_score",
    "density_bin",
    "DRUMS",
    "DecodeError",
    "EncodedPiece",
    "PolyTokenizer",
    "TokenizationError",
    "TOKENIZER_FILE",
    "note_count",
]
