"""What a rollout records: typed steps and trajectories (msgspec structs, no pixels).

A step holds the exact prompt the engine saw and what it sampled; images are `ImageRef`s
whose pixels live in the feature store. In memory each step keeps its full prompt ids; the
transport delta-encodes prompts that extend an earlier step's prompt + completion.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import msgspec

from rollwire.render.types import ImageRef

ErrorKind: TypeAlias = Literal["overlong_prompt", "engine_error", "bad_completion", "env_error", "render_error",
                               "store_error", "internal_error"]
Finish: TypeAlias = Literal["done", "max_turns", "token_budget", "error"]


class ToolCallRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str  # JSON text
    id: str | None = None


class AssistantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The parsed assistant message of a step (its token ids are the step's completion_ids)."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: tuple[ToolCallRecord, ...] = ()


class Step(msgspec.Struct, frozen=True, kw_only=True):
    # Tuples, not lists: a run holds every step of every live rollout, and the garbage collector
    # walks each element of a list on every full pass (a tuple of numbers it stops tracking).
    prompt_ids: tuple[int, ...]
    images: tuple[ImageRef, ...]  # the prompt's images, offsets absolute in prompt_ids
    completion_ids: tuple[int, ...]
    completion_logprobs: tuple[float, ...] | None  # one per completion token
    finish_reason: str  # the engine's: stop / length / abort / error
    stop_reason: int | str | None = None
    status: Literal["stop", "length", "malformed"]  # the parsed response's
    parse_error: str | None = None
    message: AssistantRecord
    bridged: bool  # the prompt extends an earlier prompt + completion by the bridge
    render_reason: str | None = None  # why a full render was needed (None when bridged)
    branch: int = 0  # increments when the environment rewrites history (compaction)
    timings: dict[str, float] = {}
    policy_version: int | str | None = None  # the weights that sampled it (see `Completion.policy_version`)

    def __post_init__(self) -> None:  # a step built from lists holds tuples, as a decoded one does
        for name in ("prompt_ids", "completion_ids", "completion_logprobs"):
            value = getattr(self, name)
            if value is not None and type(value) is not tuple:
                msgspec.structs.force_setattr(self, name, tuple(value))


class RolloutError(msgspec.Struct, frozen=True, kw_only=True):
    kind: ErrorKind
    message: str
    step: int  # index of the step being built when it happened


class Trajectory(msgspec.Struct, kw_only=True):
    """One rollout: its steps, rewards, the final conversation (images as ids) and what happened."""

    id: str  # stable for a (env, seed, prompt, sample): a rerun resumes by it
    env: str
    prompt_index: int
    sample_index: int
    seed: int
    steps: list[Step] = []
    rewards: list[float] = []  # one per environment step
    reward: float = 0.0
    messages: list[dict[str, Any]] = []  # OpenAI format; images as {"type": "image", "image_id": id}
    tools: list[dict[str, Any]] | None = None
    env_info: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    finish: Finish = "done"
    error: RolloutError | None = None

    @property
    def image_ids(self) -> list[str]:
        """Every distinct image id the trajectory refers to, in first-use order."""
        seen: dict[str, None] = {}
        for step in self.steps:
            for ref in step.images:
                seen.setdefault(ref.id, None)
        return list(seen)
