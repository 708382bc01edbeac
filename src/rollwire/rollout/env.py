"""The environment protocol: reset with a seed, then step with the assistant's parsed message.

An environment answers each assistant turn with new messages (user or tool messages, images
allowed), a reward and whether it is done. It may instead return a whole new `history`
(compaction: earlier turns replaced by a summary); the rollout then starts a new branch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rollwire.errors import EnvError
from rollwire.messages import Message, MessageLike


@dataclass(frozen=True)
class Observation:
    """The first prompt: messages (and tools) the rollout starts from."""

    messages: Sequence[MessageLike]
    tools: Sequence[Mapping[str, Any]] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvStep:
    """The environment's answer to one assistant turn."""

    messages: Sequence[MessageLike] = ()  # appended after the assistant message
    reward: float = 0.0
    done: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)
    # A rewritten conversation (compaction) replacing everything so far, new messages included.
    history: Sequence[MessageLike] | None = None


@runtime_checkable
class Environment(Protocol):
    name: str

    async def reset(self, seed: int) -> Observation: ...

    async def step(self, message: Message) -> EnvStep: ...


EnvFactory = Callable[..., Environment]
_REGISTRY: dict[str, EnvFactory] = {}


def register(name: str, factory: EnvFactory) -> None:
    _REGISTRY[name] = factory


def make_env(name: str, **kwargs: Any) -> Environment:
    """A fresh environment instance (one per rollout) by registered name."""
    from rollwire.rollout import envs  # noqa: F401  (registers the built-in environments)

    if name not in _REGISTRY:
        raise EnvError(f"unknown environment {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**kwargs)


def env_names() -> list[str]:
    from rollwire.rollout import envs  # noqa: F401

    return sorted(_REGISTRY)
