"""The CPWord grammar: legal compounds, field by field, as masks from per-tokenizer tables."""

from __future__ import annotations

import numpy as np
import torch

from ..config import CPWORD_FIELDS
from ..instruments import DRUMS, GLOBAL_TRACK
from ..instruments import program_to_instrument as _instrument
from ..model import ModelOutput
from ..tokenizer import (
    PolyTokenizer,
)
from .common import FIELD
from .sampling import Sampling, sample, sample_fields
from .state import (
    Budget,
    Constraints,
    ExistingStream,
    RowState,
    _check_choices,
    _one_hot,
    positions_per_bar,
)


class CPWordGrammar:
    """Grammar of CPWord compounds: a Metric compound is a Bar (with its meter) or a Position
    (with its tempo), a Note compound has a pitch, velocity, duration and program.

    ``Bar [Position Note+ ...]* ... EOS``: positions strictly increase within a bar; a drum note's
    pitch is a PitchDrum value, any other note's a Pitch value; unused fields are ``Ignore``.
    """

    START, BAR, POSITION, NOTE, END = range(5)
    NOTE_COST = 1  # compounds per note
    HEADS = ("family",)  # then field_logits, given the family drawn

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
        self.positions = int(self.position_value.max()) + 1  # the most a bar can have
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
        excused = col(b.closing & ~b.complete) & b.missing[:, self.instrument_of]
        if c.entries_unordered:
            excused |= ~s.played[:, self.instrument_of]
        program_ok &= (self.instrument_of >= col(last)) | excused
        program_ok &= (
            highest[:, self.instrument_of] < c.highest_start(self.top_pitch)[self.instrument_of]
        )
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

    def pitch_mask(self, s: RowState, program: torch.Tensor, c: Constraints) -> torch.Tensor:
        """PitchDrum values for a drum note, Pitch values in its register for any other; above
        the pitches the instrument already started at this position (the training order; never
        a pitch twice)."""
        instrument = self.instrument_of[program]
        # Empty only where the model drew an arranged piece's note whose chord here has passed
        # the register: sample() draws id 0 and the existing compound is written as it is.
        pitched = self.is_pitch & c.in_register(instrument, self.pitch_of)
        kind = torch.where((instrument == DRUMS)[:, None], self.is_drum_pitch, pitched)
        _, highest = s.onset_order()
        return kind & (self.pitch_of > highest[s.rows, instrument][:, None])

    def choose(self, out: ModelOutput, model, s: RowState, c: Constraints, sampling: Sampling, gen):
        """Sample the family, then the fields given it (the model conditions fields on the
        family); the pitch last, as its legal values depend on the program."""
        family_mask, position_mask, program_mask = self.masks(s, c)
        every_row_allowed = _check_choices(family_mask, s, self.END)
        family = sample(
            out.logits["family"], family_mask, sampling.of("family"), sampling.top_k,
            sampling.top_p, gen, every_row_allowed,
        )  # fmt: skip
        fields = model.field_logits(out.hidden, family)
        if sampling.steer and c.targets is not None:
            bonus = s.steering(c.targets, sampling.steer)[:, self.instrument_of]
            fields["program"] = fields["program"] + bonus  # 0 for non-program values
        masks = {"position": position_mask, "program": program_mask, **self.value_masks(s, c)}
        values = sample_fields({name: fields[name] for name in masks}, masks, sampling, gen)
        # Phrase recall and the register; drum notes draw PitchDrum values, which get neither
        # but their groove.
        instrument, pitch = self.instrument_of[values["program"]], self.pitch_of.clamp(0, 127)
        if sampling.groove:
            fields["pitch"] = fields["pitch"] + sampling.groove * s.groove(
                pitch, self.is_drum_pitch
            )
        if sampling.recall:
            bonus = s.recent_pitches(instrument)[:, pitch] & self.is_pitch
            fields["pitch"] = fields["pitch"] + sampling.recall * bonus
        if sampling.loop:
            bonus = s.pitches_here(instrument)[:, pitch] & self.is_pitch
            fields["pitch"] = fields["pitch"] + sampling.loop * bonus
        if c.pitch_prior is not None:
            prior = torch.where(self.is_pitch, c.pitch_prior[instrument][:, pitch], 0)
            fields["pitch"] = fields["pitch"] + sampling.register * prior
        values.update(
            sample_fields(
                {"pitch": fields["pitch"]},
                {"pitch": self.pitch_mask(s, values["program"], c)},
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
        masks = {**self.value_masks(s, c), "pitch": self.pitch_mask(s, token[None, 5], c)}
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
        ended = (family == self.eos_id) | (family == self.pad_id)
        # Onsets move and notes start only in some steps: one sync says whether any row does,
        # and whether any row goes on.
        metric, note, going_on = torch.stack((is_metric, is_note, ~ended)).any(-1).tolist()
        if metric:
            s.new_onset(is_metric)
        if note:
            s.mark_played(instrument, is_note)
            s.start_notes(instrument, self.pitch_of[tokens[:, 2]], is_note)
        s.grammar = torch.where(
            ended, self.END,
            torch.where(is_bar, self.BAR, torch.where(is_position, self.POSITION,
                        torch.where(is_note, self.NOTE, s.grammar))),
        )  # fmt: skip
        s.finished = not going_on
        return instrument

    def padding(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch, len(CPWORD_FIELDS)), self.pad_id, dtype=torch.long, device=device)
