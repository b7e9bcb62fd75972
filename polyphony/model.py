"""The polyphony GPT: token + track embeddings, pre-norm decoder blocks, a KV cache, task heads.

One file in the spirit of nanoGPT's and gpt-fast's ``model.py``. Shapes: B batch, T positions,
D ``d_model``, H query heads, K key/value heads (H when not using grouped-query attention).

* **Tokens.** REMI: one id per position, ``input_ids [B, T]``. CPWord: one compound of 8 fields
  per position, ``input_ids [B, T, 8]`` (family, position, pitch, velocity, duration, program,
  tempo, meter), embedded as the *sum* of one table per field (see ``PolyphonyGPT._embed``).
* **Tracks.** ``track_ids [B, T]`` gives every position the instrument it belongs to (0..127 GM
  programs, 128 drums, 129 global). Its embedding is added at every position, so the model
  always knows which instrument it is writing for (``config.track_embeddings`` turns it off for
  the ablation).
* **Heads.** ``config.heads`` maps head name -> loss weight; the loss is the weighted sum and
  each head's own loss is reported. REMI: ``next_token`` (tied to the token embedding when
  ``config.tie_embeddings``), ``next_instrument`` (track id of the next token), ``next_type``
  (token family of the next token). CPWord: one head per field, the fields after ``family``
  conditioned on the family as in the compound-word transformer (Hsiao et al., 2021); plus an
  optional ``next_instrument``.
* **Generation.** ``setup_cache`` preallocates per-layer key/value buffers, ``prefill`` runs a
  right-padded prompt batch, ``decode_step`` appends one token per row at that row's position.
* **Files.** ``save_pretrained`` / ``from_pretrained``: ``model.safetensors`` + ``config.json``
  (+ ``tokenizer.json``). Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .config import CPWORD_FIELDS, REMI_HEADS, ConfigError, ModelConfig, model_config_from_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IGNORE_INDEX = -100
# Parameter counts the named configs (configs/<name>.yaml) are tuned to, with the REMI
# vocabulary of polyphony's tokenizer; tests/test_model.py keeps each within 10%. tiny is a
# ceiling (CI must train it in seconds), the others are targets.
NAMED_SIZES = {"tiny": 1_000_000, "small": 10_000_000, "base": 85_000_000, "large": 300_000_000}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the one-line message names the file and why."""


@dataclass
class ModelOutput:
    logits: dict[str, torch.Tensor]  # head name -> [B, T, V] (forward) or [B, V] (prefill/decode)
    hidden: torch.Tensor  # final normed hidden states, [B, T, D] or [B, D]
    loss: torch.Tensor | None = None  # weighted sum over heads (forward with labels only)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per head, unweighted


