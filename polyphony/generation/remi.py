"""The REMI grammar: legal next tokens as boolean masks from tables built once per tokenizer."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

from ..instruments import GLOBAL_TRACK
from ..instruments import program_to_instrument as _instrument
from ..model import ModelOutput
from ..tokenizer import (
    PolyTokenizer,
)
from .common import N_TRACK_COLUMNS
from .sampling import Sampling, bar_line_ends_piece, sample
from .state import (
    Budget,
    Constraints,
    ExistingStream,
    RowState,
    _check_choices,
    _one_hot,
    positions_per_bar,
)

NOTE_FIELDS = {
    "Pitch": "pitch",
    "PitchDrum": "pitch",
    "Velocity": "velocity",
    "Duration": "duration",
}


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
    HEADS = ("next_token",)
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
        self._temperatures: tuple[Sampling, torch.Tensor | None, list[float]] | None = None
        self.is_bar, self.is_timesig = of_kind("Bar"), of_kind("TimeSig")
        self.is_position, self.is_tempo = of_kind("Position"), of_kind("Tempo")
        self.is_program, self.is_eos = of_kind("Program"), of_kind("EOS")
        # The tokens on an instrument's track (the model's track id: the note's instrument).
        self.on_track = of_kind("Program", "Pitch", "PitchDrum", "Velocity", "Duration")
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
        self.is_pitched_pitch = of_kind("Pitch")  # phrase recall leaves the drum kit alone
        self.is_drum_pitch = of_kind("PitchDrum")  # ... which keeps its groove (Sampling.groove)
        self.pitch_of = table(
            [
                int(v) if k in ("Pitch", "PitchDrum") else 0
                for k, v in zip(self.kinds, values, strict=True)
            ]
        )
        self.top_pitch = int(self.pitch_of[self.is_pitch].max())  # drums and pitched alike
        self.positions = int(self.position_value.max()) + 1  # the most a bar can have
        self.next_state = table(
            [
                (self.DRUM_PROGRAM if value == "-1" else self.PROGRAM)
                if kind == "Program"
                else state_after.get(kind, self.END)  # EOS, PAD and the other specials end a row
                for kind, value in zip(self.kinds, values, strict=True)
            ]
        )
        self.ids = torch.arange(size, device=device)
        # Constants of one step, made once: negated kinds, instrument columns, flag weights.
        self.not_position, self.not_program = ~self.is_position, ~self.is_program
        self.not_pitch = ~self.is_pitch
        self.columns = torch.arange(N_TRACK_COLUMNS, device=device)
        flag_bits = torch.arange(len(self.FLAGS), device=device)[:, None]
        self.flag_weights = len(self.STATE_NAMES) << flag_bits  # situation = state + flags @ this
        # What advance needs to know of a token, in one lookup (one row per token id).
        self.token_flags = torch.stack(
            [self.is_bar, self.is_position, self.is_program, self.is_timesig, self.is_tempo,
             self.is_pitch, self.on_track, self.next_state != self.END], -1,
        )  # fmt: skip
        self.token_values = torch.stack(
            [self.position_value, self.bar_positions, self.instrument_of, self.pitch_of,
             self.next_state], -1,
        )  # fmt: skip
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
            table = self._structure(situation % n_states, c, **flags)
            c.tables["structure"] = table
            # The states whose row is the same under every flag (they lead to a Pitch, a
            # Velocity, a Duration, a TimeSig: kinds no budget or tempo rule restricts).
            same = (table.view(-1, n_states, self.size) == table[:n_states]).all(-1).all(0)
            c.tables["flag_free"] = frozenset(
                state for state, free in enumerate(same.tolist()) if free
            )
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
        states = s.grammar.tolist()
        return self._allowed(s, c, states, self._follows(states))

    def _follows(self, states: list[int]) -> set[str]:
        """The kinds of token some row's grammar state lets it write next."""
        return set().union(*(self.FOLLOWS[state] for state in set(states)))

    def _allowed(self, s: RowState, c: Constraints, states: list[int], follows: set[str]):
        col = lambda x: x[:, None]  # noqa: E731  [B] -> [B, 1] against the vocabulary
        structure = self.structure(c)
        # Rows about to write a Pitch, a Velocity or a Duration (3 tokens of a note's 4) need
        # neither the flags nor the budget (which the Program checks below also read).
        if "Program" not in follows and c.tables["flag_free"].issuperset(states):
            allowed = structure[s.grammar]
        else:
            b = Budget.of(s, c, self.NOTE_COST)
            flags = torch.stack((b.closing, b.complete, b.urgent, s.tempo >= 0, s.after_existing))
            allowed = structure[s.grammar + (flags * self.flag_weights).sum(0)]
        # The checks below only narrow Positions, Programs and Pitches: rows about to write
        # anything else (a Velocity or a Duration: half the tokens of a note) skip them.
        if "Position" in follows:
            # Positions strictly increase within the bar and stay inside it.
            allowed &= self.not_position | (
                (self.position_value > col(s.position))
                & (self.position_value < col(s.positions_per_bar))
            )
        last, highest = s.onset_order()
        if "Program" in follows:
            # In the closing stretch only missing instruments start notes; no instrument starts
            # more than MAX_NOTES_PER_ONSET notes at one position.
            forcing = col(b.closing & ~b.complete)
            blocked = s.chord_full() | (forcing & ~b.missing)
            # The training order at one position: instruments in header order, each one's
            # pitches ascending (so never a pitch twice: MIDI cannot hold the copy). A missing
            # instrument forced in at the end may break it.
            excused = forcing & b.missing
            if c.entries_unordered:
                excused |= ~s.played
            in_order = (self.columns >= col(last)) | excused
            # and an instrument starts a note only while a pitch above its last one remains (in
            # its register, when registers are on).
            in_order &= ~blocked & (highest < c.highest_start(self.top_pitch))
            allowed &= self.not_program | in_order[:, self.instrument_of]
        if "Pitch" in follows or "PitchDrum" in follows:
            allowed &= self.not_pitch | (self.pitch_of > col(highest[s.rows, s.instrument]))
            allowed &= ~self.is_pitched_pitch | c.in_register(s.instrument, self.pitch_of)
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
        states = s.grammar.tolist()  # read once: which checks and bonuses this step needs
        follows = self._follows(states)
        allowed = self._allowed(s, c, states, follows)
        every_row_allowed = _check_choices(allowed, s, self.END)
        logits = out.logits["next_token"]
        # Each adjustment below changes nothing when no row needs it (most steps): skipped then.
        if "EOS" in follows:
            in_last_bar = (s.bars >= c.target_bars) & allowed[:, self.eos_id]
            if bool(in_last_bar.any()):
                logits = bar_line_ends_piece(logits, in_last_bar, self.bar_id, self.eos_id)
        # Steering and the pitch bonuses move only the logits of Programs and Pitches, which
        # the mask removes where the grammar state does not lead to them.
        steered = sampling.steer and c.targets is not None
        if steered and "Program" in follows:  # some row may start a note
            bonus = s.steering(c.targets, sampling.steer)[:, self.instrument_of]
            logits = logits + torch.where(self.is_program, bonus, 0.0)
        if sampling.groove and "PitchDrum" in follows:  # some row draws a kit piece
            logits = logits + sampling.groove * s.groove(
                self.pitch_of.clamp(0, 127), self.is_drum_pitch
            )
        pitched = sampling.recall or sampling.loop or c.pitch_prior is not None
        if pitched and "Pitch" in follows:  # some row draws a pitch: recall, loops, register
            pitch = self.pitch_of.clamp(0, 127)
            if sampling.recall:
                recent = s.recent_pitches(s.instrument)[:, pitch] & self.is_pitched_pitch
                logits = logits + sampling.recall * recent
            if sampling.loop:
                here = s.pitches_here(s.instrument)[:, pitch] & self.is_pitched_pitch
                logits = logits + sampling.loop * here
            if c.pitch_prior is not None:
                prior = c.pitch_prior[s.instrument][:, pitch]
                logits = logits + sampling.register * torch.where(self.is_pitched_pitch, prior, 0)
        # Each row's temperature is that of the field its state draws next (pitch, velocity,
        # duration, or the temperature itself); one number at batch 1, or when every state
        # draws at the same one (no field temperature given): sample's scalar path.
        table, values = self._field_temperatures(sampling)
        temperature = values[states[0]] if table is None or len(states) == 1 else table[s.grammar]
        return sample(
            logits, allowed, temperature, sampling.top_k, sampling.top_p, gen, every_row_allowed
        )

    def _field_temperatures(self, sampling: Sampling) -> tuple[torch.Tensor | None, list[float]]:
        """The temperature of the token drawn after each grammar state, as a tensor (None when
        every state has the same) and a list; made once per ``Sampling`` (a decode passes the
        same one every step)."""
        cached = self._temperatures  # read once: a concurrent decode may replace it
        if cached is None or cached[0] is not sampling:
            # A state followed by one kind of token only draws that field (FOLLOWS says which).
            values = [
                sampling.of(NOTE_FIELDS[kinds[0]])
                if len(kinds) == 1 and kinds[0] in NOTE_FIELDS
                else sampling.temperature
                for _, kinds in sorted(self.FOLLOWS.items())
            ]
            table = torch.tensor(values, device=self.ids.device) if len(set(values)) > 1 else None
            cached = (sampling, table, values)
            self._temperatures = cached
        return cached[1], cached[2]

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
        flags = self.token_flags[tokens]
        # Which kinds of token some row wrote, and whether some row goes on, in one sync: an
        # update no row needs is skipped (a Velocity or a Duration, half the tokens of a note,
        # changes the grammar state only).
        bar, position, program, timesig, tempo, pitch, _, going_on = flags.any(0).tolist()
        columns = flags.unbind(-1)
        is_bar, is_position, is_program, is_timesig, is_tempo, is_pitch, on_track, _ = columns
        values = self.token_values[tokens].unbind(-1)
        position_value, bar_positions, instrument, pitch_value, next_state = values
        if bar:
            s.bars += is_bar
        if bar or position:
            s.position = torch.where(
                is_bar, -1, torch.where(is_position, position_value, s.position)
            )
            s.new_onset(is_bar | is_position)
        if timesig:
            s.positions_per_bar = torch.where(is_timesig, bar_positions, s.positions_per_bar)
        if tempo:
            s.tempo = torch.where(is_tempo, tokens, s.tempo)
        if program:
            s.instrument = torch.where(is_program, instrument, s.instrument)
            s.mark_played(s.instrument, is_program)
        if pitch:
            s.start_notes(s.instrument, pitch_value, is_pitch)
        s.grammar = next_state
        s.finished = not going_on
        return torch.where(on_track, s.instrument, GLOBAL_TRACK)

    def padding(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.pad_id, dtype=torch.long, device=device)
