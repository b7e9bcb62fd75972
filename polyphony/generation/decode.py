"""The decode loop: prefill, decode one token per step for every row, refill a full context."""

from __future__ import annotations

import functools
import itertools
import time
import warnings

import numpy as np
import torch
import torch._inductor.config as inductor_config
from tqdm import tqdm

from ..instruments import GLOBAL_TRACK
from ..model import ModelOutput, PolyphonyGPT
from .common import CONTEXT_KEPT, GenerationError
from .grammar import Grammar
from .plan import Plan
from .sampling import Sampling
from .state import Constraints, RowState

# Every compiled decoder shares Dynamo's caches (_tensor_and_weight_guards), whose entries Dynamo
# caps (``recompile_limit``, 8; past it a fullgraph compile fails): a model traces graphs for the
# batch sizes and cache lengths it decodes, so the cap grows with each new one.
_SHAPES_TRACED = itertools.count(1)


class CachedContext:
    """``prefill`` a right-padded batch of windows, then one ``decode_step`` per token."""

    def __init__(self, model: PolyphonyGPT, batch: int, heads: tuple[str, ...]):
        self.model, self.heads = model, heads
        model.setup_cache(batch, model.config.max_seq_len)

    def start(self, ids, tracks, lengths) -> ModelOutput:
        return self.model.prefill(ids, tracks, lengths, self.heads)

    def step(self, tokens, tracks) -> ModelOutput:
        return self.model.decode_step(tokens, tracks, self.heads)


class FullForwardContext:
    """The same windows recomputed with a full forward per token: slow, the cache's reference."""

    def __init__(self, model: PolyphonyGPT, batch: int, heads: tuple[str, ...]):
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


def _after_prompt(
    grammar: Grammar,
    plan: Plan,
    constraints: Constraints,
    batch: int,
    device,
    check_time=None,
    loops: bool = False,
) -> RowState:
    """Every row's state once ``plan``'s prompt is read: what it played is known, and the new
    material (its tokens, notes and bars, which steering counts) starts from zero. ``loops``:
    also where in the bar each pitch was begun (Sampling.loop and Sampling.groove)."""
    state = RowState.start(batch, grammar.START, device, grammar.positions if loops else 0)
    replay = Constraints(constraints.allowed, constraints.required, constraints.target_bars, 0)
    for index, token in enumerate(torch.as_tensor(plan.prompt_body, device=device)):
        grammar.advance(state, token.expand(batch, *token.shape), replay)
        if check_time is not None and index % 256 == 0:
            check_time()
    state.new_tokens.zero_()
    state.notes.zero_()
    # A prompt that ends on a bar line (continuation, infilling) has opened the first new bar:
    # counted as a prompt bar, it held every part's target a bar behind (7/8 of it over 8 bars).
    opened = len(plan.prompt_body) > 0 and bool(grammar.bar_of(plan.prompt_body[-1:]).all())
    state.first_bar.copy_(state.bars - int(opened))
    if plan.infill is not None:
        # The prompt ends on the region's bar line, which is the piece's: its meter follows as
        # an existing token. Parts must play in the region, whatever the prefix held; the
        # tempo in force is the piece's, wherever the shown prefix begins.
        state.after_existing.fill_(True)
        state.played.zero_()
        state.tempo.fill_(plan.infill.tempo)
    elif constraints.existing is not None:
        state.tempo.fill_(constraints.existing.initial_tempo)
    return state


