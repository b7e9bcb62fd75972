"""generate(): the one call behind polyphony.generate and generate.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from symusic import Score

from .common import (
    CONTEXT_KEPT,
    DEFAULT_GROOVE,
    DEFAULT_LOOP,
    DEFAULT_RECALL,
    DEFAULT_REGISTER,
    DEFAULT_STEER,
    DEFAULT_TOP_P,
    GenerationError,
)
from .decode import _decode, compile_decoder
from .grammar import grammar_for
from .infill import parse_bars, plan_infill
from .loading import Checkpoint, load_checkpoint
from .output import to_score
from .plan import Plan, check_request, make_plan, register_tables, resolve_instruments
from .sampling import Sampling, parse_field_temperature

log = logging.getLogger(__name__)


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
    if sampling.register:
        tables = register_tables(checkpoint.densities, tokenizer, plan.given(), checkpoint.device)
        constraints.registers, constraints.pitch_prior = tables
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
    infill: str | Path | Score | None = None,
    infill_bars: str | tuple[int, int] | None = None,
    tracks: str | Iterable[str | int] | None = None,
    tempo: float | None = None,
    time_signature: str | None = None,
    density: str | dict | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = DEFAULT_TOP_P,
    field_temperature: dict[str, float] | str | None = None,
    steer: float = DEFAULT_STEER,
    recall: float = DEFAULT_RECALL,
    register: float = DEFAULT_REGISTER,
    loop: float = DEFAULT_LOOP,
    groove: float = DEFAULT_GROOVE,
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
    * ``generate(infill="in.mid", infill_bars=(9, 12), tracks="bass, drums")``: write bars 9-12
      of the bass and drums again, with the music before and after in view; everything else is
      kept (after the tokenizer's quantisation). ``tracks`` defaults to all of them; one the
      piece lacks gets a part in those bars only.

    ``density`` sets how much parts play: ``"bass=4, drums=12, piano=dense"`` (notes per bar,
    or sparse/medium/dense = the instrument's quartiles in the training data). Unnamed parts
    play at their median in the training data; a prompt's or arranged piece's tracks as they
    play there (densities.py). ``steer`` pulls each part toward its density, ``recall`` its
    pitches toward those it began in its last bars, ``loop`` toward those it began at the same
    position of one of them (riffs; 0: off), ``groove`` the drums toward the kit pieces they played
    there (0: off), ``register`` toward its instrument's register in the
    training data, or a user's track's own, and never past it (0: anywhere); see
    docs/generation.md.

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
    check_request(
        instruments, bars, prompt, prompt_bars, arrange, add, tempo, time_signature, infill,
        infill_bars, tracks,
    )  # fmt: skip
    instruments = None if instruments is None else resolve_instruments(instruments)
    add = None if add is None else resolve_instruments(add)
    tracks = None if tracks is None else resolve_instruments(tracks)
    infill_bars = None if infill_bars is None else parse_bars(infill_bars)
    loaded = (
        checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device)
    )
    sampling = Sampling(
        temperature, top_k, top_p, dict(field_temperature or {}), steer, recall, register, loop,
        groove,
    )  # fmt: skip
    sampling.check(loaded.tokenizer.kind)  # before the seed is logged: a bad value is one line
    if infill is not None:
        plan = plan_infill(
            loaded.tokenizer, grammar_for(loaded.tokenizer, "cpu"), loaded.densities, infill,
            infill_bars, tracks, max_tokens, density, loaded.model.config.max_seq_len,
        )  # fmt: skip
    else:
        plan = make_plan(
            loaded.tokenizer, loaded.densities, instruments=instruments, bars=bars,
            prompt=prompt, prompt_bars=prompt_bars, arrange=arrange, add=add, tempo=tempo,
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
