"""Requests -> plans: the header, the prompt, the instruments allowed and required, the budget."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from symusic import Score

from ..config import DataConfig
from ..data.midi_input import MidiInputError, limit_problem, load_midi
from ..densities import DensityError, DensityStats, bins, parse_density, resolve
from ..instruments import DRUMS, instrument_name, parse_instruments
from ..instruments import program_to_instrument as _instrument
from ..metrics import bar_lines
from ..tokenizer import (
    PolyTokenizer,
    TokenizationError,
)
from .common import (
    CLOSING_TOKENS,
    DEFAULT_BARS,
    FIELD,
    MAX_BARS,
    MAX_INPUT_TOKENS,
    MAX_PITCHED_INSTRUMENTS,
    N_TRACK_COLUMNS,
    TOKENS_PER_BAR_PER_INSTRUMENT,
    GenerationError,
)
from .grammar import grammar_for
from .state import Constraints

log = logging.getLogger(__name__)


@dataclass
class Infill:
    """An infilling request: the bars regenerated and what surrounds them, whole (the output
    puts them back around the new bars as they are)."""

    bars: tuple[int, int]  # first and last bar regenerated, 1-based, inclusive
    tracks: list[int]  # instruments regenerated (the others' notes in those bars are forced)
    prefix: np.ndarray  # body tokens before the bars
    suffix: np.ndarray  # body tokens after them
    tempo: int  # the Tempo token in force where the bars begin (-1: none before them)


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
    # What the model reads after the header where it differs from prompt_body (infilling: the
    # prefix, MASK, the suffix, SEP, then the bar line the grammar replays after the prefix).
    context: np.ndarray | None = None
    infill: Infill | None = None

    def given(self) -> np.ndarray:
        """The user's tokens the plan holds: a prompt's bars, an arranged piece, or the music
        around an infilled region (empty for a new piece)."""
        if self.infill is not None:
            return np.concatenate([self.infill.prefix, self.infill.suffix, self.existing])
        if self.existing is not None:
            return np.concatenate([self.prompt_body, self.existing])
        return self.prompt_body

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


# A user's track with at least this many notes sets its own register (register_tables).
GIVEN_NOTES = 8
# The narrowest Gaussian a user's track sets (semitones): a part that repeated one note in the
# prompt may still move (register_tables).
MIN_GIVEN_SPREAD = 3.0


def register_tables(
    stats: DensityStats, tokenizer: PolyTokenizer, given: np.ndarray, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constraints.registers and .pitch_prior from each instrument's register in the training
    data (its family's; none for drums and statistics from before registers: any pitch, 0).
    A track of the user's (``given``, Plan.given) with GIVEN_NOTES notes or more keeps playing
    where it plays there, as its density is measured there: the prior is its own notes'
    Gaussian (mean, spread at least MIN_GIVEN_SPREAD) and the bounds take in its notes (a guitar
    solo an octave above the training data's guitars goes on up there)."""
    pitches, tracks = tokenizer.note_pitches(given), tokenizer.track_ids(given)
    bounds = torch.tensor([[0, 127]] * N_TRACK_COLUMNS)
    prior = torch.zeros(N_TRACK_COLUMNS, 128)
    known, ranges, means, spreads = [], [], [], []
    for instrument in range(128):
        register = stats.register(instrument)
        if register is None:
            continue
        low, high, mean, spread = register
        played = pitches[(tracks == instrument) & (pitches >= 0)]
        if len(played) >= GIVEN_NOTES:
            low, high, mean = min(low, played.min()), max(high, played.max()), played.mean()
            spread = max(float(played.std()), MIN_GIVEN_SPREAD)
        known.append(instrument)
        ranges.append([int(low), int(high)])
        means.append(float(mean))
        spreads.append(max(float(spread), 1.0))
    if known:  # every instrument's row at once: a loop of tensor operations took ~9 ms a request
        bounds[known] = torch.tensor(ranges)
        mean, spread = torch.tensor(means)[:, None], torch.tensor(spreads)[:, None]
        prior[known] = -0.5 * ((torch.arange(128) - mean) / spread) ** 2
    return bounds.to(device), prior.to(device)


def plan_instruments(
    tokenizer, grammar, stats, instruments, bars, tempo, time_signature, max_tokens, density
) -> Plan:
    order = resolve_instruments(instruments)
    densities = _densities(stats, order, density)
    bars = DEFAULT_BARS if bars is None else bars
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


def check_request(
    instruments, bars, prompt, prompt_bars, arrange, add, tempo, time_signature,
    infill=None, infill_bars=None, tracks=None,
) -> None:  # fmt: skip
    """Refuse combinations of options that do not make one request (before any model loads)."""
    if infill is not None:
        others = {"--instruments": instruments, "--bars": bars, "--prompt": prompt,
                  "--arrange": arrange, "--tempo": tempo, "--time-signature": time_signature}  # fmt: skip
        given = [option for option, value in others.items() if value is not None]
        if given:
            raise GenerationError(
                f"--infill keeps the piece's length, instruments and tempo: drop {', '.join(given)}"
                " (name the tracks to regenerate with --tracks)"
            )
        if infill_bars is None:
            raise GenerationError("--infill needs --infill-bars: the bars to regenerate, e.g. 9-12")
        return
    if infill_bars is not None or tracks is not None:
        raise GenerationError("--infill-bars and --tracks go with --infill FILE")
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
    if bars is not None and bars < 1:
        raise GenerationError(f"--bars {bars}: must be at least 1")
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
