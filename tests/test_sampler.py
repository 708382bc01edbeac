"""The embedded engine's sampler: one uniform per draw through the cumulative distribution gives
softmax(logits) exactly (frequencies within 4 sigma), never a zero-probability id, and the same
draws for the same seed."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rollwire.engines.local_sampler import inverse_cdf  # noqa: E402


def test_frequencies_follow_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -math.inf, 0.5, -math.inf])
    probs = torch.softmax(logits, dim=-1).tolist()
    generator = torch.Generator().manual_seed(0)
    n = 20000
    counts = [0] * len(probs)
    for _ in range(n):
        counts[inverse_cdf(torch, logits, generator)] += 1
    for count, p in zip(counts, probs, strict=True):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 4 * sigma + 1e-9, (counts, probs)
    assert counts[3] == counts[5] == 0


def test_same_seed_same_draws_and_a_large_vocabulary() -> None:
    logits = torch.randn(151669, generator=torch.Generator().manual_seed(1)) * 3
    a = [inverse_cdf(torch, logits, g) for g in [torch.Generator().manual_seed(7)] for _ in range(50)]
    b = [inverse_cdf(torch, logits, g) for g in [torch.Generator().manual_seed(7)] for _ in range(50)]
    assert a == b and all(0 <= i < 151669 for i in a)
    peaked = torch.full((151669,), -math.inf)
    peaked[12345] = 0.0
    assert inverse_cdf(torch, peaked, torch.Generator().manual_seed(3)) == 12345
