"""The embedded engine's sampler: one row's next token from its raw logits, as vLLM samples it.

Banned ids are masked, then temperature (below `GREEDY_TEMPERATURE` the row is greedy), then
vLLM's top-k / top-p filter, then one uniform draw from the row's own seeded generator (an
inverse CDF, not `torch.multinomial`: that was 44% of an end-to-end rollout at a 151k vocabulary).
Its own module so the sampler can be timed and swapped alone (`rollwire bench embedded` replaces
`inverse_cdf`). torch arrives as an argument: importing this module does not import torch.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any

from rollwire.engines.types import SamplingParams
from rollwire.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

__all__ = ["GREEDY_TEMPERATURE", "check_sampling", "inverse_cdf", "new_generator", "sample", "top_k_top_p"]

GREEDY_TEMPERATURE = 1e-5  # below this a request is greedy (vLLM's threshold)


def check_sampling(sp: SamplingParams, vocab_size: int) -> None:
    """`InvalidRequestError` for sampling settings this sampler cannot honour."""
    if sp.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {sp.max_tokens}")
    if sp.n < 1:
        raise InvalidRequestError(f"n must be >= 1, got {sp.n}")
    if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequestError(f"temperature must be finite and >= 0, got {sp.temperature}")
    if not 0 < sp.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < -1:
        raise InvalidRequestError(f"top_k must be >= 0 (or -1 for off), got {sp.top_k}")
    if any(not 0 <= t < vocab_size for t in sp.banned_token_ids):
        raise InvalidRequestError(f"banned_token_ids must lie in [0, {vocab_size})")
    if len(set(sp.banned_token_ids)) >= vocab_size:
        raise InvalidRequestError("banned_token_ids leaves no token to sample")


def sample(torch: Any, logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator,
           banned: torch.Tensor | None) -> int:
    """The next token from one row's raw logits (1-D, float32); `banned` holds the ids to mask."""
    if banned is not None:
        logits = logits.index_fill(0, banned, -math.inf)
    if sp.temperature < GREEDY_TEMPERATURE:
        return int(torch.argmax(logits))
    values, ids = top_k_top_p(torch, logits / sp.temperature, sp.top_k, sp.top_p)
    choice = inverse_cdf(torch, values, generator)
    return choice if ids is None else int(ids[choice])


def top_k_top_p(torch: Any, logits: torch.Tensor, top_k: int,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidates vLLM's filter keeps from tempered logits: the top_k largest, then the smallest
    prefix (by descending probability among those) whose mass reaches top_p. Returns (logits, ids)
    of the candidates, or (all logits, None) when neither filter is on."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, ids = torch.topk(logits, top_k)  # sorted, descending
    elif top_p < 1.0:
        values, ids = torch.sort(logits, descending=True)
    else:
        return logits, None
    if top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = int((mass_before < top_p).sum().clamp(min=1))
        values, ids = values[:keep], ids[:keep]
    return values, ids


def inverse_cdf(torch: Any, logits: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn from softmax(logits) with one uniform: the first whose cumulative mass exceeds
    u * total (float64 sums; zero-probability entries are never drawn). Exact in distribution, and
    several times cheaper than `torch.multinomial` over a 150k-256k vocabulary."""
    weights = torch.exp((logits - logits.max()).double())
    cumulative = torch.cumsum(weights, dim=0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=logits.device) * cumulative[-1]
    return int(torch.searchsorted(cumulative, u, right=True).clamp(max=logits.shape[0] - 1))


def new_generator(torch: Any, device: torch.device, seed: int | None, index: int) -> torch.Generator:
    """Completion `index`'s generator: seeded with `seed + index`, or a random seed without one."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index) % 2**63 if seed is not None else secrets.randbits(63))
    return generator
