"""``sample``: logits -> one legal id per row, as torch.multinomial would draw it."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyphony.generation.sampling import sample

cases = st.tuples(
    st.integers(1, 6),  # rows
    st.integers(2, 40),  # vocabulary
    st.integers(0, 2**31 - 1),  # seed
    st.sampled_from([0.0, 0.5, 1.0, 1.7]),  # temperature
)


def logits_and_mask(rows: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    allowed = torch.rand(rows, vocab, generator=g) < 0.6
    allowed[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] = True
    return logits, allowed


@settings(max_examples=200, deadline=None)
@given(cases)
def test_sample_draws_what_multinomial_draws(case):
    # Same generator state, same id: sample's draw is torch.multinomial's one-sample path
    # without its checks, so seeded generations are unchanged by it.
    rows, vocab, seed, temperature = case
    logits, allowed = logits_and_mask(rows, vocab, seed)
    drawn = sample(logits, allowed, temperature, 0, 1.0, torch.Generator().manual_seed(seed))
    if temperature == 0:
        expected = torch.where(allowed, logits, float("-inf")).argmax(-1)
    else:
        probs = (torch.where(allowed, logits, float("-inf")) / temperature).softmax(-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(drawn, expected.view(-1))


@settings(max_examples=100, deadline=None)
@given(cases, st.integers(1, 5), st.sampled_from([0.3, 0.8, 0.95]))
def test_sample_keeps_to_the_mask_top_k_and_nucleus(case, top_k, top_p):
    rows, vocab, seed, temperature = case
    temperature = temperature or 1.0
    logits, allowed = logits_and_mask(rows, vocab, seed)
    masked = torch.where(allowed, logits, float("-inf")) / temperature
    probs = masked.softmax(-1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(20):
        by_k = sample(logits, allowed, temperature, top_k, 1.0, generator)
        by_p = sample(logits, allowed, temperature, 0, top_p, generator)
        for row in range(rows):
            assert allowed[row, by_k[row]] and allowed[row, by_p[row]]
            # top-k: fewer than k legal ids score strictly higher.
            assert int((masked[row] > masked[row, by_k[row]]).sum()) < top_k
            # top-p: the ids more likely than the one drawn hold less than top_p between them.
            assert float(probs[row][probs[row] > probs[row, by_p[row]]].sum()) < top_p + 1e-6


def test_sample_gives_rows_with_nothing_legal_id_zero():
    logits = torch.randn(3, 5)
    allowed = torch.tensor([[False] * 5, [False, False, True, False, False], [False] * 5])
    drawn = sample(logits, allowed, 1.0, 0, 0.9, torch.Generator().manual_seed(0))
    assert drawn.tolist() == [0, 2, 0]
