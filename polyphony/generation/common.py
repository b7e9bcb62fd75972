"""Shared by the generation modules: the error type, the defaults and the limits of one request."""

from __future__ import annotations

from pathlib import Path

from ..config import CPWORD_FIELDS
from ..instruments import GLOBAL_TRACK

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "polyphony-mini"
DEFAULT_BARS = 16
# Density steering (Sampling.steer), chosen on 135 held-out band requests (docs/generation.md):
# 4.5 brought thin parts to real + 1.2 points (3: +5.7) with every family it met within 35 %,
# when the pull was capped at it; uncapped (2026-12-04) no requested part stays thin.
DEFAULT_STEER = 4.5
# A part that has played more than the bars it has begun ask for is held back twice as fast as
# a lagging part is pulled forward (RowState.steering): otherwise it front-loads the piece and
# then rests (docs/generation.md, "Steering").
AHEAD_SCALE = 0.5
# Nucleus sampling, cutting only the last 2 % of each draw: at 0.95 a quarter of the basses sat
# on one pitch for 16 bars (the held-out band basses: 12 %), since a part's next pitch is most
# often the one it just played and every cut of the alternatives makes it likelier. On 135
# held-out band requests 0.95 -> 0.98: pedal parts 9.9 -> 5.6 % (real 6.9 %), bass 24 -> 11 %,
# every pitch metric within 5.2 % of real (docs/generation.md, "Top-p and pedal parts").
DEFAULT_TOP_P = 0.98
# Register (Sampling.register): the log-density of a Gaussian over an instrument's pitches in the
# training data, at this weight, added to its pitch logits (docs/generation.md, "Registers").
DEFAULT_REGISTER = 1.0
# Phrase recall (Sampling.recall) favours the pitches a part began in its last RECALL_BARS bars and
# the current one: one phrase of band music, which comes back where generated parts wander. 0.3
# on 135 held-out band requests: bass recurrence 0.28 -> 0.33, pitch-class entropy +2.5 -> -4.7 %
# of real; 0.5 put an infilled region's entropy at -11 % (docs/generation.md, "Phrase recall").
RECALL_BARS = 4
DEFAULT_RECALL = 0.3
# Loops (Sampling.loop) are off by default: every setting that brings band parts to real
# recurrence takes more than 10 % of their pitch-class entropy (docs/generation.md, "Loops").
DEFAULT_LOOP = 0.0
# Grooves (Sampling.groove): the drums favour the kit pieces they played in their last RECALL_BARS
# bars, and again those they played at this position of one of them. Left alone, a continued
# drum part keeps 0.41 of the prompt's hits (kit piece and 16th) where real ones keep 0.80
# (docs/generation.md, "Grooves").
DEFAULT_GROOVE = 3.0
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