@torch.inference_mode()
def _decode(
    model: PolyphonyGPT,
    grammar: Grammar,
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
    prompt = np.concatenate(
        [plan.header, plan.prompt_body if plan.context is None else plan.context]
    )
    prompt_tracks = grammar.tokenizer.track_ids(prompt)
    state = _after_prompt(
        grammar,
        plan,
        constraints,
        batch,
        device,
        check_time,
        loops=sampling.loop > 0 or sampling.groove > 0,
    )

    ids = torch.as_tensor(prompt, device=device).expand(batch, *prompt.shape).clone()
    tracks = torch.as_tensor(prompt_tracks, device=device).expand(batch, -1).clone()
    capacity = model.config.max_seq_len
    keep = int(capacity * CONTEXT_KEPT)
    context = (CachedContext if use_cache else FullForwardContext)(model, batch, grammar.HEADS)
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
        if state.finished:
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


def compile_decoder(model: PolyphonyGPT) -> None:
    """torch.compile the model's decode step (``PolyphonyGPT._decode_one``: embedding, blocks,
    final norm and heads, gpt-fast's ``decode_one_token``) as one graph, once. The number of keys
    grows every step and is symbolic (``dynamic=True``), so one graph serves every step of a
    batch size (one for a single row, one for any more); attention still reads only the keys
    written. The graph computes every head and a step returns the ones asked for: one graph
    whatever heads a caller asks for, and the output projection runs in inductor's GEMM kernel
    rather than an eager call (at batch 1 an eager 192 x 632 product took ~25 us of a ~1 ms
    step). Prefill stays eager (once per window).

    Only the guards on tensors (shapes, dtypes, devices: a new batch size or cache length
    traces again) and on a weight's identity are kept (``_tensor_and_weight_guards``).
    Dynamo's other guards re-check the model's modules and attributes before every call,
    145-168 us of a ~1.7 ms step (benchmarks/decode_step.py); nothing they check changes
    between calls, because ``_decode_one`` takes tensors, the KV caches and one int only and
    the model's modules are fixed once loaded. The test ``test_compiled_decode_step_matches_eager_and_never_recompiles``
    holds it to the eager step across ragged rows, heads and cache sizes.

    The weights are frozen into the graph (inductor's ``freezing``: later changes to them are
    not seen, so compile a model once it is trained), which lets inductor's C++ GEMM template
    compete with MKL for every matrix product; at one row its packed micro-kernel wins by
    several times (a batch-1 step 6.3x faster than eager, docs/benchmarks.md). The choice is
    timed once per shape at compile time and cached on disk with the rest of inductor's cache."""
    if not getattr(model, "_decoder_compiled", False):
        eager = model._decode_one

        def rows(*args):
            return eager(*args, heads=None)

        # One row and several rows trace graphs of their own (a size of 1 is never symbolic), and
        # they are two functions so that Dynamo looks them up in two caches. In one, the graph
        # traced for several rows took every later one-row step: the tensor guards kept accept
        # any batch there (the guard that says "2 rows or more" is among those dropped), and it
        # took up to twice as long for a row (docs/benchmarks.md, 2026-12-05 22:33).
        one_row = _compiled(functools.partial(eager, heads=None))
        many_rows = _compiled(rows)
        shapes = set()  # (batch size, cache length) this model has decoded

        def decode_one(*args, heads=None):
            input_ids, rotary_cos = args[0], args[5]  # PolyphonyGPT._decode_one's arguments
            if (len(input_ids), len(rotary_cos)) not in shapes:
                shapes.add((len(input_ids), len(rotary_cos)))
                limit = torch._dynamo.config.recompile_limit
                torch._dynamo.config.recompile_limit = max(limit, next(_SHAPES_TRACED))
            compiled = one_row if len(input_ids) == 1 else many_rows
            # Dynamo must see ``freezing`` while it traces (it then keeps the weights out of
            # the graph's inputs), and a call may trace (a new batch or cache size): set for
            # every call, ~4 us, restored after.
            before = inductor_config.freezing
            inductor_config.freezing = True
            try:
                hidden, logits = compiled(*args)
            finally:
                inductor_config.freezing = before
            if heads is not None:
                logits = {name: logits[name] for name in heads if name in logits}
            return hidden, logits

        model._decode_one = decode_one
        model._decoder_compiled = True


def _compiled(function):
    return torch.compile(
        function, backend=_inductor_frozen, fullgraph=True, dynamic=True,
        options={"guard_filter_fn": _tensor_and_weight_guards},
    )  # fmt: skip


def _tensor_and_weight_guards(entries) -> list[bool]:
    """The guards on tensors, and on which model a graph was traced with. Every compiled decoder
    shares Dynamo's caches (torch.compile wraps each ``functools.partial`` in the same function,
    and every model's ``rows`` is one function too) and a graph holds its model's weights frozen
    in: without a guard on them a second model of the same shape ran the first one's graph, and
    its weights. One weight's identity tells the models apart (every weight's cost 14 us a step,
    one weight's 2: benchmarks/decode_step.py's guard check)."""
    keep = torch.compiler.keep_tensor_guards_unsafe(entries)
    for index, entry in enumerate(entries):
        if entry.guard_type == "ID_MATCH" and isinstance(entry.value, torch.nn.Parameter):
            keep[index] = True
            break
    return keep


def _inductor_frozen(graph, example_inputs):
    """Inductor with the C++ GEMM template timed against MKL for every matrix product."""
    from torch._inductor import compile_fx

    with (
        warnings.catch_warnings(),
        inductor_config.patch(
            freezing=True,
            max_autotune_gemm=True,
            max_autotune_gemm_backends="CPP,ATEN",
            autotune_num_choices_displayed=0,  # the timing tables are not for users
            max_autotune_report_choices_stats=False,
        ),
    ):
        # torch's own autotuner calls the deprecated tensor.storage(); not the user's concern.
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return compile_fx.compile_fx(graph, example_inputs)