# ----------------------------------------------------------------------------- rotary positions
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin of the rotary angles for absolute ``positions [B|1, T]`` -> ``[B|1, T, 1, hd]``.

    Rotary embeddings (Su et al., 2021) encode position by rotating queries and keys, so that
    attention scores depend only on the *relative* offset. There is no learned table sized to the
    training length: angles are computed from the positions on the fly, so a KV cache and long
    generation can run past ``max_seq_len`` and still see familiar relative distances. Angles are
    always computed in float32 (bf16 positions lose whole steps beyond 256).
    """
    inv_freq = base ** -(
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B|1, T, hd/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [B|1, T, 1, hd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, hd]``; the "rotate half" pairing of GPT-NeoX / LLaMA-HF."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- blocks
class KVCache:
    """Preallocated keys and values of one layer, ``[B, K, max_len, hd]``, written in place.

    Every row writes its next key to the same *slot*, the number of slots in use, whatever its
    own position: a write is a slice copy, not a per-row scatter. Rows of a right-padded prompt
    keep their padding slots, which ``PolyphonyGPT`` masks out; rotary angles carry each row's
    true position, so attention still sees the right relative distances.

    Not a module, and handed to each step as an argument: a cache is scratch space, never part
    of a checkpoint, and the compiled decode step (compile_decoder) freezes what it reads from
    the model's attributes, so a new cache must reach it as an input.
    """

    def __init__(self, batch_size, max_len, n_heads, n_kv_heads, head_dim, device, dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # The compiled step's scaled query (Attention.step), stored so that it is computed once.
        self.query = torch.zeros(batch_size, n_heads, 1, head_dim, device=device, dtype=dtype)

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v [B, K, T, hd]`` at slots ``slot .. slot + T``; return every key and value
        written so far, ``[B, K, slot + T, hd]``."""
        end = slot + k.shape[2]
        self.k[:, :, slot:end] = k
        self.v[:, :, slot:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.d_model // config.n_heads
        # One matmul for queries, keys and values (fewer kernel launches per decode step).
        self.qkv = nn.Linear(
            config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False
        )
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.gqa = self.n_kv_heads != self.n_heads

    def forward(self, x, cos, sin):
        """Causal self-attention over ``x [B, T, D]`` (training, full forward)."""
        q, k, v = self._rotated(self.qkv(x), len(x), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape))

    def step(self, x, cos, sin, cache: KVCache, slot: int, key_mask=None):
        """``forward`` for cached generation (see ``Block.step``) over ``x [B * T, D]``: keys
        and values are written to ``cache`` from ``slot`` on, and attention runs over every
        slot written so far: causally for a prefill (slot 0, T queries, T keys), all of them
        for one decoded token except where ``key_mask [B, 1, 1, slots]`` hides a shorter
        prompt's padding. ``is_causal`` is never used with fewer queries than keys: it aligns
        the mask top-left and would show the query only key 0 (LIBRARY_NOTES §4)."""
        batch = cache.k.shape[0]
        q, k, v = self._rotated(F.linear(x, self.qkv.weight), batch, cos, sin)
        k, v = cache.write(slot, k, v)
        # One query (a decode step): plain operations, which the compiled step fuses into the
        # layer's kernel; the CPU flash kernel took 252 us a call at batch 8 there
        # (benchmarks/decode_step.py --profile, docs/benchmarks.md).
        if q.shape[2] == 1 and not self.gqa and torch.compiler.is_compiling():
            y = _fused_query_attention(q, k, v, key_mask, cache.query)
        elif q.shape[2] == 1 and not self.gqa:
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_mask, is_causal=key_mask is None and q.shape[2] > 1,
                enable_gqa=self.gqa,
            )  # fmt: skip
        return F.linear(y.transpose(1, 2).reshape(x.shape), self.out_proj.weight)

    def _rotated(self, qkv, batch: int, cos, sin):
        """``qkv [B, T, (H + 2K) * hd]`` or ``[B * T, ...]`` -> rotated queries ``[B, H, T, hd]``,
        rotated keys and values ``[B, K, T, hd]``."""
        qkv = qkv.view(batch, -1, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # Rotate queries and keys in one call: they are adjacent heads of the same tensor.
        qk = apply_rotary(qkv[:, :, : self.n_heads + self.n_kv_heads], cos, sin)
        q, k = qk.transpose(1, 2).split((self.n_heads, self.n_kv_heads), dim=1)
        return q, k, qkv[:, :, self.n_heads + self.n_kv_heads :].transpose(1, 2)


def _fused_query_attention(q, k, v, key_mask, query: torch.Tensor) -> torch.Tensor:
    """``Attention.step``'s one-query attention as the compiled step writes it, for the one kernel
    inductor fuses it into. The scaled query goes through ``query`` (the cache's buffer): stored,
    it is computed once, where the kernel rotated and scaled it again for every key. The
    softmax's division comes after the product with the values: once per output, where the
    kernel divided every weight again for each 8 of a value's 48 dimensions. Eager, the plain
    form's fewer calls cost less (the division's four calls: batch 1 1.59 -> 1.78 ms a step)."""
    query.copy_(q * (1.0 / math.sqrt(q.shape[-1])))
    scores = query @ k.transpose(-1, -2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return (weights @ v) / weights.sum(-1, keepdim=True)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer, 2020): lower loss than a GELU MLP at equal size.

    The hidden width is 2/3 of ``mlp_ratio * D`` so the three matrices hold as many parameters as
    GPT-2's two (the named sizes stay comparable to GPT-2 shapes); rounded up to a multiple of 16.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = 16 * math.ceil(2 * config.mlp_ratio * config.d_model / 3 / 16)
        self.gate_up = nn.Linear(config.d_model, 2 * hidden, bias=False)  # gate and up, fused
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.attention = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=1e-5)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def step(self, x, cos, sin, cache: KVCache, slot: int, key_mask=None):
        """``forward`` for cached generation, over the rows ``x [B * T, D]``, in functional calls
        and without dropout: the same arithmetic, but a decode step at batch 1 is ~150 tiny
        ops, and a module call costs as much as one of them (nn.RMSNorm: 22 µs against 15 for
        F.rms_norm), as does each reshape of a 3-d input in F.linear."""
        attended = self.attention.step(
            rms_norm(x, self.attention_norm), cos, sin, cache, slot, key_mask
        )
        x = x + attended
        gate, up = F.linear(rms_norm(x, self.mlp_norm), self.mlp.gate_up.weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.mlp.down.weight)


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """``norm(x)`` without the module call."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100; 0 (not NaN) when a batch has none, which is
    common for sparse CPWord fields such as tempo or meter in a short window."""
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


