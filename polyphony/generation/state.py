"""What each row has written so far (RowState), and what the request demands of it (Constraints)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from miditok.utils import compute_ticks_per_bar
from symusic import TimeSignature

from ..instruments import DRUMS, GLOBAL_TRACK
from ..tokenizer import (
    PolyTokenizer,
)
from .common import (
    AHEAD_SCALE,
    CLOSING_TOKENS,
    MAX_NOTES_PER_ONSET,
    N_TRACK_COLUMNS,
    RECALL_BARS,
)


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
    # At the current position: each instrument's highest pitch (-1: none) and notes [B, 130], and
    # the last instrument of the header order that started one [B] (-1: none). Kept up to date
    # note by note: reducing a [B, 130, 128] table of onsets every step cost ~5 % of a step.
    onset_pitch: torch.Tensor
    onset_notes: torch.Tensor
    onset_last: torch.Tensor
    pitch_bar: torch.Tensor  # [B, 130, 128]: the bar each instrument last began each pitch in
    new_tokens: torch.Tensor  # tokens the model chose (forced and prompt tokens excluded)
    cursor: torch.Tensor  # arrangement: index of the next existing token
    after_existing: torch.Tensor  # arrangement: the last token was an existing one
    rows: torch.Tensor  # [B] 0..B-1, made once: every per-row lookup indexes with it
    # Loops (Sampling.loop) only: [B, 130, positions, 128] int16, the bar each instrument last
    # began each pitch in at each position of a bar (3.2 MB a row; bars < MAX_BARS).
    pitch_at: torch.Tensor | None = None
    # Every row has ended (its grammar state is the grammar's END): set by the grammar's
    # ``advance`` from the one sync it makes anyway, so the decode loop reads no tensor for it.
    finished: bool = False

    @classmethod
    def start(
        cls, batch: int, grammar_state: int, device: torch.device, positions: int = 0
    ) -> RowState:
        """``positions``: the most positions a bar can have (the grammar's ``positions``), to
        remember where each pitch was begun (loops); 0: not remembered."""

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
            onset_pitch=torch.full((batch, N_TRACK_COLUMNS), -1, dtype=torch.long, device=device),
            onset_notes=torch.zeros(batch, N_TRACK_COLUMNS, dtype=torch.long, device=device),
            onset_last=full(-1),
            pitch_bar=torch.full(
                (batch, N_TRACK_COLUMNS, 128), -RECALL_BARS - 1, dtype=torch.long, device=device
            ),
            new_tokens=full(0),
            cursor=full(0),
            after_existing=full(False, torch.bool),
            rows=torch.arange(batch, device=device),
            pitch_at=torch.full(
                (batch, N_TRACK_COLUMNS, positions, 128),
                -RECALL_BARS - 1,
                dtype=torch.int16,
                device=device,
            )
            if positions
            else None,
        )

    def mark_played(self, instruments: torch.Tensor, started: torch.Tensor) -> None:
        self.played[self.rows, instruments] |= started
        self.notes[self.rows, instruments] += started

    def steering(self, targets: torch.Tensor, strength: float) -> torch.Tensor:
        """``[B, 130]`` logit bonus per instrument: ``strength`` x how far its notes lag behind its
        target notes per bar over the bars written, less ``strength`` x how far they run past the
        target of every bar begun; both in units of ``2 + target`` notes, neither capped."""
        done = (self.bars - self.first_bar - 1).clamp(min=0)  # whole bars written
        bars = done + (self.position + 1).clamp(min=0) / self.positions_per_bar.clamp(min=1)
        target, scale = targets[None, :], 2.0 + targets[None, :]
        lag = target * bars[:, None] - self.notes
        # Within a bar a part places its notes where the music puts them (a chord, a downbeat):
        # it runs ahead only past the whole bar's worth. Notes played early are not taken back,
        # so past it a part is held back faster than a lagging one is pulled (AHEAD_SCALE). No
        # cap either way: a model sure of a dense chord pattern outweighed a capped hold-back, and
        # one sure a sound effect or a second synth should rest left them silent under a capped
        # pull (a bar behind, the pull is about `strength`; it grows as the part falls behind).
        over = (self.notes - target * (done + 1)[:, None]).clamp(min=0)
        pull = lag.clamp(min=0) / scale - over / (AHEAD_SCALE * scale)
        return strength * pull

    def new_onset(self, moved: torch.Tensor) -> None:
        """A new Position or Bar (``moved``) clears a row's onsets."""
        self.onset_pitch.masked_fill_(moved[:, None], -1)
        self.onset_notes.masked_fill_(moved[:, None], 0)
        self.onset_last.masked_fill_(moved, -1)

    def start_notes(self, instruments, pitches, started) -> None:
        """A note (``started``) adds its pitch to the onset, and its instrument's pitch is
        marked as begun in this bar (phrase recall) and at this position (loops)."""
        rows = self.rows
        pitch = pitches.clamp(0, 127)
        begun = torch.where(started, pitch, -1)
        self.onset_pitch[rows, instruments] = self.onset_pitch[rows, instruments].maximum(begun)
        self.onset_notes[rows, instruments] += started
        self.onset_last = torch.where(started, instruments, -1).maximum(self.onset_last)
        seen = self.pitch_bar[rows, instruments, pitch]
        self.pitch_bar[rows, instruments, pitch] = torch.where(started, self.bars, seen)
        if self.pitch_at is not None:
            at = self.position.clamp(min=0)
            seen = self.pitch_at[rows, instruments, at, pitch]
            new = torch.where(started, self.bars.to(torch.int16), seen)
            self.pitch_at[rows, instruments, at, pitch] = new

    def recent_pitches(self, instruments: torch.Tensor) -> torch.Tensor:
        """``[B, 128]`` bool: the pitches each row's instrument began in this bar or the
        ``RECALL_BARS`` before it."""
        return self.bars[:, None] - self.pitch_bar[self.rows, instruments] <= RECALL_BARS

    def pitches_here(self, instruments: torch.Tensor) -> torch.Tensor:
        """``[B, 128]`` bool: the pitches each row's instrument began at this position of one
        of the ``RECALL_BARS`` bars before this one (a state started with ``positions``)."""
        at = self.position.clamp(min=0)
        lag = self.bars[:, None] - self.pitch_at[self.rows, instruments, at].long()
        return (lag >= 1) & (lag <= RECALL_BARS)

    def groove(self, pitch: torch.Tensor, is_drum: torch.Tensor) -> torch.Tensor:
        """``[B, V]``, 0 to 2 per value of a pitch field (``pitch``: its pitch, ``is_drum``: a
        kit piece): 1 if the drums played that kit piece in their last ``RECALL_BARS`` bars, 1
        more if at this position of one of them. Rows drawing a pitched note mask kit pieces
        out, so the drums' history serves every row."""
        bars = self.bars[:, None]
        recent = bars - self.pitch_bar[:, DRUMS] <= RECALL_BARS
        lag = bars - self.pitch_at[self.rows, DRUMS, self.position.clamp(min=0)]
        kit = recent.float() + ((lag >= 1) & (lag <= RECALL_BARS)).float()
        return kit[:, pitch] * is_drum

    def chord_full(self) -> torch.Tensor:
        """``[B, 130]``: instruments that started MAX_NOTES_PER_ONSET notes at this position."""
        return self.onset_notes >= MAX_NOTES_PER_ONSET

    def onset_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the canonical order stands at this position (tokenizer.canonical_score: header
        order, then pitch ascending): the last instrument that started a note here ``[B]`` and
        each instrument's highest pitch here ``[B, 130]``, -1 where none."""
        return self.onset_last, self.onset_pitch


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
    # Registers (plan.register_tables; None: any pitch, as grammar_violations checks and
    # --register 0 asks): [130, 2] the lowest and highest pitch each instrument may start, and
    # [130, 128] each pitch's log-density under the Gaussian of the instrument's pitches.
    registers: torch.Tensor | None = None
    pitch_prior: torch.Tensor | None = None
    # grammar_violations: any instrument's first note may break the onset order (the decoder
    # allows it to a missing instrument it forces in, under a budget the checker cannot know).
    entries_unordered: bool = False
    tables: dict = field(default_factory=dict)  # the grammar's and Budget's, made once a decode

    def highest_start(self, top_pitch: int) -> torch.Tensor:
        """``[130]``: the highest pitch each instrument may start (at most ``top_pitch``, the
        vocabulary's): an instrument whose chord here reached it starts no more notes here.
        Built once per decode (asked every step)."""
        highest = self.tables.get("highest_start")
        if highest is None:
            if self.registers is None:
                highest = torch.full((N_TRACK_COLUMNS,), top_pitch, device=self.allowed.device)
            else:
                highest = self.registers[:, 1].clamp(max=top_pitch)
            self.tables["highest_start"] = highest
        return highest

    def in_register(self, instruments: torch.Tensor, pitch_of: torch.Tensor) -> torch.Tensor | bool:
        """``[B, V]``: whether each row's instrument may start each value's pitch (``pitch_of``
        ``[V]``); True where registers are off."""
        if self.registers is None:
            return True
        low, high = self.registers[instruments].unbind(-1)
        return (pitch_of >= low[:, None]) & (pitch_of <= high[:, None])


@dataclass
class Budget:
    """Per row: which requested instruments have not played yet, and how close the end is."""

    missing: torch.Tensor  # [B, 130] bool
    complete: torch.Tensor  # nothing missing
    urgent: torch.Tensor  # the token budget only just covers the missing notes and a close
    closing: torch.Tensor  # urgent, or in the last bar: no new bar, EOS once complete

    @property
    def must_finish(self) -> torch.Tensor:
        """Urgent and complete: end as soon as the grammar allows."""
        return self.urgent & self.complete

    @classmethod
    def of(cls, s: RowState, c: Constraints, note_cost: int) -> Budget:
        missing = c.required & ~s.played
        n_missing = missing.sum(-1)
        # Urgent once the tokens left only cover a note per missing instrument (one, when none
        # is missing) and a close: the new-token count at which that happens, per count of
        # missing instruments, is a table made once per decode (one lookup, not five operations;
        # one grammar, so one ``note_cost``, per decode).
        urgent_from = c.tables.get("urgent_from")
        if urgent_from is None:
            missing_counts = torch.arange(N_TRACK_COLUMNS + 1, device=s.new_tokens.device)
            urgent_from = (
                c.max_new_tokens - note_cost * missing_counts.clamp(min=1) - CLOSING_TOKENS
            )
            c.tables["urgent_from"] = urgent_from
        urgent = s.new_tokens >= urgent_from[n_missing]
        closing = urgent | (s.bars >= c.target_bars)
        return cls(missing, n_missing == 0, urgent, closing)


def _one_hot(ids: torch.Tensor, size: int) -> torch.Tensor:
    hot = torch.zeros(len(ids), size, dtype=torch.bool, device=ids.device)
    hot[torch.arange(len(ids), device=ids.device), ids.clamp(0, size - 1)] = True
    return hot


def _check_choices(allowed: torch.Tensor, s: RowState, end_state: int) -> bool:
    """Every unfinished row must have a legal token; an empty row is a bug in the rules.
    Returns whether every row has one (a finished row may have none)."""
    if bool(allowed.any(-1).all()):
        return True
    stuck = ~allowed.any(-1) & (s.grammar != end_state)
    if bool(stuck.any()):
        row = int(stuck.nonzero()[0, 0])
        raise RuntimeError(
            f"generation constraints left row {row} without a legal token (grammar state "
            f"{int(s.grammar[row])}, bar {int(s.bars[row])}); please report this with the command"
        )
    return False


def positions_per_bar(tokenizer: PolyTokenizer, meter: str) -> int:
    """Positions in a bar of ``meter`` ("6/8"), as miditok's REMI and CPWord decoders count
    them (a beat is the meter's denominator note, ``max_num_pos_per_beat`` positions each)."""
    numerator, denominator = (int(x) for x in meter.split("/"))
    midi = tokenizer.miditok
    ticks_per_position = midi._tpb_per_ts[denominator] // midi.config.max_num_pos_per_beat
    bar = compute_ticks_per_bar(TimeSignature(0, numerator, denominator), midi.time_division)
    return bar // ticks_per_position
