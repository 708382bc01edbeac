"""The one engine protocol: token ids + image refs in, completion ids + logprobs out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeAlias, runtime_checkable

import msgspec

from rollwire.render.types import ImageRef

FinishReason: TypeAlias = Literal["stop", "length", "abort", "error"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling settings, named as vLLM names them. `top_k=0` and `top_p=1` disable those filters."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Token ids the model must never sample (the family's vision/pad ids).
    banned_token_ids: tuple[int, ...] = ()
    logprobs: bool = True
    n: int = 1


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A prompt as token ids with the refs of its images; pixels come from the feature store by id."""

    prompt_token_ids: Sequence[int]  # a rendered prompt's tuple, sent as it is
    images: tuple[ImageRef, ...] = ()
    sampling: SamplingParams
    request_id: str | None = None
    # Session affinity key (a trajectory or a GRPO group): sent as `X-Session-ID` so that a pool or
    # an external router (vllm-router) keeps the session, and the images it holds, on one replica.
    session_id: str | None = None


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    token_ids: list[int]
    logprobs: list[float] | None  # one per completion token, of the sampled token
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    # The weights that sampled it: the server's `weight_versions` label where it reports one (the
    # oldest, when a weight update happened mid-completion), else the caller's policy version.
    policy_version: int | str | None = None


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    total_s: float
    queue_s: float = 0.0


class GenerateResult(msgspec.Struct, frozen=True, kw_only=True):
    completions: list[Completion]
    timings: Timings
    bytes_sent: int = 0  # request body bytes (0 for an in-process engine)
    image_bytes_sent: int = 0  # of which image features
    cache_misses: int = 0  # images the server did not hold and that had to be re-sent


@runtime_checkable
class Engine(Protocol):
    """Generates completions; the same rollout code runs on every engine."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def close(self) -> None: ...
