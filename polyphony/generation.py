"""Generation: an instrument list, a prompt or a MIDI file to arrange in; a valid MIDI file out.

Three modes share one decoding loop (:func:`_decode`):

* **instruments**: the prompt is the instrument header ``BOS <instruments> SEP``; the model
  writes the whole piece.
* **continuation**: the prompt is the header plus the first bars of a user's MIDI file.
* **arrangement**: the existing piece's tokens are walked in time order and *forced*; between
  them the model may only insert notes of the added instruments.

Every sampled token is constrained three ways, with boolean masks looked up per row from tables
built once per tokenizer (no Python loop over the vocabulary while decoding):

1. a **grammar**, a small state machine over token types, so the output always decodes;
2. the **request**: only requested instruments can start a note, every requested instrument
   plays before the end, the piece has the requested number of bars;
3. for arrangements, the **existing piece**: its tokens appear unchanged and in order.

The rules are written out in docs/generation.md. Decoding runs on the model's KV cache
(``prefill`` once, then one ``decode_step`` per token) for ``num_samples`` rows at once. When
the context reaches the model's ``max_seq_len``, the cache is refilled with the header and the
most recent bars, which is what training windows look like.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from miditok.utils import compute_ticks_per_bar
from symusic import Score, TimeSignature
from tqdm import tqdm

from .config import CPWORD_FIELDS, DataConfig
from .data.midi_input import MidiInputError, limit_problem, load_midi
from .densities import DensityError, DensityStats, bins, parse_density, resolve
from .instruments import DRUMS, GLOBAL_TRACK, instrument_name, parse_instruments
from .instruments import program_to_instrument as _instrument
from .metrics import bar_lines, write_request
from .model import ModelOutput, PolyphonyGPT
from .tokenizer import (
    TOKENIZER_FILE,
    DecodeError,
    PolyTokenizer,
    TokenizationError,
)

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "polyphony-mini"
DEFAULT_BARS = 16
# Density steering (Sampling.steer), chosen on held-out band excerpts (docs/generation.md).
DEFAULT_STEER = 3.0
# A MIDI file has 16 channels and channel 10 is the drum kit.
MAX_PITCHED_INSTRUMENTS = 15
# Default token budget (--max-tokens): generous for dense parts, so it only stops a model that
# never ends; a normal piece ends on its own when the bar budget is used up.
TOKENS_PER_BAR_PER_INSTRUMENT = 96
# Tokens a row needs to close a piece besides the missing instruments' notes: in the worst case
# a TimeSig, a Position and its first Tempo, then EOS.
CLOSING_TOKENS = 4
# Notes one instrument may start at one position: real chords stay far below (8 at most in the
# test fixtures); a model stuck repeating itself at one onset is sent on.
MAX_NOTES_PER_ONSET = 16
# When the context is full, this share of it is kept (from a bar line) and the rest refilled.
CONTEXT_KEPT = 0.75
# symusic wraps larger delta times silently when writing (LIBRARY_NOTES §1).
MAX_TICK = 2**28 - 1
# The most tokens of a user's file one request reads (prompt) or forces (arrangement): each
# costs a grammar step and a model step, ~5 ms here, so about 3 minutes at most.
MAX_INPUT_TOKENS = 32_768
MAX_BARS = 512  # the longest piece one request reads, writes or arranges (~17 min at 120 bpm)
N_TRACK_COLUMNS = GLOBAL_TRACK + 1  # played/allowed tables: instruments 0..128 + unused 129

FIELD = {name: column for column, name in enumerate(CPWORD_FIELDS)}


class GenerationError(ValueError):
    """A request that cannot be generated; the one-line message names the input and the fix."""


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the (masked) logits.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1.0 are off. CPWord models draw each
    field of a compound separately; ``field_temperature`` overrides the temperature per field
    (``{"pitch": 0.9, "duration": 0.8}``).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    field_temperature: dict[str, float] = field(default_factory=dict)
    steer: float = DEFAULT_STEER  # at most this many nats on an instrument's Program logit

    def check(self, tokenization: str) -> Sampling:
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if not 0 <= self.steer <= 20:
            raise GenerationError(f"steer={self.steer}: must be in 0..20 (nats; 0 = off)")
        if self.field_temperature and tokenization != "cpword":
            raise GenerationError(
                "field temperatures apply to CPWord models (one distribution per field); this "
                "model is REMI: use --temperature"
            )
        for name, value in self.field_temperature.items():
            if name not in CPWORD_FIELDS:
                raise GenerationError(
                    f"unknown field {name!r} in field temperatures: use {', '.join(CPWORD_FIELDS)}"
                )
            if value < 0:
                raise GenerationError(f"field temperature {name}={value}: must be >= 0")
        return self

    def of(self, name: str) -> float:
        return self.field_temperature.get(name, self.temperature)


def parse_field_temperature(text: str | None) -> dict[str, float]:
    """``"pitch=0.9,duration=0.8"`` -> ``{"pitch": 0.9, "duration": 0.8}``."""
    values: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise GenerationError(
                f"field temperature {item.strip()!r}: expected FIELD=VALUE, e.g. pitch=0.9"
            ) from None
    return values


def sample(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One id per row from ``logits [N, V]`` restricted to ``allowed [N, V]``.

    ``temperature`` is one number or one per row (0 = greedy). Rows with nothing allowed (a
    field a compound does not use this step) get id 0; the grammar checks that every choice a
    row does use has at least one legal id.
    """
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    logits[:, :1] = logits[:, :1].masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and temperature == 0:
        return logits.argmax(-1)
    greedy = logits.argmax(-1) if per_row else None
    scale = temperature.clamp(min=1e-6)[:, None] if per_row else temperature
    logits = logits / scale
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token when the more likely ones already hold top_p; the first always stays.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(temperature == 0, greedy, drawn) if per_row else drawn


def bar_line_ends_piece(
    logits: torch.Tensor, rows: torch.Tensor, bar_id: int, eos_id: int
) -> torch.Tensor:
    """In ``rows`` (in the last bar, free to end) the model's wish to draw the next bar line is a
    wish to end: the bar line's probability moves to EOS. Without this a model that would close
    the bar can only add notes until it happens to draw EOS, and last bars come out several
    times denser than the rest."""
    merged = torch.logaddexp(logits[:, eos_id], logits[:, bar_id])
    logits = logits.clone()
    logits[:, eos_id] = torch.where(rows, merged, logits[:, eos_id])
    return logits


