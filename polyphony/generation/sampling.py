"""Logits -> probabilities -> a sampled token: temperature, top-k, top-p, per CPWord field."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CPWORD_FIELDS
from .common import (
    DEFAULT_GROOVE,
    DEFAULT_LOOP,
    DEFAULT_RECALL,
    DEFAULT_REGISTER,
    DEFAULT_STEER,
    DEFAULT_TOP_P,
    GenerationError,
)

# The fields a REMI step can be given a temperature of: the only steps that draw one kind of
# token (after a Program, a Pitch; after it, a Velocity; then a Duration).
REMI_FIELDS = ("pitch", "velocity", "duration")


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the (masked) logits.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1.0 are off. ``field_temperature``
    sets the temperature of a field (``{"pitch": 0.9, "duration": 0.8}``): CPWord models draw
    each field of a compound separately; REMI models draw a note's pitch, velocity and duration
    as tokens of their own, so those three steps take their field's temperature. A field not
    given is drawn at ``temperature`` (docs/generation.md, "Pitch temperature").
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    field_temperature: dict[str, float] = field(default_factory=dict)
    # Nats on an instrument's Program logit per (2 + its target) notes it lags (RowState.steering)
    steer: float = DEFAULT_STEER
    recall: float = DEFAULT_RECALL  # nats on the pitches a part began in its last bars (0 = off)
    # Nats per squared standard deviation (halved) a pitch lies from its part's mean pitch (the
    # instrument's in the training data, or a user's track's own); > 0 also keeps notes inside
    # the register's bounds (0 = off; plan.register_tables).
    register: float = DEFAULT_REGISTER
    # Nats on the pitches a part began at this position of one of its last RECALL_BARS bars: a
    # riff's note comes back where it was (0 = off; docs/generation.md, "Loops").
    loop: float = DEFAULT_LOOP
    # Nats on the kit pieces the drums played in their last RECALL_BARS bars, and as many again
    # on those they played at this position of one of them: a groove holds (0 = off;
    # docs/generation.md, "Grooves"). Recall, loops and registers leave the kit alone.
    groove: float = DEFAULT_GROOVE

    def check(self, tokenization: str) -> Sampling:
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if not 0 <= self.steer <= 20:
            raise GenerationError(f"steer={self.steer}: must be in 0..20 (nats; 0 = off)")
        if not 0 <= self.recall <= 20:
            raise GenerationError(f"recall={self.recall}: must be in 0..20 (nats; 0 = off)")
        if not 0 <= self.register <= 20:
            raise GenerationError(f"register={self.register}: must be in 0..20 (0 = off)")
        if not 0 <= self.loop <= 20:
            raise GenerationError(f"loop={self.loop}: must be in 0..20 (nats; 0 = off)")
        if not 0 <= self.groove <= 20:
            raise GenerationError(f"groove={self.groove}: must be in 0..20 (nats; 0 = off)")
        fields = CPWORD_FIELDS if tokenization == "cpword" else REMI_FIELDS
        for name, value in self.field_temperature.items():
            if name not in fields:
                raise GenerationError(
                    f"unknown field {name!r} in field temperatures: this {tokenization.upper()} "
                    f"model takes {', '.join(fields)}"
                )
            if value < 0:
                raise GenerationError(f"field temperature {name}={value}: must be >= 0")
        return self

    def of(self, name: str) -> float:
        """The temperature of one field: as given, else ``temperature``."""
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
    every_row_allowed: bool = False,
) -> torch.Tensor:
    """One id per row from ``logits [N, V]`` restricted to ``allowed [N, V]``.

    ``temperature`` is one number or one per row (0 = greedy). Rows with nothing allowed (a
    field a compound does not use this step) get id 0; the grammar checks that every choice a
    row does use has at least one legal id (``every_row_allowed``: it found that every row has
    one, and the fix for empty rows is skipped).
    """
    logits = torch.where(allowed, logits.float(), float("-inf"))
    if not every_row_allowed:
        logits[:, :1].masked_fill_(~allowed.any(-1, keepdim=True), 0.0)
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and temperature == 0:
        return logits.argmax(-1)
    greedy = logits.argmax(-1) if per_row else None
    if per_row:
        logits = logits / temperature.clamp(min=1e-6)[:, None]
    elif temperature != 1:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token when the more likely ones already hold top_p; the first always stays.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    # torch.multinomial(probs, 1) draws exactly this (its one-sample path: argmax of p / q, q ~
    # Exp(1)), after validity checks that cost four reductions and two syncs a step.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    drawn = probs.div_(noise).argmax(-1)
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
