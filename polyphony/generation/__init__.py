"""Generation: an instrument list, a prompt or a MIDI file to arrange in; a valid MIDI file out.

Three modes share one decoding loop (``decode.py``):

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

The package reads like gpt-fast's ``generate.py`` ladder, one concern a module:

* ``sampling``: logits -> probabilities -> a token (per field for CPWord);
* ``grammar`` (the interface), ``remi`` and ``cpword``: legal next tokens as masks;
  ``state``: what each row has written and what the request demands;
* ``decode``: prefill, decode one token, decode n, the context refill;
* ``plan``: requests -> plans; ``loading``: a trained model ready to generate;
* ``output``: ids -> a validated Score -> MIDI; ``api``: :func:`generate`.
"""

from .api import generate, sample_tokens
from .common import (
    DEFAULT_CHECKPOINT,
    DEFAULT_GROOVE,
    DEFAULT_LOOP,
    DEFAULT_RECALL,
    DEFAULT_REGISTER,
    DEFAULT_STEER,
    DEFAULT_TOP_P,
    GenerationError,
)
from .cpword import CPWordGrammar
from .decode import compile_decoder
from .grammar import Grammar, grammar_for, grammar_violations
from .loading import Checkpoint, load_checkpoint
from .output import midi_bytes, output_paths, to_score, validate_score, write_midi
from .plan import make_plan, resolve_instruments
from .remi import RemiGrammar
from .sampling import Sampling, bar_line_ends_piece, parse_field_temperature
from .state import RowState

__all__ = [
    "CPWordGrammar",
    "Checkpoint",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_GROOVE",
    "DEFAULT_LOOP",
    "DEFAULT_RECALL",
    "DEFAULT_REGISTER",
    "DEFAULT_STEER",
    "DEFAULT_TOP_P",
    "GenerationError",
    "Grammar",
    "RemiGrammar",
    "RowState",
    "Sampling",
    "bar_line_ends_piece",
    "compile_decoder",
    "generate",
    "grammar_for",
    "grammar_violations",
    "load_checkpoint",
    "make_plan",
    "midi_bytes",
    "output_paths",
    "parse_field_temperature",
    "resolve_instruments",
    "sample_tokens",
    "to_score",
    "validate_score",
    "write_midi",
]