def sample_fields(
    logits: dict[str, torch.Tensor],
    allowed: dict[str, torch.Tensor],
    sampling: Sampling,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Draw several CPWord fields at once: their logits are padded to one width and sampled as
    rows of one batch (one softmax and one multinomial instead of one per field)."""
    names = list(logits)
    batch, width = len(logits[names[0]]), max(v.shape[-1] for v in logits.values())
    device = logits[names[0]].device
    stacked = torch.zeros(batch, len(names), width, device=device)
    legal = torch.zeros(batch, len(names), width, dtype=torch.bool, device=device)
    for column, name in enumerate(names):
        size = logits[name].shape[-1]
        stacked[:, column, :size] = logits[name]
        legal[:, column, :size] = allowed[name]
    temperature = torch.tensor([sampling.of(n) for n in names], device=device).repeat(batch)
    ids = sample(
        stacked.view(-1, width), legal.view(-1, width), temperature, sampling.top_k,
        sampling.top_p, generator,
    ).view(batch, len(names))  # fmt: skip
    return {name: ids[:, column] for column, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# What each row has written so far, and what the request demands


@dataclass
class RowState:
    """The constraints' view of every row, as ``[B]`` tensors on the model's device."""

    grammar: torch.Tensor  # grammar state (the grammar class's constants)
    position: torch.Tensor  # position in the current bar, -1 before the bar's first Position
    positions_per_bar: torch.Tensor  # from the bar's time signature
    bars: torch.Tensor  # Bar tokens so far, prompt included
    instrument: torch.Tensor  # REMI: instrument of the note being written
    tempo: torch.Tensor  # last tempo token (REMI) / tempo field value (CPWord); -1 before any
    played: torch.Tensor  # [B, 130] bool: instruments that have started a note
    notes: torch.Tensor  # [B, 130] notes each instrument started since the new tokens began
    first_bar: torch.Tensor  # bars before the new tokens (the prompt's)
    onsets: torch.Tensor  # [B, 130, 128] bool: pitches each instrument started at this position
    new_tokens: torch.Tensor  # tokens the model chose (forced and prompt tokens excluded)
    cursor: torch.Tensor  # arrangement: index of the next existing token
    after_existing: torch.Tensor  # arrangement: the last token was an existing one

    @classmethod
    def start(cls, batch: int, grammar_state: int, device: torch.device) -> RowState:
        def full(value, dtype=torch.long):
            return torch.full((batch,), value, dtype=dtype, device=device)

        return cls(
            grammar=full(grammar_state),
            position=full(-1),
            positions_per_bar=full(0),
            bars=full(0),
            instrument=full(GLOBAL_TRACK),
            tempo=full(-1),
            played=torch.zeros(batch, N_TRACK_COLUMNS, dtype=torch.bool, device=device),
            notes=torch.zeros(batch, N_TRACK_COLUMNS, dtype=torch.long, device=device),
            first_bar=full(0),
            onsets=torch.zeros(batch, N_TRACK_COLUMNS, 128, dtype=torch.bool, device=device),
            new_tokens=full(0),
            cursor=full(0),
            after_existing=full(False, torch.bool),
        )

    def mark_played(self, instruments: torch.Tensor, started: torch.Tensor) -> None:
        rows = torch.arange(len(instruments), device=instruments.device)
        self.played[rows, instruments] |= started
        self.notes[rows, instruments] += started

    def steering(self, targets: torch.Tensor, strength: float) -> torch.Tensor:
        """``[B, 130]`` logit bonus per instrument: ``strength`` x tanh of how far its notes lag
        behind (or run ahead of, negative) its target notes per bar over the bars written."""
        bars = (self.bars - self.first_bar - 1).clamp(min=0) + (self.position + 1).clamp(
            min=0
        ) / self.positions_per_bar.clamp(min=1)
        expected = targets[None, :] * bars[:, None]
        return strength * torch.tanh((expected - self.notes) / (2.0 + targets[None, :]))

    def mark_onset(self, moved: torch.Tensor, instruments, pitches, started) -> None:
        """A new Position or Bar (``moved``) clears a row's onsets; a note adds its pitch."""
        self.onsets &= ~moved[:, None, None]
        rows = torch.arange(len(instruments), device=instruments.device)
        self.onsets[rows, instruments, pitches.clamp(0, 127)] |= started

    def chord_full(self) -> torch.Tensor:
        """``[B, 130]``: instruments that started MAX_NOTES_PER_ONSET notes at this position."""
        return self.onsets.sum(-1) >= MAX_NOTES_PER_ONSET

    def onset_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the canonical order stands at this position (tokenizer.canonical_score: header
        order, then pitch ascending): the last instrument that started a note here ``[B]`` and
        each instrument's highest pitch here ``[B, 130]``, -1 where none."""
        columns = torch.arange(N_TRACK_COLUMNS, device=self.onsets.device)
        last = torch.where(self.onsets.any(-1), columns, -1).max(-1).values
        pitches = torch.arange(128, device=self.onsets.device)
        return last, torch.where(self.onsets, pitches, -1).max(-1).values


@dataclass
class ExistingStream:
    """The piece being arranged, as tokens to force; row ``length`` is a PAD sentinel."""

    ids: torch.Tensor  # [L + 1] REMI / [L + 1, 8] CPWord
    length: int
    glued: torch.Tensor  # [L + 1] bool: token i must directly follow token i - 1 (REMI)
    insert_below: torch.Tensor  # [L + 1]: a Position inserted before token i must be below this
    # CPWord: the piece's first tempo, carried by Positions the model inserts before it; REMI:
    # -1 (inserted Positions wait for the piece's first Tempo token).
    initial_tempo: int = -1


@dataclass
class Constraints:
    allowed: torch.Tensor  # [130] bool: instruments the model may start notes for
    required: torch.Tensor  # [130] bool: instruments that must play before the end
    target_bars: int  # bars of the finished piece (prompt included)
    max_new_tokens: int  # tokens the model may choose (forced tokens excluded)
    tempo: int | None = None  # fixed tempo: token id (REMI) / tempo field value (CPWord)
    time_signature: int | None = None  # fixed meter: token id / meter field value
    existing: ExistingStream | None = None
    targets: torch.Tensor | None = None  # [130] notes per bar asked of each instrument
    # grammar_violations: any instrument's first note may break the onset order (the decoder
    # allows it to a missing instrument it forces in, under a budget the checker cannot know).
    entries_unordered: bool = False
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # built by the grammar, cached


@dataclass
class Budget:
    """Per row: which requested instruments have not played yet, and how close the end is."""

    missing: torch.Tensor  # [B, 130] bool
    complete: torch.Tensor  # nothing missing
    urgent: torch.Tensor  # the token budget only just covers the missing notes and a close
    closing: torch.Tensor  # urgent, or in the last bar: no new bar, EOS once complete
    must_finish: torch.Tensor  # urgent and complete: end as soon as the grammar allows

    @classmethod
    def of(cls, s: RowState, c: Constraints, note_cost: int) -> Budget:
        missing = c.required & ~s.played
        n_missing = missing.sum(-1)
        left = c.max_new_tokens - s.new_tokens
        urgent = left <= note_cost * n_missing.clamp(min=1) + CLOSING_TOKENS
        complete = n_missing == 0
        closing = urgent | (s.bars >= c.target_bars)
        return cls(missing, complete, urgent, closing, urgent & complete)


def _one_hot(ids: torch.Tensor, size: int) -> torch.Tensor:
    hot = torch.zeros(len(ids), size, dtype=torch.bool, device=ids.device)
    hot[torch.arange(len(ids), device=ids.device), ids.clamp(0, size - 1)] = True
    return hot


def _check_choices(allowed: torch.Tensor, s: RowState, end_state: int) -> None:
    """Every unfinished row must have a legal token; an empty row is a bug in the rules."""
    stuck = ~allowed.any(-1) & (s.grammar != end_state)
    if bool(stuck.any()):
        row = int(stuck.nonzero()[0, 0])
        raise RuntimeError(
            f"generation constraints left row {row} without a legal token (grammar state "
            f"{int(s.grammar[row])}, bar {int(s.bars[row])}); please report this with the command"
        )


def positions_per_bar(tokenizer: PolyTokenizer, meter: str) -> int:
    """Positions in a bar of ``meter`` ("6/8"), as miditok's REMI and CPWord decoders count
    them (a beat is the meter's denominator note, ``max_num_pos_per_beat`` positions each)."""
    numerator, denominator = (int(x) for x in meter.split("/"))
    midi = tokenizer.miditok
    ticks_per_position = midi._tpb_per_ts[denominator] // midi.config.max_num_pos_per_beat
    bar = compute_ticks_per_bar(TimeSignature(0, numerator, denominator), midi.time_division)
    return bar // ticks_per_position


# --------------------------------------------------------------------------------------------
# REMI


class RemiGrammar:
    """Grammar states of a REMI body and the tokens that may follow each one.

    ``Bar TimeSig [Position [Tempo] (Program Pitch|PitchDrum Velocity Duration)+]* ... EOS``:
    PitchDrum only after ``Program_-1``, Pitch only after other programs, Positions strictly
    increasing within a bar and below its length, a Tempo only right after a Position.
    """

    STATE_NAMES = (
        "the header", "Bar", "TimeSig", "Position", "Tempo", "Program", "Program_-1", "Pitch",
        "Velocity", "Duration", "EOS",
    )  # fmt: skip
    START, BAR, TIMESIG, POSITION, TEMPO, PROGRAM, DRUM_PROGRAM, PITCH, VELOCITY, DURATION, END = (
        range(len(STATE_NAMES))
    )
    NOTE_COST = 4  # tokens per note
    FOLLOWS = {
        START: ("Bar",),
        BAR: ("TimeSig",),
        TIMESIG: ("Bar", "Position", "EOS"),
        POSITION: ("Tempo", "Program"),
        TEMPO: ("Program", "Position", "Bar"),
        PROGRAM: ("Pitch",),
        DRUM_PROGRAM: ("PitchDrum",),
        PITCH: ("Velocity",),
        VELOCITY: ("Duration",),
        DURATION: ("Program", "Position", "Bar", "EOS"),
        END: ("PAD",),
    }
    # After these existing tokens the next existing one is forced: they are parts of one unit.
    GLUED_AFTER = ("Bar", "Program", "Pitch", "PitchDrum", "Velocity")

    def __init__(self, tokenizer: PolyTokenizer, device: torch.device):
        self.tokenizer = tokenizer
        size = tokenizer.vocab_sizes[0]
        names = [tokenizer.token_name(i) for i in range(size)]
        self.kinds = [name.split("_", 1)[0] for name in names]
        values = [name.split("_", 1)[1] for name in names]

        def table(values_, dtype=torch.long):
            return torch.tensor(values_, dtype=dtype, device=device)

        def of_kind(*kinds):
            return table([k in kinds for k in self.kinds], torch.bool)

        self.size = size
        self.is_bar, self.is_timesig = of_kind("Bar"), of_kind("TimeSig")
        self.is_position, self.is_tempo = of_kind("Position"), of_kind("Tempo")
        self.is_program, self.is_eos = of_kind("Program"), of_kind("EOS")
        self.is_note_part = of_kind("Pitch", "PitchDrum", "Velocity", "Duration")
        self.position_value = table(
            [int(v) if k == "Position" else -1 for k, v in zip(self.kinds, values, strict=True)]
        )
        self.bar_positions = table(
            [
                positions_per_bar(tokenizer, v) if k == "TimeSig" else 0
                for k, v in zip(self.kinds, values, strict=True)
            ]
        )
        self.instrument_of = table(
            [
                _instrument(int(v)) if k == "Program" else GLOBAL_TRACK
                for k, v in zip(self.kinds, values, strict=True)
            ]
        )
        self.follows = torch.stack([of_kind(*self.FOLLOWS[s]) for s in range(len(self.FOLLOWS))])
        state_after = {
            "Bar": self.BAR, "TimeSig": self.TIMESIG, "Position": self.POSITION,
            "Tempo": self.TEMPO, "Pitch": self.PITCH, "PitchDrum": self.PITCH,
            "Velocity": self.VELOCITY, "Duration": self.DURATION,
        }  # fmt: skip
        self.is_pitch = of_kind("Pitch", "PitchDrum")
        self.pitch_of = table(
            [
                int(v) if k in ("Pitch", "PitchDrum") else 0
                for k, v in zip(self.kinds, values, strict=True)
            ]
        )
        self.top_pitch = int(self.pitch_of[self.is_pitch].max())  # drums and pitched alike
        self.next_state = table(
            [
                (self.DRUM_PROGRAM if value == "-1" else self.PROGRAM)
                if kind == "Program"
                else state_after.get(kind, self.END)  # EOS, PAD and the other specials end a row
                for kind, value in zip(self.kinds, values, strict=True)
            ]
        )
        self.ids = torch.arange(size, device=device)
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self.bar_id = tokenizer.miditok.vocab["Bar_None"]

    # ---------------------------------------------------------------- tables for a request
    def bar_of(self, ids: np.ndarray) -> np.ndarray:
        return ids == self.bar_id

    def existing_stream(self, body: np.ndarray, device) -> ExistingStream:
        kinds = [self.kinds[int(i)] for i in body] + ["PAD"]
        ids = np.append(body, self.pad_id)
        glued = [False] + [
            previous in self.GLUED_AFTER or (previous == "Position" and kind == "Tempo")
            for previous, kind in pairwise(kinds)
        ]
        below = [
            self.position_value[int(i)].item()
            if kind == "Position"
            else 10**6
            if kind in ("Bar", "PAD")
            else 0
            for i, kind in zip(ids, kinds, strict=True)
        ]
        return ExistingStream(
            ids=torch.as_tensor(ids, dtype=torch.long, device=device),
            length=len(body),
            glued=torch.tensor(glued, device=device),
            insert_below=torch.tensor(below, dtype=torch.long, device=device),
        )

    # ---------------------------------------------------------------- one step
    # Per-row flags that decide which *kinds* of token may come next (with the grammar state);
    # the table of every combination is built once per request (see ``structure``).
    FLAGS = ("closing", "complete", "urgent", "has_tempo", "after_existing")

    def structure(self, c: Constraints) -> torch.Tensor:
        """``[n_states * 2^len(FLAGS), V]``: the tokens allowed in each (state, flags) situation,
        before the per-step value checks (position range, missing instruments, repeated
        pitches, the next existing token). Row = state + n_states * sum(flag_k << k)."""
        if "structure" not in c.tables:
            n_states = len(self.STATE_NAMES)
            situation = torch.arange(n_states << len(self.FLAGS), device=self.ids.device)
            flags = {
                name: ((situation // n_states) >> bit) & 1 == 1
                for bit, name in enumerate(self.FLAGS)
            }
            c.tables["structure"] = self._structure(situation % n_states, c, **flags)
        return c.tables["structure"]

    def _structure(self, state, c, closing, complete, urgent, has_tempo, after_existing):
        col = lambda x: x[:, None]  # noqa: E731  [N] -> [N, 1] against the vocabulary
        must_finish = urgent & complete
        allowed = self.follows[state]
        # Bars while the bar budget lasts; EOS once it is used up and every instrument played.
        allowed &= ~(self.is_bar & col(closing))
        allowed &= ~(self.is_eos & col(~(closing & complete)))
        # Short of tokens, a Position only where one is needed (a bar that has none yet).
        position_ok = (~urgent | (state == self.TIMESIG)) & ~must_finish
        allowed &= ~(self.is_position & col(~position_ok))
        # Requested instruments only. The first Position of the piece takes its Tempo before
        # any note (miditok always writes one there); a piece that must end takes a note only
        # to complete a Position it has just opened.
        fresh_position = ((state == self.POSITION) | (state == self.TEMPO)) & ~after_existing
        needs_tempo = ~has_tempo & (state == self.POSITION)
        program_ok = (~must_finish | fresh_position) & ~needs_tempo
        allowed &= ~self.is_program | (col(program_ok) & c.allowed[self.instrument_of])
        # Later tempo changes only when the tempo is not fixed and tokens are not short.
        tempo_ok = ~has_tempo | (~urgent & (c.tempo is None))
        allowed &= ~(self.is_tempo & col(~tempo_ok))
        if c.tempo is not None:
            allowed &= ~self.is_tempo | (self.ids == c.tempo)
        if c.time_signature is not None:
            allowed &= ~self.is_timesig | (self.ids == c.time_signature)
        if c.existing is not None:
            # Bars, meters and tempi come from the piece; the model inserts Positions only
            # after the piece's first tempo and while tokens last.
            allowed &= ~(self.is_bar | self.is_timesig | self.is_tempo)
            allowed &= ~(self.is_position & col(~has_tempo | urgent))
        return allowed

    def allowed(self, s: RowState, c: Constraints) -> torch.Tensor:
        """``[B, V]`` bool: the tokens each row may write next."""
        b = Budget.of(s, c, self.NOTE_COST)
        col = lambda x: x[:, None]  # noqa: E731  [B] -> [B, 1] against the vocabulary
        flags = (b.closing, b.complete, b.urgent, s.tempo >= 0, s.after_existing)
        situation = s.grammar + len(self.STATE_NAMES) * sum(
            f.long() << k for k, f in enumerate(flags)
        )
        allowed = self.structure(c)[situation]
        # Positions strictly increase within the bar and stay inside it.
        allowed &= ~self.is_position | (
            (self.position_value > col(s.position))
            & (self.position_value < col(s.positions_per_bar))
        )
        # In the closing stretch only missing instruments start notes; no instrument starts more
        # than MAX_NOTES_PER_ONSET notes at one position.
        forcing = col(b.closing & ~b.complete)
        blocked = s.chord_full() | (forcing & ~b.missing)
        allowed &= ~(self.is_program & blocked[:, self.instrument_of])
        # The training order at one position: instruments in header order, each one's pitches
        # ascending (so never a pitch twice: MIDI cannot hold the copy). A missing instrument
        # forced in at the end may break it.
        last, highest = s.onset_order()
        excused = (forcing & b.missing[:, self.instrument_of]) | (
            c.entries_unordered & ~s.played[:, self.instrument_of]
        )
        in_order = (self.instrument_of >= col(last)) | excused
        # and an instrument starts a note only while a pitch above its last one remains.
        in_order &= highest[:, self.instrument_of] < self.top_pitch
        allowed &= ~self.is_program | in_order
        rows = torch.arange(len(last), device=last.device)
        allowed &= ~self.is_pitch | (self.pitch_of > col(highest[rows, s.instrument]))
        if c.existing is not None:
            allowed = self._arrange(allowed, s, c.existing)
        return allowed

    def _arrange(self, allowed, s: RowState, e: ExistingStream) -> torch.Tensor:
        """Existing tokens are offered (or forced); the model only inserts notes and Positions."""
        col = lambda x: x[:, None]  # noqa: E731
        state = s.grammar
        nxt = e.ids[s.cursor]
        at_end = s.cursor >= e.length
        # A new Position only in the gap before the next existing one (or the bar line).
        allowed &= ~self.is_position | (self.position_value < col(e.insert_below[s.cursor]))
        allowed &= ~self.is_eos | col(at_end)
        # An inserted note goes before the next existing note of the position only if its
        # instrument comes first in the header order.
        next_note = col(self.is_program[nxt] & ~at_end)
        allowed &= (
            ~self.is_program | ~next_note | (self.instrument_of < col(self.instrument_of[nxt]))
        )
        # The next existing token, unless the row is inside a note or a fresh Position of its own.
        free = (state == self.START) | (state == self.TIMESIG) | (state == self.TEMPO)
        offer = ~at_end & (s.after_existing | free | (state == self.DURATION))
        allowed = allowed | (_one_hot(nxt, self.size) & col(offer))
        forced = s.after_existing & e.glued[s.cursor] & ~at_end
        return torch.where(col(forced), _one_hot(nxt, self.size), allowed)

    def choose(self, out: ModelOutput, model, s: RowState, c: Constraints, sampling: Sampling, gen):
        allowed = self.allowed(s, c)
        _check_choices(allowed, s, self.END)
        logits = out.logits["next_token"]
        in_last_bar = (s.bars >= c.target_bars) & allowed[:, self.eos_id]
        logits = bar_line_ends_piece(logits, in_last_bar, self.bar_id, self.eos_id)
        if sampling.steer and c.targets is not None:
            bonus = s.steering(c.targets, sampling.steer)[:, self.instrument_of]
            logits = logits + torch.where(self.is_program, bonus, 0.0)
        return sample(logits, allowed, sampling.temperature, sampling.top_k, sampling.top_p, gen)

    def violation(self, s: RowState, token: torch.Tensor, c: Constraints) -> str | None:
        """Why ``token`` may not come next in row 0, or None if it may."""
        if self.allowed(s, c)[0, int(token)]:
            return None
        name = self.tokenizer.token_name(int(token))
        if self.is_pitch[token] and s.onset_order()[1][0, s.instrument[0]] >= self.pitch_of[token]:
            return (
                f"{name} is not above the pitches its instrument already started at this position"
            )
        if self.is_program[token] and s.onset_order()[0][0] > self.instrument_of[token]:
            return f"{name} comes after a later instrument of the header at this position"
        return f"{name} not allowed after {self.STATE_NAMES[int(s.grammar[0])]}"

    def advance(self, s: RowState, tokens: torch.Tensor, c: Constraints) -> torch.Tensor:
        """Update every row with its new token; returns the tokens' track ids."""
        active = s.grammar != self.END
        if c.existing is not None:
            e = c.existing
            existing = (tokens == e.ids[s.cursor]) & (s.cursor < e.length) & active
            s.cursor += existing
            s.after_existing = existing
            active = active & ~existing
        s.new_tokens += active
        is_bar, is_position = self.is_bar[tokens], self.is_position[tokens]
        is_program, is_timesig = self.is_program[tokens], self.is_timesig[tokens]
        s.bars += is_bar
        s.position = torch.where(
            is_bar, -1, torch.where(is_position, self.position_value[tokens], s.position)
        )
        s.positions_per_bar = torch.where(
            is_timesig, self.bar_positions[tokens], s.positions_per_bar
        )
        s.tempo = torch.where(self.is_tempo[tokens], tokens, s.tempo)
        s.instrument = torch.where(is_program, self.instrument_of[tokens], s.instrument)
        s.mark_played(s.instrument, is_program)
        s.mark_onset(
            is_bar | is_position, s.instrument, self.pitch_of[tokens], self.is_pitch[tokens]
        )
        s.grammar = self.next_state[tokens]
        return torch.where(is_program | self.is_note_part[tokens], s.instrument, GLOBAL_TRACK)

    def padding(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.pad_id, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# CPWord


class CPWordGrammar:
    """Grammar of CPWord compounds: a Metric compound is a Bar (with its meter) or a Position
    (with its tempo), a Note compound has a pitch, velocity, duration and program.

    ``Bar [Position Note+ ...]* ... EOS``: positions strictly increase within a bar; a drum note's
    pitch is a PitchDrum value, any other note's a Pitch value; unused fields are ``Ignore``.
    """

    START, BAR, POSITION, NOTE, END = range(5)
    NOTE_COST = 1  # compounds per note

    def __init__(self, tokenizer: PolyTokenizer, device: torch.device):
        self.tokenizer = tokenizer
        self.sizes = list(tokenizer.vocab_sizes)
        names = [[tokenizer.token_name(i, f) for i in range(n)] for f, n in enumerate(self.sizes)]

        def table(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        def starts(field_name, prefix):
            return table([n.startswith(prefix) for n in names[FIELD[field_name]]], torch.bool)

        family = tokenizer.miditok.vocab[0]
        self.metric_id, self.note_id = family["Family_Metric"], family["Family_Note"]
        self.eos_id, self.pad_id, self.ignore_id = (
            tokenizer.eos_id,
            tokenizer.pad_id,
            tokenizer.ignore_id,
        )
        self.is_bar_value = starts("position", "Bar_")
        self.position_value = table(
            [
                int(n.split("_")[1]) if n.startswith("Position_") else -1
                for n in names[FIELD["position"]]
            ]
        )
        self.is_pitch, self.is_drum_pitch = starts("pitch", "Pitch_"), starts("pitch", "PitchDrum_")
        self.pitch_of = table(
            [int(n.split("_")[1]) if n.startswith("Pitch") else 0 for n in names[FIELD["pitch"]]]
        )
        self.top_pitch = int(self.pitch_of[self.is_pitch | self.is_drum_pitch].max())
        self.is_velocity = starts("velocity", "Velocity_")
        self.is_duration = starts("duration", "Duration_")
        self.is_tempo, self.is_meter = starts("tempo", "Tempo_"), starts("meter", "TimeSig_")
        self.instrument_of = table(
            [
                _instrument(int(n.split("_")[1])) if n.startswith("Program_") else GLOBAL_TRACK
                for n in names[FIELD["program"]]
            ]
        )
        self.bar_positions = table(
            [
                positions_per_bar(tokenizer, n.split("_")[1]) if n.startswith("TimeSig_") else 0
                for n in names[FIELD["meter"]]
            ]
        )
        self.field_ids = [torch.arange(n, device=device) for n in self.sizes]

    def bar_of(self, ids: np.ndarray) -> np.ndarray:
        bars = self.is_bar_value.cpu().numpy()
        return (ids[..., 0] == self.metric_id) & bars[np.clip(ids[..., 1], 0, len(bars) - 1)]

    def existing_stream(self, body: np.ndarray, device) -> ExistingStream:
        ids = np.concatenate([body, np.full((1, len(CPWORD_FIELDS)), self.pad_id)]).astype(np.int64)
        positions = self.position_value.cpu().numpy()[np.clip(ids[:, 1], 0, self.sizes[1] - 1)]
        is_metric = ids[:, 0] == self.metric_id
        below = np.where(
            is_metric & (positions >= 0), positions, np.where(ids[:, 0] == self.note_id, 0, 10**6)
        )
        tempi = body[:, FIELD["tempo"]]
        tempi = tempi[self.is_tempo.cpu().numpy()[tempi]]
        return ExistingStream(
            ids=torch.as_tensor(ids, device=device),
            length=len(body),
            glued=torch.zeros(len(ids), dtype=torch.bool, device=device),
            insert_below=torch.as_tensor(below, dtype=torch.long, device=device),
            initial_tempo=int(tempi[0]) if len(tempi) else -1,
        )

    def masks(self, s: RowState, c: Constraints) -> tuple[torch.Tensor, ...]:
        """``(family, position, program)`` masks ``[B, V_field]``: what each row may write next.

        The other fields depend on values drawn in the same compound (a Bar's meter, a
        Position's tempo, a drum note's pitch); :meth:`value_masks` gives them.
        """
        b = Budget.of(s, c, self.NOTE_COST)
        state, batch = s.grammar, len(s.grammar)
        col = lambda x: x[:, None]  # noqa: E731
        bar_open = (state == self.BAR) | (state == self.POSITION) | (state == self.NOTE)
        note_state = (state == self.POSITION) | (state == self.NOTE)

        # Metric compounds: a Bar while bars remain; a Position strictly after the current one,
        # inside the bar (short of tokens: only in a bar that has none yet).
        q = self.position_value
        position_ok = col(bar_open & ~b.must_finish & (~b.urgent | (state == self.BAR)))
        position_ok = position_ok & (q > col(s.position)) & (q < col(s.positions_per_bar))
        bar_ok = col((state != self.END) & ~b.closing) & self.is_bar_value
        # Note compounds: requested instruments; missing ones first in the closing stretch.
        program_ok = torch.where(
            col(b.closing & ~b.complete),
            b.missing[:, self.instrument_of],
            c.allowed[self.instrument_of].expand(batch, -1),
        )
        fresh_position = (state == self.POSITION) & ~s.after_existing
        program_ok &= col(note_state & (~b.must_finish | fresh_position))
        program_ok &= ~s.chord_full()[:, self.instrument_of]
        # Header order at one position (see RemiGrammar.allowed); forced-in instruments excepted.
        last, highest = s.onset_order()
        excused = (col(b.closing & ~b.complete) & b.missing[:, self.instrument_of]) | (
            c.entries_unordered & ~s.played[:, self.instrument_of]
        )
        program_ok &= (self.instrument_of >= col(last)) | excused
        program_ok &= highest[:, self.instrument_of] < self.top_pitch
        eos_ok = ((state == self.BAR) | (state == self.NOTE)) & b.closing & b.complete

        e = c.existing
        if e is not None:
            nxt = e.ids[s.cursor]
            at_end = s.cursor >= e.length
            bar_ok = torch.zeros_like(bar_ok)
            position_ok = position_ok & (q < col(e.insert_below[s.cursor])) & col(~b.urgent)
            eos_ok = eos_ok & at_end
            free = (state == self.START) | (state == self.BAR) | (state == self.NOTE)
            offer = ~at_end & (s.after_existing | free)
            next_note = col(~at_end & (nxt[:, 0] == self.note_id))
            program_ok &= ~next_note | (
                self.instrument_of < col(self.instrument_of[nxt[:, 5].clamp(0, self.sizes[5] - 1)])
            )
            position_ok = position_ok | (
                _one_hot(nxt[:, 1], self.sizes[1]) & col(offer & (nxt[:, 0] == self.metric_id))
            )
            program_ok = program_ok | (
                _one_hot(nxt[:, 5], self.sizes[5]) & col(offer & (nxt[:, 0] == self.note_id))
            )
        position_mask = position_ok | bar_ok

        family_mask = torch.zeros(batch, self.sizes[0], dtype=torch.bool, device=state.device)
        family_mask[:, self.metric_id] = position_mask.any(-1)
        family_mask[:, self.note_id] = program_ok.any(-1)
        family_mask[:, self.eos_id] = eos_ok
        family_mask[:, self.pad_id] = state == self.END
        return family_mask, position_mask, program_ok

    def value_masks(self, s: RowState, c: Constraints) -> dict[str, torch.Tensor]:
        """Masks of the fields that do not choose the compound's kind: the meter (used by a
        Bar), the tempo (used by a Position), velocity and duration (used by a note)."""
        batch = len(s.grammar)
        meter = self.is_meter.expand(batch, -1)
        if c.time_signature is not None:
            meter = meter & (self.field_ids[7] == c.time_signature)
        tempo = self.is_tempo.expand(batch, -1)
        if c.tempo is not None:
            tempo = tempo & (self.field_ids[6] == c.tempo)
        if c.existing is not None:  # a Position the model inserts keeps the current tempo
            known = s.tempo[:, None] >= 0
            tempo = torch.where(
                known, self.field_ids[6] == s.tempo[:, None], self.field_ids[6] == self.ignore_id
            )
        return {
            "meter": meter,
            "tempo": tempo,
            "velocity": self.is_velocity.expand(batch, -1),
            "duration": self.is_duration.expand(batch, -1),
        }

    def pitch_mask(self, s: RowState, program: torch.Tensor) -> torch.Tensor:
        """PitchDrum values for a drum note, Pitch values for any other; above the pitches the
        instrument already started at this position (the training order; never a pitch twice)."""
        instrument = self.instrument_of[program]
        kind = torch.where((instrument == DRUMS)[:, None], self.is_drum_pitch, self.is_pitch)
        _, highest = s.onset_order()
        rows = torch.arange(len(instrument), device=instrument.device)
        return kind & (self.pitch_of > highest[rows, instrument][:, None])

    def choose(self, out: ModelOutput, model, s: RowState, c: Constraints, sampling: Sampling, gen):
        """Sample the family, then the fields given it (the model conditions fields on the
        family); the pitch last, as its legal values depend on the program."""
        family_mask, position_mask, program_mask = self.masks(s, c)
        _check_choices(family_mask, s, self.END)
        family = sample(
            out.logits["family"], family_mask, sampling.of("family"), sampling.top_k,
            sampling.top_p, gen,
        )  # fmt: skip
        fields = model.field_logits(out.hidden, family)
        if sampling.steer and c.targets is not None:
            bonus = s.steering(c.targets, sampling.steer)[:, self.instrument_of]
            fields["program"] = fields["program"] + bonus  # 0 for non-program values
        masks = {"position": position_mask, "program": program_mask, **self.value_masks(s, c)}
        values = sample_fields({name: fields[name] for name in masks}, masks, sampling, gen)
        values.update(
            sample_fields(
                {"pitch": fields["pitch"]},
                {"pitch": self.pitch_mask(s, values["program"])},
                sampling,
                gen,
            )
        )
        position, program = values["position"], values["program"]
        tokens = self.compose(family, position, program, values)
        e = c.existing
        if e is not None:  # the model chose the existing compound: write it exactly
            nxt = e.ids[s.cursor]
            chosen = (s.cursor < e.length) & (
                (
                    (family == self.metric_id)
                    & (nxt[:, 0] == self.metric_id)
                    & (position == nxt[:, 1])
                )
                | ((family == self.note_id) & (nxt[:, 0] == self.note_id) & (program == nxt[:, 5]))
            )
            tokens = torch.where(chosen[:, None], nxt, tokens)
        return tokens

    def compose(self, family, position, program, values) -> torch.Tensor:
        """Compounds ``[B, 8]`` from drawn fields; fields a family does not use are Ignore."""
        ignore = torch.full_like(family, self.ignore_id)
        is_bar = self.is_bar_value[position]
        tempo = torch.where(is_bar, ignore, values["tempo"])
        meter = torch.where(is_bar, values["meter"], ignore)
        metric = torch.stack([family, position, ignore, ignore, ignore, ignore, tempo, meter], -1)
        note = torch.stack(
            [family, ignore, values["pitch"], values["velocity"], values["duration"], program,
             ignore, ignore], -1,
        )  # fmt: skip
        tokens = torch.where((family == self.note_id)[:, None], note, metric)
        regular = (family == self.metric_id) | (family == self.note_id)
        return torch.where(regular[:, None], tokens, family[:, None])  # EOS / PAD rows

    def violation(self, s: RowState, token: torch.Tensor, c: Constraints) -> str | None:
        """Why the compound ``token [8]`` may not come next in row 0, or None if it may."""
        family_mask, position_mask, program_mask = self.masks(s, c)
        family, position, program = (
            int(token[FIELD[n]]) for n in ("family", "position", "program")
        )
        if not family_mask[0, family]:
            return f"family {self.tokenizer.token_name(family, 0)} not allowed here"
        if family not in (self.metric_id, self.note_id):
            return None
        expected = self.compose(token[None, 0], token[None, 1], token[None, 5], {
            name: token[None, FIELD[name]] for name in ("pitch", "velocity", "duration", "tempo", "meter")
        })[0]  # fmt: skip
        if not torch.equal(expected, token):
            return "a field this family does not use is not Ignore"
        masks = {**self.value_masks(s, c), "pitch": self.pitch_mask(s, token[None, 5])}
        if family == self.metric_id:
            checks = {"position": position_mask[0, position]}
            if self.is_bar_value[position]:
                checks["meter"] = masks["meter"][0, int(token[7])]
            else:
                checks["tempo"] = masks["tempo"][0, int(token[6])]
        else:
            checks = {"program": program_mask[0, program]}
            checks.update(
                {n: masks[n][0, int(token[FIELD[n]])] for n in ("pitch", "velocity", "duration")}
            )
        bad = [name for name, ok in checks.items() if not bool(ok)]
        instrument = self.instrument_of[token[None, 5]]
        if bad == ["pitch"] and s.onset_order()[1][0, instrument[0]] >= self.pitch_of[token[2]]:
            return "pitch is not above the pitches its instrument already started at this position"
        return f"{', '.join(bad)} not allowed here" if bad else None

    def advance(self, s: RowState, tokens: torch.Tensor, c: Constraints) -> torch.Tensor:
        active = s.grammar != self.END
        if c.existing is not None:
            e = c.existing
            existing = (tokens == e.ids[s.cursor]).all(-1) & (s.cursor < e.length) & active
            s.cursor += existing
            s.after_existing = existing
            active = active & ~existing
        s.new_tokens += active
        family = tokens[:, 0]
        is_metric, is_note = family == self.metric_id, family == self.note_id
        is_bar = is_metric & self.is_bar_value[tokens[:, 1]]
        is_position = is_metric & ~is_bar
        s.bars += is_bar
        s.position = torch.where(
            is_bar, -1, torch.where(is_position, self.position_value[tokens[:, 1]], s.position)
        )
        meter = tokens[:, 7]
        s.positions_per_bar = torch.where(
            is_bar & self.is_meter[meter], self.bar_positions[meter], s.positions_per_bar
        )
        tempo = tokens[:, 6]
        s.tempo = torch.where(is_position & self.is_tempo[tempo], tempo, s.tempo)
        instrument = torch.where(is_note, self.instrument_of[tokens[:, 5]], GLOBAL_TRACK)
        s.mark_played(instrument, is_note)
        s.mark_onset(is_metric, instrument, self.pitch_of[tokens[:, 2]], is_note)
        ended = (family == self.eos_id) | (family == self.pad_id)
        s.grammar = torch.where(
            ended, self.END,
            torch.where(is_bar, self.BAR, torch.where(is_position, self.POSITION,
                        torch.where(is_note, self.NOTE, s.grammar))),
        )  # fmt: skip
        return instrument

    def padding(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch, len(CPWORD_FIELDS)), self.pad_id, dtype=torch.long, device=device)


def grammar_for(tokenizer: PolyTokenizer, device) -> RemiGrammar | CPWordGrammar:
    return (RemiGrammar if tokenizer.kind == "remi" else CPWordGrammar)(
        tokenizer, torch.device(device)
    )


def grammar_violations(tokenizer: PolyTokenizer, ids) -> list[str]:
    """Every place where ``ids`` (header, body, optional EOS) breaks the generation grammar, as
    messages; ``[]`` for a sequence the constrained decoder could have written. Any instrument
    may play; EOS may only come in the last bar."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape[1:] != tokenizer.ids_shape:
        return [f"ids of shape {ids.shape}: expected [T] (REMI) or [T, 8] (CPWord)"]
    if ids.size and (ids.min() < 0 or (ids >= np.array(tokenizer.vocab_sizes)).any()):
        return ["ids outside the vocabulary"]
    grammar = grammar_for(tokenizer, "cpu")
    first = ids if ids.ndim == 1 else ids[:, 0]
    separators = np.flatnonzero(first == tokenizer.sep_id)
    if not len(separators):
        return ["no instrument header (BOS ... SEP)"]
    body = torch.as_tensor(ids[separators[0] + 1 :])
    any_instrument = torch.ones(N_TRACK_COLUMNS, dtype=torch.bool)
    any_instrument[GLOBAL_TRACK] = False
    rules = Constraints(
        allowed=any_instrument,
        required=torch.zeros(N_TRACK_COLUMNS, dtype=torch.bool),
        target_bars=int(grammar.bar_of(body.numpy()).sum()),
        max_new_tokens=len(body) + 10**6,
        entries_unordered=True,
    )
    state = RowState.start(1, grammar.START, torch.device("cpu"))
    problems = []
    for index, token in enumerate(body):
        if int(state.grammar[0]) == grammar.END:
            problems.append(f"body token {index}: tokens after EOS")
            break
        problem = grammar.violation(state, token, rules)
        if problem:
            problems.append(f"body token {index}: {problem}")
        grammar.advance(state, token[None], rules)
    return problems


# --------------------------------------------------------------------------------------------
# The model's view: header + recent tokens, in the KV cache (or recomputed, for reference)


class CachedContext:
    """``prefill`` a right-padded batch of windows, then one ``decode_step`` per token."""

    def __init__(self, model: PolyphonyGPT, batch: int):
        self.model = model
        model.setup_cache(batch, model.config.max_seq_len)

    def start(self, ids, tracks, lengths) -> ModelOutput:
        return self.model.prefill(ids, tracks, lengths)

    def step(self, tokens, tracks) -> ModelOutput:
        return self.model.decode_step(tokens, tracks)


class FullForwardContext:
    """The same windows recomputed with a full forward per token: slow, the cache's reference."""

    def __init__(self, model: PolyphonyGPT, batch: int):
        self.model = model

    def start(self, ids, tracks, lengths) -> ModelOutput:
        self.ids, self.tracks = ids.clone(), tracks.clone()
        self.lengths = lengths.clone()
        return self._last()

    def step(self, tokens, tracks) -> ModelOutput:
        rows = torch.arange(len(tokens), device=tokens.device)
        width = int(self.lengths.max()) + 1
        if width > self.ids.shape[1]:
            grow = width - self.ids.shape[1]
            self.ids = torch.cat(
                [self.ids, self.ids[:, -1:].expand(-1, grow, *self.ids.shape[2:])], 1
            )
            self.tracks = torch.cat([self.tracks, self.tracks[:, -1:].expand(-1, grow)], 1)
        self.ids[rows, self.lengths] = tokens
        self.tracks[rows, self.lengths] = tracks
        self.lengths += 1
        return self._last()

    def _last(self) -> ModelOutput:
        width = int(self.lengths.max())
        out = self.model(self.ids[:, :width], self.tracks[:, :width])
        rows = torch.arange(len(self.lengths), device=self.lengths.device)
        last = self.lengths - 1
        logits = {name: value[rows, last] for name, value in out.logits.items()}
        return ModelOutput(logits=logits, hidden=out.hidden[rows, last])


def _windows(ids: torch.Tensor, tracks: torch.Tensor, header_length: int, keep: int, grammar):
    """Header + the last ``keep`` body tokens of every row, starting at a bar line where one is
    in reach (as training windows do); right-padded ``(ids, tracks, lengths)``."""
    total = ids.shape[1]
    body_keep = keep - header_length
    if total <= keep:
        lengths = torch.full((len(ids),), total, dtype=torch.long, device=ids.device)
        return ids, tracks, lengths
    bars = grammar.bar_of(ids[:, total - body_keep :].cpu().numpy())
    rows_ids, rows_tracks = [], []
    for row in range(len(ids)):
        first_bar = np.flatnonzero(bars[row])
        start = total - body_keep + (int(first_bar[0]) if len(first_bar) else 0)
        rows_ids.append(torch.cat([ids[row, :header_length], ids[row, start:]]))
        rows_tracks.append(torch.cat([tracks[row, :header_length], tracks[row, start:]]))
    lengths = torch.tensor([len(r) for r in rows_ids], dtype=torch.long, device=ids.device)
    width = int(lengths.max())
    padded = (
        grammar.padding(len(ids), ids.device)[:, None].expand(-1, width, *ids.shape[2:]).clone()
    )
    padded_tracks = torch.full((len(ids), width), GLOBAL_TRACK, dtype=torch.long, device=ids.device)
    for row, (row_ids, row_tracks) in enumerate(zip(rows_ids, rows_tracks, strict=True)):
        padded[row, : len(row_ids)] = row_ids
        padded_tracks[row, : len(row_tracks)] = row_tracks
    return padded, padded_tracks, lengths


@torch.inference_mode()
def _decode(
    model: PolyphonyGPT,
    grammar: RemiGrammar | CPWordGrammar,
    plan: Plan,
    constraints: Constraints,
    sampling: Sampling,
    batch: int,
    generator: torch.Generator,
    use_cache: bool,
    progress: bool,
    time_limit: float | None = None,
) -> list[np.ndarray]:
    """Sample ``batch`` continuations of ``plan``'s prompt; returns each row's ids (prompt, new
    tokens, EOS). Past ``time_limit`` seconds it stops with a GenerationError."""
    deadline = time.monotonic() + time_limit if time_limit is not None else float("inf")

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise GenerationError(
                f"{plan.source or 'generation'}: stopped after the time limit of {time_limit:g} "
                "s; ask for fewer bars or instruments, a shorter input, or a longer limit "
                "(--time-limit)"
            )

    device = generator.device
    prompt = np.concatenate([plan.header, plan.prompt_body])
    prompt_tracks = grammar.tokenizer.track_ids(prompt)
    state = RowState.start(batch, grammar.START, device)
    replay = Constraints(constraints.allowed, constraints.required, constraints.target_bars, 0)
    for index, token in enumerate(torch.as_tensor(plan.prompt_body, device=device)):
        grammar.advance(state, token.expand(batch, *token.shape), replay)
        if index % 256 == 0:
            check_time()
    state.new_tokens.zero_()
    state.notes.zero_()
    state.first_bar.copy_(state.bars)
    if constraints.existing is not None:
        state.tempo.fill_(constraints.existing.initial_tempo)

    ids = torch.as_tensor(prompt, device=device).expand(batch, *prompt.shape).clone()
    tracks = torch.as_tensor(prompt_tracks, device=device).expand(batch, -1).clone()
    capacity = model.config.max_seq_len
    keep = int(capacity * CONTEXT_KEPT)
    context = (CachedContext if use_cache else FullForwardContext)(model, batch)
    header_length = len(plan.header)
    # A prompt that fits is used whole; a longer one is cut like a full context.
    window = _windows(
        ids, tracks, header_length, capacity if len(prompt) <= capacity else keep, grammar
    )
    out = context.start(*window)
    context_length = int(window[2].max())

    new_ids, new_tracks = [], []
    existing = constraints.existing.length if constraints.existing is not None else 0
    bar = tqdm(total=constraints.target_bars, unit="bar", disable=not progress, leave=False)
    bar.update(int(state.bars.min()))
    for _ in range(constraints.max_new_tokens + existing + 1):
        check_time()
        tokens = grammar.choose(out, model, state, constraints, sampling, generator)
        token_tracks = grammar.advance(state, tokens, constraints)
        new_ids.append(tokens)
        new_tracks.append(token_tracks)
        if progress:
            bar.update(int(state.bars.min()) - bar.n)
        if bool((state.grammar == grammar.END).all()):
            break
        if context_length >= capacity:
            ids = torch.cat([ids, torch.stack(new_ids, 1)], 1)
            tracks = torch.cat([tracks, torch.stack(new_tracks, 1)], 1)
            new_ids, new_tracks = [], []
            window = _windows(ids, tracks, header_length, keep, grammar)
            out = context.start(*window)
            context_length = int(window[2].max())
        else:
            out = context.step(tokens, token_tracks)
            context_length += 1
    bar.close()
    if new_ids:
        ids = torch.cat([ids, torch.stack(new_ids, 1)], 1)
    rows = []
    for row in ids.cpu().numpy():
        first = row if row.ndim == 1 else row[:, 0]
        ends = np.flatnonzero(first[len(prompt) :] == grammar.eos_id)
        rows.append(row[: len(prompt) + int(ends[0]) + 1] if len(ends) else row)
    return rows


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer (pass it as ``checkpoint=`` to reuse across calls)."""

    model: PolyphonyGPT
    tokenizer: PolyTokenizer
    densities: DensityStats  # the training data's notes per bar: defaults and levels
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(path: str | Path | None = None, device: str | None = None) -> Checkpoint:
    """``model.safetensors`` + ``config.json`` + ``tokenizer.json`` from ``path`` (default: the
    shipped checkpoints/polyphony-mini), checked against each other."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_dir():
        raise GenerationError(
            f"{path}: checkpoint directory not found. Train a model with `python train.py "
            f"--config configs/small.yaml`, export it with `python train.py --config "
            f"configs/small.yaml --export {path}`, or pass --checkpoint DIR (a directory with "
            "model.safetensors, config.json and tokenizer.json)"
        )
    if not (path / TOKENIZER_FILE).is_file():
        raise GenerationError(
            f"{path / TOKENIZER_FILE}: not found; a generation checkpoint holds "
            "model.safetensors, config.json and tokenizer.json (model.save_pretrained(dir, tokenizer))"
        )
    try:
        tokenizer = PolyTokenizer.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise GenerationError(
            f"{path / TOKENIZER_FILE}: cannot load the tokenizer ({err})"
        ) from err
    device = device or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise GenerationError(f"--device {device!r}: {err}") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise GenerationError(f"--device {device}: MPS is not available here; use --device cpu")
    model = PolyphonyGPT.from_pretrained(path, device=device)
    config = model.config
    same_vocabulary = list(config.vocab_sizes) == list(tokenizer.vocab_sizes) and (
        not config.token_types or list(config.token_types) == list(tokenizer.token_types)
    )
    if config.tokenization != tokenizer.kind or not same_vocabulary:
        raise GenerationError(
            f"{path}: tokenizer mismatch: config.json describes a {config.tokenization} model "
            f"with vocabulary {list(config.vocab_sizes)}, but tokenizer.json is {tokenizer.kind} "
            f"with {list(tokenizer.vocab_sizes)}; save the model together with the tokenizer it "
            "was trained with"
        )
    try:
        densities = DensityStats.load(path)
    except DensityError as err:
        raise GenerationError(str(err)) from err
    return Checkpoint(model=model, tokenizer=tokenizer, densities=densities, path=path)


# --------------------------------------------------------------------------------------------
# Requests -> prompts and constraints


@dataclass
class Plan:
    """What to decode: the prompt, the output's instruments and the constraints' parameters."""

    instruments: list[int]  # output tracks, in this order
    densities: dict[int, float]  # notes per bar each instrument is asked for (the header's bins)
    header: np.ndarray
    prompt_body: np.ndarray  # given tokens after the header (a continuation's prompt bars)
    allowed: list[int]  # instruments the model may start notes for
    required: list[int]  # instruments that must play
    target_bars: int
    max_new_tokens: int
    tempo: int | None = None
    time_signature: int | None = None
    existing: np.ndarray | None = None  # arrangement: the piece's body tokens
    source: str = ""  # the user's file it was read from (prompt or arrangement), for errors

    def constraints(self, device) -> Constraints:
        def mask(instruments):
            table = torch.zeros(N_TRACK_COLUMNS, dtype=torch.bool, device=device)
            table[list(instruments)] = True
            return table

        targets = torch.zeros(N_TRACK_COLUMNS, device=device)
        for instrument, value in self.densities.items():
            targets[instrument] = value
        return Constraints(
            allowed=mask(self.allowed),
            required=mask(self.required),
            targets=targets,
            target_bars=self.target_bars,
            max_new_tokens=self.max_new_tokens,
            tempo=self.tempo,
            time_signature=self.time_signature,
        )


def resolve_instruments(spec: str | Iterable[str | int]) -> list[int]:
    """Parse an instrument list; collapse duplicates (with a note); refuse > 15 pitched ones."""
    parsed = parse_instruments(spec)
    unique = list(dict.fromkeys(parsed))
    if len(unique) < len(parsed):
        repeated = sorted({instrument_name(i) for i in parsed if parsed.count(i) > 1})
        log.warning(
            "note: %s requested more than once; one track each (a REMI/CPWord track is one "
            "instrument, so two tracks of the same instrument would merge)",
            ", ".join(repeated),
        )
    _check_channels(unique)
    return unique


def _check_channels(instruments: Sequence[int], source: str = "requested") -> None:
    pitched = [i for i in instruments if i != DRUMS]
    if len(pitched) > MAX_PITCHED_INSTRUMENTS:
        raise GenerationError(
            f"{len(pitched)} pitched instruments {source}, but a MIDI file has only "
            f"{MAX_PITCHED_INSTRUMENTS} channels for them (channel 10 is drums): use at most "
            f"{MAX_PITCHED_INSTRUMENTS} pitched instruments (+ drums)"
        )


def _tempo_token(tokenizer: PolyTokenizer, tempo: float | None) -> int | None:
    """The tempo token (REMI) / tempo field value (CPWord) nearest to ``tempo`` bpm."""
    if tempo is None:
        return None
    vocab = tokenizer.miditok.vocab
    table = vocab if tokenizer.kind == "remi" else vocab[FIELD["tempo"]]
    tempi = {
        float(name[len("Tempo_") :]): i for name, i in table.items() if name.startswith("Tempo_")
    }
    low, high = min(tempi), max(tempi)
    if not low <= tempo <= high:
        raise GenerationError(f"--tempo {tempo:g}: outside the vocabulary's {low:g}-{high:g} bpm")
    return tempi[min(tempi, key=lambda value: abs(value - tempo))]


def _meter_token(tokenizer: PolyTokenizer, meter: str | None) -> int | None:
    """The time signature token (REMI) / meter field value (CPWord) of ``meter`` ("3/4")."""
    if meter is None:
        return None
    name = f"TimeSig_{meter.strip()}"
    vocab = tokenizer.miditok.vocab
    table = vocab if tokenizer.kind == "remi" else vocab[FIELD["meter"]]
    if name not in table:
        raise GenerationError(
            f"--time-signature {meter!r}: not in the vocabulary; use one of "
            f"{tokenizer.supported_meters()}"
        )
    return table[name]


def _default_budget(bars: int, instruments: int) -> int:
    return TOKENS_PER_BAR_PER_INSTRUMENT * bars * instruments + 64


def _check_budget(max_new_tokens: int, grammar, instruments: int) -> None:
    needed = grammar.NOTE_COST * instruments + 2 * CLOSING_TOKENS
    if max_new_tokens < needed:
        raise GenerationError(
            f"--max-tokens {max_new_tokens}: too few to give {instruments} instrument(s) a note "
            f"each and close the piece; use at least {needed}"
        )


def read_midi(source: str | Path | Score, what: str) -> tuple[Score, str]:
    """A user's MIDI read and validated as prepare reads it (polyphony.data.midi_input);
    errors name the file, the problem and the fix."""
    name = what if isinstance(source, Score) else str(source)
    if not isinstance(source, Score) and not Path(source).exists():
        raise GenerationError(f"{name}: {what} file not found")
    try:
        score, repair = load_midi(source, name)
    except MidiInputError as err:
        raise GenerationError(str(err)) from err
    if repair is not None:
        log.warning("note: %s: %s", name, repair.describe())
    return score, name


def _encode(
    tokenizer: PolyTokenizer, score: Score, name: str
) -> tuple[tuple[int, ...], np.ndarray]:
    # Every note costs at least 3 tokens (program or family, pitch, duration): refuse before
    # tokenizing what could not be read within the bound anyway.
    least = 3 * score.note_num() + len(score.tempos) + len(score.time_signatures)
    if least > MAX_INPUT_TOKENS:
        raise GenerationError(_too_long(name, least))
    try:
        piece = tokenizer.encode(score, with_eos=False)
    except TokenizationError as err:
        raise GenerationError(f"{name}: {err}") from err
    if len(piece.ids) > MAX_INPUT_TOKENS:
        raise GenerationError(_too_long(name, len(piece.ids)))
    problem = limit_problem(score.note_num(), 0, len(piece.ids), DataConfig())
    if problem:  # mostly empty bars: what prepare refuses too
        raise GenerationError(f"{name}: {problem}")
    return tokenizer.split_header(piece.ids)


def _too_long(name: str, tokens: int) -> str:
    return (
        f"{name}: at least {tokens:,} tokens to read, more than one request may force "
        f"({MAX_INPUT_TOKENS:,}); give a shorter excerpt (fewer bars, e.g. --prompt-bars)"
    )


def _first_bars(score: Score, n_bars: int) -> Score:
    """The notes that start in the first ``n_bars`` bars (whole, as the prompt cut keeps
    them), so a long file is not tokenized for a short prompt."""
    end = max((t.end() for t in score.tracks if t.notes), default=0)
    starts, _ = bar_lines(score, score.ticks_per_quarter, end + 1)
    if n_bars >= len(starts):
        return score
    return score.clip(0, int(starts[n_bars]), clip_end=False)


def _track_order(score: Score, instruments: Iterable[int]) -> list[int]:
    """The instruments in the order of the score's tracks."""
    present = set(instruments)
    order = [_instrument(t.program, t.is_drum) for t in score.tracks if t.note_num() > 0]
    return [i for i in dict.fromkeys(order) if i in present]


def _densities(stats, order, density, measured=None) -> dict[int, float]:
    try:
        return resolve(stats, order, parse_density(density), measured)
    except DensityError as err:
        raise GenerationError(str(err)) from err


def _header(tokenizer: PolyTokenizer, densities: dict[int, float]) -> np.ndarray:
    return tokenizer.header(bins(densities))


def plan_instruments(
    tokenizer, grammar, stats, instruments, bars, tempo, time_signature, max_tokens, density
) -> Plan:
    order = resolve_instruments(instruments)
    densities = _densities(stats, order, density)
    bars = DEFAULT_BARS if bars is None else bars
    if bars < 1:
        raise GenerationError(f"--bars {bars}: must be at least 1")
    budget = max_tokens or _default_budget(bars, len(order))
    _check_budget(budget, grammar, len(order))
    return Plan(
        instruments=order,
        densities=densities,
        header=_header(tokenizer, densities),
        prompt_body=np.zeros((0, *tokenizer.ids_shape), dtype=np.int64),
        allowed=order,
        required=order,
        target_bars=bars,
        max_new_tokens=budget,
        tempo=_tempo_token(tokenizer, tempo),
        time_signature=_meter_token(tokenizer, time_signature),
    )


def plan_continuation(
    tokenizer, grammar, stats, prompt, prompt_bars, instruments, bars, max_tokens, density
) -> Plan:
    score, name = read_midi(prompt, "prompt")
    if instruments is not None:
        order = resolve_instruments(instruments)
        kept = score.copy()
        kept.tracks = [t for t in score.tracks if _instrument(t.program, t.is_drum) in order]
        in_score = {_instrument(t.program, t.is_drum) for t in score.tracks if t.notes}
        dropped = sorted(in_score - set(order))
        if in_score and dropped == sorted(in_score):
            raise GenerationError(
                f"{name}: none of its instruments ({', '.join(instrument_name(i) for i in dropped)}) "
                "is in --instruments; keep at least one to continue from"
            )
        if dropped:
            names = ", ".join(instrument_name(i) for i in dropped)
            log.warning("note: %s of the prompt not in --instruments; left out", names)
        score = kept
    if prompt_bars is not None and prompt_bars < 1:
        raise GenerationError(f"--prompt-bars {prompt_bars}: must be at least 1")
    in_file = tuple(_instrument(t.program, t.is_drum) for t in score.tracks if t.notes)
    clipped = _first_bars(score, prompt_bars) if prompt_bars is not None else score
    if clipped.note_num() == 0:
        raise GenerationError(
            f"{name}: no notes in its first {prompt_bars} bar(s) to continue from; raise "
            "--prompt-bars"
        )
    _, body = _encode(tokenizer, clipped, name)
    bar_starts = np.flatnonzero(grammar.bar_of(body))
    if prompt_bars is not None and prompt_bars < len(bar_starts):
        body = body[: bar_starts[prompt_bars]]
    n_bars = int(grammar.bar_of(body).sum())
    if n_bars > MAX_BARS:
        raise GenerationError(
            f"{name}: a {n_bars}-bar prompt, more than one request reads ({MAX_BARS}); "
            "continue from fewer bars (--prompt-bars)"
        )
    if instruments is None:  # the file's instruments, also those that enter after the prompt
        order = _track_order(score, in_file)
    _check_channels(order, "in the prompt and request")
    bars = DEFAULT_BARS if bars is None else bars
    if bars < 1:
        raise GenerationError(f"--bars {bars}: must be at least 1")
    # A bar line right after the prompt: new notes never land in the prompt's bars.
    if tokenizer.kind == "remi":
        bar_line = np.array([grammar.bar_id])
    else:
        bar_line = body[np.flatnonzero(grammar.bar_of(body))[-1]][None]
    budget = max_tokens or _default_budget(bars, len(order))
    _check_budget(budget, grammar, len(order))
    # Each prompt track keeps playing as it does in the prompt bars, unless asked otherwise.
    measured = tokenizer.notes_per_bar(body, tokenizer.track_ids(body), ends_piece=True)
    densities = _densities(stats, order, density, measured)
    return Plan(
        instruments=order,
        densities=densities,
        header=_header(tokenizer, densities),
        prompt_body=np.concatenate([body, bar_line]),
        allowed=order,
        required=order,
        target_bars=n_bars + bars,
        max_new_tokens=budget,
        source=name,
    )


def plan_arrangement(tokenizer, grammar, stats, arrange, add, max_tokens, density) -> Plan:
    score, name = read_midi(arrange, "arrangement")
    added = resolve_instruments(add)
    existing, body = _encode(tokenizer, score, name)
    clash = [i for i in added if i in existing]
    if clash:
        raise GenerationError(
            f"{', '.join(instrument_name(i) for i in clash)} already in {name}; --add takes "
            f"instruments the piece does not have (it has "
            f"{', '.join(instrument_name(i) for i in existing)})"
        )
    order = _track_order(score, existing) + added
    _check_channels(order, "in the piece and --add")
    n_bars = int(grammar.bar_of(body).sum())
    if n_bars > MAX_BARS:
        raise GenerationError(
            f"{name}: {n_bars} bars, more than one request arranges ({MAX_BARS}); arrange it in "
            "shorter sections"
        )
    budget = max_tokens or _default_budget(n_bars, len(added))
    _check_budget(budget, grammar, len(added))
    # The piece's tracks are announced as they play; added ones at their default or request.
    measured = tokenizer.notes_per_bar(body, tokenizer.track_ids(body), ends_piece=True)
    densities = _densities(stats, order, density, measured)
    return Plan(
        instruments=order,
        densities=densities,
        header=_header(tokenizer, densities),
        prompt_body=np.zeros((0, *tokenizer.ids_shape), dtype=np.int64),
        allowed=added,
        required=added,
        target_bars=n_bars,
        max_new_tokens=budget,
        existing=body,
        source=name,
    )


# --------------------------------------------------------------------------------------------
# Output


def validate_score(score: Score) -> None:
    """Refuse what a MIDI writer would corrupt: negative times, empty notes, values out of range,
    events beyond 2^28 ticks (symusic wraps them silently)."""
    for track in score.tracks:
        notes = track.notes.numpy()
        time, duration = notes["time"].astype(np.int64), notes["duration"].astype(np.int64)
        pitch, velocity = notes["pitch"].astype(np.int64), notes["velocity"].astype(np.int64)
        problems = {
            "negative note times": (time < 0).any(),
            "notes without duration": (duration <= 0).any(),
            "pitches outside 0..127": ((pitch < 0) | (pitch > 127)).any(),
            "velocities outside 1..127": ((velocity < 1) | (velocity > 127)).any(),
            f"notes ending after tick {MAX_TICK}": (time + duration > MAX_TICK).any(),
        }
        for problem, found in problems.items():
            if found:
                raise GenerationError(f"track {track.name!r}: {problem}; the output is not written")
    for tempo in score.tempos:
        if not np.isfinite(tempo.qpm) or tempo.qpm <= 0 or tempo.time < 0:
            raise GenerationError(f"invalid tempo {tempo}; the output is not written")


def to_score(tokenizer: PolyTokenizer, ids: np.ndarray, plan: Plan) -> Score:
    """Generated ids -> a Score with one track per instrument in the plan's order, the request
    marker, validated."""
    try:
        score = tokenizer.decode(ids)
    except DecodeError as err:  # the grammar makes this unreachable; say so if it is not
        raise GenerationError(f"generated tokens did not decode ({err}); please report it") from err
    by_instrument = {_instrument(t.program, t.is_drum): t for t in score.tracks}
    silent = [i for i in plan.instruments if i not in by_instrument]
    if silent:  # the constraints prevent it; only a token cap that cut the piece short can
        log.warning("note: %s did not play", ", ".join(instrument_name(i) for i in silent))
    score.tracks = [by_instrument[i] for i in plan.instruments if i in by_instrument]
    if plan.existing is None:  # an arrangement keeps the user's notes exactly as they are
        _end_at_bar_line(score, plan.target_bars)
    _tempo_from_start(score, tokenizer, ids)
    write_request(score, plan.instruments)
    validate_score(score)
    return score


def _end_at_bar_line(score: Score, n_bars: int) -> None:
    """Cut notes held past the last bar line: ``bars=8`` gives 8 bars, not 8 bars and a chord
    ringing into a ninth (REMI/CPWord durations may outlast the piece)."""
    notes = [track.notes.numpy() for track in score.tracks]
    piece_end = max(
        (int((n["time"] + n["duration"]).max()) for n in notes if n["time"].size), default=0
    )
    if piece_end == 0:
        return
    starts, _ = bar_lines(score, score.ticks_per_quarter, piece_end + 1)
    if len(starts) <= n_bars:
        return
    end = int(starts[n_bars])
    for track in score.tracks:
        kept = track.notes.filter(lambda note: note.time < end, inplace=False)
        for note in kept:
            note.duration = min(note.duration, end - note.time)
        track.notes = kept


def _tempo_from_start(score: Score, tokenizer: PolyTokenizer, ids: np.ndarray) -> None:
    """Let the piece's first tempo hold from tick 0.

    miditok writes the first tempo where the first Position is: REMI's decoder places it there
    (the MIDI default, 120 bpm, plays before), CPWord's puts its default tempo in front. Either
    way a piece generated at ``--tempo 90`` whose first note is off the downbeat would start at
    another tempo.
    """
    if tokenizer.kind == "remi":
        names = [tokenizer.token_name(int(i)) for i in ids]
    else:
        names = [tokenizer.token_name(int(i), FIELD["tempo"]) for i in ids[:, FIELD["tempo"]]]
    first = next((name for name in names if name.startswith("Tempo_")), None)
    if first is None:
        return
    qpm = float(first.split("_")[1])
    tempos = list(score.tempos)
    index = next((i for i, t in enumerate(tempos) if abs(t.qpm - qpm) < 0.01), None)
    if index is not None:
        tempos = tempos[index:]
        tempos[0].time = 0
        score.tempos = tempos


def midi_bytes(score: Score, name: str = "the output") -> bytes:
    """Validate, serialise, re-parse strictly and compare: MIDI bytes that read back as
    ``score`` (symusic's writer alone would not say when it corrupts something)."""
    validate_score(score)
    data = score.dumps_midi()
    try:
        reread = Score.from_midi(data)
    except RuntimeError as err:
        raise GenerationError(f"{name}: the written MIDI does not parse back ({err})") from err
    written = [(t.program, t.is_drum, t.note_num()) for t in score.tracks if t.note_num()]
    parsed = [(t.program, t.is_drum, t.note_num()) for t in reread.tracks if t.note_num()]
    if sorted(written) != sorted(parsed):
        raise GenerationError(f"{name}: the written MIDI reads back differently; not written")
    return data


def write_midi(score: Score, path: str | Path) -> Path:
    """:func:`midi_bytes` to ``path``; the file appears only if all checks pass."""
    path = Path(path)
    data = midi_bytes(score, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def output_paths(output: str | Path, count: int) -> list[Path]:
    """``song.mid`` -> ``[song.mid]``, or ``[song_0.mid, song_1.mid, ...]`` for several samples."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.mid'}") for i in range(count)]


# --------------------------------------------------------------------------------------------
# The API


def check_request(
    instruments, bars, prompt, prompt_bars, arrange, add, tempo, time_signature
) -> None:
    """Refuse combinations of options that do not make one request (before any model loads)."""
    if prompt is not None and arrange is not None:
        raise GenerationError("--prompt and --arrange exclude each other: continue or arrange")
    if arrange is not None and (instruments is not None or bars is not None):
        raise GenerationError(
            "--arrange keeps the piece's length and instruments: give the new ones with --add "
            "(not --instruments), and no --bars"
        )
    if add is not None and arrange is None:
        raise GenerationError("--add goes with --arrange FILE (the piece to add instruments to)")
    if arrange is not None and add is None:
        raise GenerationError(
            "--arrange needs --add: the instruments to write, e.g. 'strings, drums'"
        )
    if prompt is None and arrange is None and instruments is None:
        raise GenerationError("nothing to generate: give --instruments, --prompt or --arrange")
    if (prompt is not None or arrange is not None) and (
        tempo is not None or time_signature is not None
    ):
        raise GenerationError(
            "--tempo and --time-signature set up a new piece; a prompt or arranged piece keeps its own"
        )
    if prompt_bars is not None and prompt is None:
        raise GenerationError("--prompt-bars goes with --prompt FILE")
    if bars is not None and bars > MAX_BARS:
        raise GenerationError(
            f"--bars {bars}: more than one request writes ({MAX_BARS}); continue the result "
            "with --prompt for more"
        )


def make_plan(
    tokenizer: PolyTokenizer,
    stats: DensityStats,
    *,
    instruments: str | Iterable[str | int] | None = None,
    bars: int | None = None,
    prompt: str | Path | Score | None = None,
    prompt_bars: int | None = None,
    arrange: str | Path | Score | None = None,
    add: str | Iterable[str | int] | None = None,
    tempo: float | None = None,
    time_signature: str | None = None,
    max_tokens: int | None = None,
    density: str | dict | None = None,
) -> Plan:
    """Check a request (the arguments of :func:`generate`) and turn it into a :class:`Plan`;
    ``stats`` (the checkpoint's) gives the densities not requested or measured."""
    check_request(instruments, bars, prompt, prompt_bars, arrange, add, tempo, time_signature)
    grammar = grammar_for(tokenizer, "cpu")
    if arrange is not None:
        return plan_arrangement(tokenizer, grammar, stats, arrange, add, max_tokens, density)
    if prompt is not None:
        return plan_continuation(
            tokenizer, grammar, stats, prompt, prompt_bars, instruments, bars, max_tokens, density
        )
    return plan_instruments(
        tokenizer, grammar, stats, instruments, bars, tempo, time_signature, max_tokens, density
    )


def sample_tokens(
    checkpoint: Checkpoint,
    plan: Plan,
    sampling: Sampling | None = None,
    num_samples: int = 1,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = False,
    time_limit: float | None = None,
) -> list[np.ndarray]:
    """Decode ``num_samples`` rows of ``plan`` as one batch; returns each row's token ids
    (header, prompt, new tokens, EOS). ``use_cache=False`` recomputes the whole context with a
    full forward for every token: slow, the reference the KV cache is tested against.
    ``time_limit``: seconds of decoding before it stops with a GenerationError."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    sampling = (sampling or Sampling()).check(tokenizer.kind)
    if num_samples < 1:
        raise GenerationError(f"--num-samples {num_samples}: must be at least 1")
    if len(plan.header) + 16 > model.config.max_seq_len * CONTEXT_KEPT:
        raise GenerationError(
            f"{len(plan.instruments)} instruments need a {len(plan.header)}-token header, too "
            f"long for this model's context of {model.config.max_seq_len} tokens"
        )
    grammar = grammar_for(tokenizer, checkpoint.device)
    constraints = plan.constraints(checkpoint.device)
    if plan.existing is not None:
        constraints.existing = grammar.existing_stream(plan.existing, checkpoint.device)
    generator = torch.Generator(device=checkpoint.device).manual_seed(seed)
    return _decode(
        model, grammar, plan, constraints, sampling, num_samples, generator, use_cache, progress,
        time_limit,
    )  # fmt: skip


def generate(
    instruments: str | Iterable[str | int] | None = None,
    bars: int | None = None,
    *,
    prompt: str | Path | Score | None = None,
    prompt_bars: int | None = None,
    arrange: str | Path | Score | None = None,
    add: str | Iterable[str | int] | None = None,
    tempo: float | None = None,
    time_signature: str | None = None,
    density: str | dict | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    field_temperature: dict[str, float] | str | None = None,
    steer: float = DEFAULT_STEER,
    num_samples: int = 1,
    max_tokens: int | None = None,
    seed: int | None = None,
    checkpoint: str | Path | Checkpoint | None = None,
    device: str | None = None,
    compile: bool = False,
    progress: bool = False,
    time_limit: float | None = None,
) -> Score | list[Score]:
    """Generate music; returns a ``symusic.Score`` (a list of them when ``num_samples > 1``).

    * ``generate("piano, bass, drums", bars=32)``: a new piece in exactly these instruments.
    * ``generate(prompt="in.mid", prompt_bars=4, bars=8)``: continue the first 4 bars of in.mid
      for 8 more bars, with its instruments (or ``instruments=`` to add or restrict).
    * ``generate(arrange="in.mid", add="strings, drums")``: keep every note of in.mid and write
      parts for the added instruments in time with it.

    ``density`` sets how much parts play: ``"bass=4, drums=12, piano=dense"`` (notes per bar,
    or sparse/medium/dense = the instrument's quartiles in the training data). Unnamed parts
    play at their median in the training data; a prompt's or arranged piece's tracks as they
    play there (densities.py).

    ``bars`` counts the bars to generate (after the prompt, if any; default 16); ``max_tokens``
    caps the tokens the model chooses, ``time_limit`` the seconds of decoding; a prompt or
    arranged piece is read as prepare reads files (clamping out-of-range velocities, refusing
    corrupt ones) and may hold at most MAX_INPUT_TOKENS tokens. The same ``seed`` gives the same output on the same
    machine; ``seed=None`` draws one (logged). ``checkpoint`` is a directory (default: the
    shipped checkpoints/polyphony-mini) or a loaded :class:`Checkpoint`. Every Score has one
    track per instrument, carries the request marker (metrics.write_request) and has passed
    :func:`validate_score`; save it with :func:`write_midi`.
    """
    if isinstance(field_temperature, str):
        field_temperature = parse_field_temperature(field_temperature)
    # Mistakes in the request are reported before the model loads.
    check_request(instruments, bars, prompt, prompt_bars, arrange, add, tempo, time_signature)
    instruments = None if instruments is None else resolve_instruments(instruments)
    add = None if add is None else resolve_instruments(add)
    loaded = (
        checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device)
    )
    sampling = Sampling(temperature, top_k, top_p, dict(field_temperature or {}), steer)
    plan = make_plan(
        loaded.tokenizer, loaded.densities, instruments=instruments, bars=bars, prompt=prompt,
        prompt_bars=prompt_bars, arrange=arrange, add=add, tempo=tempo,
        time_signature=time_signature, max_tokens=max_tokens, density=density,
    )  # fmt: skip
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        log.info("seed %d (pass --seed %d to repeat)", seed, seed)
    if compile:
        compile_decoder(loaded.model)
    rows = sample_tokens(
        loaded, plan, sampling, num_samples, seed, progress=progress, time_limit=time_limit
    )
    scores = [to_score(loaded.tokenizer, row, plan) for row in rows]
    return scores[0] if num_samples == 1 else scores


def compile_decoder(model: PolyphonyGPT) -> None:
    """torch.compile each decoder block, once (dynamic shapes: the cache grows every step)."""
    if not getattr(model, "_blocks_compiled", False):
        for block in model.blocks:
            block.compile(dynamic=True)
        model._blocks_compiled = True