# ----------------------------------------------------------------------------- the model
class PolyphonyGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.is_cpword = config.tokenization == "cpword"
        d = config.d_model
        self.head_dim = d // config.n_heads

        self.token_embeddings = nn.ModuleList(nn.Embedding(v, d) for v in config.vocab_sizes)
        self.track_embedding = nn.Embedding(config.n_tracks, d) if config.track_embeddings else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)

        self.weights = dict(config.heads)
        sizes = {"next_instrument": config.n_tracks}
        if self.is_cpword:
            sizes.update(zip(CPWORD_FIELDS, config.vocab_sizes, strict=True))
            # concat(hidden, family embedding) -> D: the fields of a compound depend on its
            # family (a Metric compound has a position and maybe tempo/meter, a Note has pitch,
            # velocity, ...). The family table is the input one, as in the compound-word model.
            self.family_condition = nn.Linear(2 * d, d, bias=False)
        else:
            sizes.update(next_token=config.vocab_sizes[0], next_type=config.n_token_types)
            # Targets of next_type: token id -> token family (a buffer, so it follows .to()).
            self.register_buffer(
                "token_types", torch.tensor(config.token_types, dtype=torch.long), persistent=False
            )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(d, sizes[name], bias=False) for name in self.weights}
        )
        if not self.is_cpword and config.tie_embeddings:
            self.heads["next_token"].weight = self.token_embeddings[0].weight

        self.kv_caches: tuple[KVCache, ...] = ()  # filled by setup_cache
        self._cache_positions: torch.Tensor | None = None  # [B, 1] next position of each row
        self._cache_slots = 0  # slots in use, a Python int: no device sync per step
        self._key_mask: torch.Tensor | None = None  # [B, 1, 1, max_len] slots rows may see
        self._init_weights()

    def _init_weights(self):
        """All initialisation, here: N(0, 0.02) for matrices and embeddings (GPT-2); residual
        output projections scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does
        not grow with depth; RMSNorm gains stay 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():  # a tied weight is listed once
            if param.dim() < 2:
                continue
            is_residual_out = name.endswith(("attention.out_proj.weight", "mlp.down.weight"))
            nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_out else 0.02)

    # ------------------------------------------------------------------ shared pieces
    def _embed(self, input_ids: torch.Tensor, track_ids: torch.Tensor) -> torch.Tensor:
        """Sum of the token embedding(s) and the track embedding.

        CPWord fields are *summed*, not concatenated and projected as in the compound-word
        transformer: concat(e_1..e_8) @ W equals sum_i e_i @ W_i, i.e. a sum of per-field
        embeddings whose tables are factorised through narrower widths. Full-width tables are
        at least as expressive, skip a matmul, and cost little (the 8 vocabularies total < 1k rows).
        """
        fields = input_ids.unbind(-1) if self.is_cpword else (input_ids,)
        x = self.token_embeddings[0](fields[0])
        for table, ids in zip(self.token_embeddings[1:], fields[1:], strict=True):
            x = x + table(ids)
        if self.track_embedding is not None:
            x = x + self.track_embedding(track_ids)
        return self.dropout(x)

    def _trunk(self, x, cos, sin):
        """Blocks + final norm; ``cos, sin``: rotary angles of ``x``'s positions."""
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def field_logits(
        self, hidden: torch.Tensor, family_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """CPWord: logits of every field after ``family``, given the family of the compound.

        ``hidden [..., D]`` and ``family_ids [...]`` (teacher-forced in training, sampled from the
        ``family`` logits when generating)."""
        if not self.is_cpword:
            raise ValueError("field_logits is for CPWord models; this one is REMI")
        family = self.token_embeddings[0](family_ids)
        conditioned = self.family_condition(torch.cat((hidden, family), dim=-1))
        return {name: self.heads[name](conditioned) for name in CPWORD_FIELDS[1:]}

    def _head_logits(self, hidden, family_ids=None) -> dict[str, torch.Tensor]:
        if not self.is_cpword:
            return {name: head(hidden) for name, head in self.heads.items()}
        logits = {"family": self.heads["family"](hidden)}
        if "next_instrument" in self.heads:
            logits["next_instrument"] = self.heads["next_instrument"](hidden)
        if family_ids is not None:
            logits.update(self.field_logits(hidden, family_ids))
        return logits

    def _check_ids(self, input_ids: torch.Tensor, track_ids: torch.Tensor, step: bool):
        expected = (1 if step else 2) + self.is_cpword
        shape = "[B" + ("" if step else ", T") + (", 8]" if self.is_cpword else "]")
        if input_ids.dim() != expected or (self.is_cpword and input_ids.shape[-1] != 8):
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)}: a {self.config.tokenization} "
                f"model takes {shape}"
            )
        if track_ids.shape != input_ids.shape[: expected - self.is_cpword]:
            raise ValueError(
                f"track_ids of shape {tuple(track_ids.shape)} do not match input_ids "
                f"{tuple(input_ids.shape)}: one track id per position"
            )

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids, track_ids, labels=None, label_track_ids=None) -> ModelOutput:
        """Logits of every head at every position; with ``labels`` also the losses.

        ``labels`` are already shifted (``labels[:, t]`` is the token at t+1), -100 = ignore;
        ``label_track_ids [B, T]`` is the track of the next token (for ``next_instrument``).
        """
        self._check_ids(input_ids, track_ids, step=False)
        T = input_ids.shape[1]
        x = self._embed(input_ids, track_ids)
        positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.config.rope_base, x.dtype)
        hidden = self._trunk(x, cos, sin)
        family_ids = None
        if self.is_cpword:
            # Fields are conditioned on the true next family in training (teacher forcing);
            # without labels, on the model's own most likely family.
            if labels is not None:
                family_ids = labels[..., 0].clamp(min=0)  # -100 rows: any id, all fields ignored
            else:
                family_ids = self.heads["family"](hidden).argmax(-1)
        logits = self._head_logits(hidden, family_ids)
        if labels is None:
            return ModelOutput(logits=logits, hidden=hidden)

        targets = self._targets(labels, label_track_ids)
        losses = {name: masked_cross_entropy(logits[name], targets[name]) for name in self.weights}
        loss = sum(self.weights[name] * value for name, value in losses.items())
        return ModelOutput(logits=logits, hidden=hidden, loss=loss, losses=losses)

    def target_counts(self, labels, label_track_ids=None) -> torch.Tensor:
        """How many targets each head (in ``config.heads`` order) is scored on in a batch: the
        denominators of ``forward``'s per-head mean losses, which training sums over
        micro-batches and processes to normalise the step loss by the global count."""
        targets = self._targets(labels, label_track_ids)
        return torch.stack([(targets[name] != IGNORE_INDEX).sum() for name in self.weights])

    def _targets(self, labels, label_track_ids) -> dict[str, torch.Tensor]:
        targets = {}
        if self.is_cpword:
            targets.update(zip(CPWORD_FIELDS, labels.unbind(-1), strict=True))
        else:
            targets["next_token"] = labels
            if "next_type" in self.weights:
                types = self.token_types[labels.clamp(min=0)]
                targets["next_type"] = types.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
        if "next_instrument" in self.weights:
            if label_track_ids is None:
                raise ValueError(
                    "the next_instrument head needs label_track_ids (track of the next token)"
                )
            targets["next_instrument"] = label_track_ids
        return targets

    # ------------------------------------------------------------------ cached generation
    def setup_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        """Preallocate every layer's keys and values for ``batch_size`` rows of ``max_len``
        positions (prompt + new tokens; may exceed ``config.max_seq_len``, see rotary_cos_sin)."""
        reference = self.norm.weight
        device = reference.device if device is None else torch.device(device)
        dtype = reference.dtype if dtype is None else dtype
        n_kv_heads = self.config.n_kv_heads or self.config.n_heads
        self.kv_caches = tuple(
            KVCache(
                batch_size, max_len, self.config.n_heads, n_kv_heads, self.head_dim, device, dtype
            )
            for _ in self.blocks
        )
        # The angles of every position the cache can hold, once: a step looks its rows' up.
        positions = torch.arange(max_len, device=device).unsqueeze(0)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.config.rope_base, dtype)
        self._rotary_cos, self._rotary_sin = cos[0], sin[0]  # [max_len, 1, hd]
        self._cache_positions = None
        self._cache_slots = 0
        self._key_mask = None

    def _claim_slots(self, batch_size: int, n: int) -> int:
        """The first of ``n`` new cache slots for a batch of ``batch_size`` rows."""
        if not self.kv_caches:
            raise RuntimeError("no KV cache: call setup_cache(batch_size, max_len) first")
        rows, capacity = self.kv_caches[0].k.shape[0], self.kv_caches[0].k.shape[2]
        if batch_size != rows:
            raise ValueError(f"batch of {batch_size} rows but the cache was set up for {rows}")
        if self._cache_slots + n > capacity:
            raise RuntimeError(
                f"KV cache full ({capacity} positions): call setup_cache with a larger max_len"
            )
        self._cache_slots += n
        return self._cache_slots - n

    def _cached_trunk(self, x, cos, sin, caches, slot: int, key_mask=None):
        """``_trunk`` through the KV caches (``Block.step``, one per block) for ``x [B * T, D]``,
        from cache slot ``slot`` on."""
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.step(x, cos, sin, cache, slot, key_mask)
        return rms_norm(x, self.norm)

    def _cached_logits(self, hidden, heads) -> dict[str, torch.Tensor]:
        """``_head_logits`` in functional calls; CPWord fields come later, from field_logits."""
        names = self.heads if heads is None else heads
        conditioned = CPWORD_FIELDS[1:] if self.is_cpword else ()
        return {n: F.linear(hidden, self.heads[n].weight) for n in names if n not in conditioned}

    @torch.no_grad()
    def prefill(self, input_ids, track_ids, lengths, heads=None) -> ModelOutput:
        """Fill the cache with a right-padded prompt batch; ``lengths [B]`` counts each row's real
        tokens. Returns logits of ``heads`` (default all) at each row's last real position
        (``[B, V]`` per head; CPWord: ``family`` and ``next_instrument`` only, then call
        ``field_logits``)."""
        self._check_ids(input_ids, track_ids, step=False)
        B, T = input_ids.shape[:2]
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        if lengths.shape != (B,) or (lengths < 1).any() or (lengths > T).any():
            raise ValueError(f"lengths {lengths.tolist()}: need one length in 1..{T} per row")
        self._cache_slots = 0
        self._claim_slots(B, T)
        # A causal mask suffices: a row's real tokens precede its padding.
        x = self._embed(input_ids, track_ids).flatten(0, 1)
        cos, sin = self._rotary_cos[:T], self._rotary_sin[:T]
        hidden = self._cached_trunk(x, cos, sin, self.kv_caches, slot=0)
        hidden = hidden.view(B, T, -1)[torch.arange(B, device=hidden.device), lengths - 1]
        self._cache_positions = lengths[:, None].clone()  # [B, 1]: the next token's position
        # Decode steps hide a shorter row's padding slots. Rows of one length get an all-true
        # mask rather than none: the compiled step (compile_decoder) sees one input structure.
        slots = torch.arange(self.kv_caches[0].k.shape[2], device=lengths.device)
        self._key_mask = ((slots < lengths[:, None]) | (slots >= T))[:, None, None]
        return ModelOutput(logits=self._cached_logits(hidden, heads), hidden=hidden)

    @torch.no_grad()
    def decode_step(self, input_ids, track_ids, heads=None) -> ModelOutput:
        """Append one token per row (``input_ids [B]`` or ``[B, 8]``, ``track_ids [B]``) at each
        row's own position; returns the next-position logits of ``heads`` (default all),
        ``[B, V]`` per head."""
        if self._cache_positions is None:
            raise RuntimeError("decode_step before prefill: call prefill(prompt, tracks, lengths)")
        self._check_ids(input_ids, track_ids, step=True)
        slot = self._claim_slots(input_ids.shape[0], 1)
        key_mask = self._key_mask[..., : slot + 1]
        hidden, logits = self._decode_one(
            input_ids, track_ids, self._cache_positions, slot, key_mask, self._rotary_cos,
            self._rotary_sin, self.kv_caches, heads=heads,
        )  # fmt: skip
        return ModelOutput(logits=logits, hidden=hidden)

    def _decode_one(
        self,
        input_ids,
        track_ids,
        positions,
        slot: int,
        key_mask,
        rotary_cos,
        rotary_sin,
        caches,
        heads=None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``decode_step``'s arithmetic, the one function ``compile_decoder`` compiles: tensors
        and the number of keys written (``slot``, symbolic) in; the hidden state and the logits
        of ``heads`` out (compiled: of every head, then the ones asked for are picked, so one
        graph serves whatever heads a caller asks for). The rotary tables and the caches come in
        as arguments, not attributes: the compiled graph freezes what it reads from attributes,
        and setup_cache makes new ones for every request."""
        x = self._embed(input_ids, track_ids)  # [B, D]
        cos, sin = rotary_cos[positions], rotary_sin[positions]  # [B, 1, 1, hd]
        hidden = self._cached_trunk(x, cos, sin, caches, slot, key_mask)
        positions += 1
        return hidden, self._cached_logits(hidden, heads)

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counted once). ``non_embedding`` leaves out tables used
        only as lookups (token and track embeddings) but keeps a tied token table, which is also
        the output projection and so does matmul work (nanoGPT's convention)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            head_weights = {id(head.weight) for head in self.heads.values()}
            lookups = [*self.token_embeddings, self.track_embedding]
            total -= sum(
                m.weight.numel()
                for m in lookups
                if m is not None and id(m.weight) not in head_weights
            )
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context ``seq_len``: 6N for the
        matmuls plus 12 * L * D * T for attention scores (PaLM appendix B, nanoGPT estimate_mfu)."""
        n = self.num_parameters(non_embedding=True)
        return 6 * n + 12 * self.config.n_layers * self.config.d_model * seq_len

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory, tokenizer=None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json`` via
        ``tokenizer.save``). A tied head is stored once; loading re-ties it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # save_model drops the second name of a shared tensor (safetensors refuses aliases).
        save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = json.dumps(dataclasses.asdict(self.config), indent=2)
        (directory / CONFIG_FILE).write_text(config + "\n")
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> PolyphonyGPT:
        """Load a ``save_pretrained`` directory in eval mode. Raises CheckpointError (one line,
        naming the file) for a missing, empty, truncated or non-safetensors file or a bad config."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: not found (expected a save_pretrained directory)")
        try:
            values = json.loads(config_path.read_text())
            if not isinstance(values, dict):
                raise ConfigError("expected a JSON object of model settings")
            model = cls(model_config_from_dict(values))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
            raise CheckpointError(f"{config_path}: bad model config ({one_line(err)})") from err
        if weights_path.stat().st_size == 0:
            raise CheckpointError(f"{weights_path}: empty file (0 bytes); re-save the model")
        try:
            load_model(model, weights_path, strict=True, device="cpu")
        except SafetensorError as err:
            raise CheckpointError(
                f"{weights_path}: not a complete safetensors file ({one_line(err)}); "
                "it may be truncated or a pickle"
            ) from err
        except RuntimeError as err:  # missing / unexpected keys, shape mismatch
            raise CheckpointError(
                f"{weights_path}: weights do not match {config_path.name} ({one_line(err)})"
            ) from err
        return model.to(device).eval()


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def check_config(config: ModelConfig) -> None:
    """Refuse a ModelConfig this model cannot be built from; messages name the key and the fix."""
    if config.tokenization not in ("remi", "cpword"):
        raise ConfigError(f"model.tokenization={config.tokenization!r}: expected remi or cpword")
    n_fields = 8 if config.tokenization == "cpword" else 1
    if len(config.vocab_sizes) != n_fields:
        raise ConfigError(
            f"model.vocab_sizes={config.vocab_sizes}: {config.tokenization} needs {n_fields} "
            "size(s); fill it from the tokenizer (PolyTokenizer.vocab_sizes)"
        )
    if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
        raise ConfigError(
            f"model.d_model={config.d_model} must split into model.n_heads={config.n_heads} "
            "heads of even width (rotary embeddings rotate pairs)"
        )
    n_kv_heads = config.n_kv_heads or config.n_heads
    if config.n_heads % n_kv_heads:
        raise ConfigError(
            f"model.n_heads={config.n_heads} is not a multiple of model.n_kv_heads={n_kv_heads}"
        )
    if config.tokenization == "cpword":
        allowed, required = (*CPWORD_FIELDS, "next_instrument"), CPWORD_FIELDS
    else:
        allowed, required = REMI_HEADS, ("next_token",)
    unknown = [name for name in config.heads if name not in allowed]
    missing = [name for name in required if name not in config.heads]
    if unknown or missing:
        problem = f"unknown {unknown}" if unknown else f"missing {missing}"
        raise ConfigError(
            f"model.heads: {problem}; a {config.tokenization} model takes {', '.join(allowed)} "
            f"and needs {', '.join(required)} (to generate)"
        )
    if "next_type" in config.heads and (
        config.n_token_types < 1 or len(config.token_types) != config.vocab_sizes[0]
    ):
        raise ConfigError(
            "model.heads.next_type needs model.token_types (one type per token id) and "
            "model.n_token_types; fill them from the tokenizer"
        )
