"""The grammar interface both tokenizations implement, and the checker of generated ids."""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import torch

from ..instruments import GLOBAL_TRACK
from ..model import ModelOutput
from ..tokenizer import PolyTokenizer
from .common import N_TRACK_COLUMNS
from .cpword import CPWordGrammar
from .remi import RemiGrammar
from .sampling import Sampling
from .state import Constraints, ExistingStream, RowState


class Grammar(Protocol):
    """A state machine over one tokenization's tokens, per row of a batch (``RowState``).

    ``RemiGrammar`` (remi.py) and ``CPWordGrammar`` (cpword.py) implement it with boolean masks
    looked up in tables built once per tokenizer; the decode loop and the checker below use
    only these members.
    """

    START: ClassVar[int]  # the grammar state of a row before its first body token
    END: ClassVar[int]  # after EOS
    NOTE_COST: ClassVar[int]  # tokens one note takes (budget checks)
    HEADS: ClassVar[tuple[str, ...]]  # the model heads ``choose`` reads at every step
    positions: int  # the most positions a bar can have (RowState.start, for loops)

    def bar_of(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` (body tokens) are bar lines."""

    def existing_stream(self, body: np.ndarray, device) -> ExistingStream:
        """An arranged piece's tokens, ready to be forced in time order."""

    def choose(
        self, out: ModelOutput, model, s: RowState, c: Constraints, sampling: Sampling, gen
    ) -> torch.Tensor:
        """The next token of every row: the model's logits masked by the grammar, the request
        and (arrangement) the existing piece, then sampled."""

    def violation(self, s: RowState, token: torch.Tensor, c: Constraints) -> str | None:
        """Why ``token`` may not follow row 0's state, or None."""

    def advance(self, s: RowState, tokens: torch.Tensor, c: Constraints) -> torch.Tensor:
        """Move every row past its token (``s.finished`` once every row has ended); returns the
        tokens' track ids."""

    def padding(self, batch: int, device) -> torch.Tensor:
        """A token that fills a finished row's slot."""


def grammar_for(tokenizer: PolyTokenizer, device) -> Grammar:
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
