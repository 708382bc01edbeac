"""The environment protocol: reset with a seed, then step with the assistant's parsed message.

An environment answers each assistant turn with new messages (user or tool messages, images
allowed), a reward and whether it is done. It may instead return a whole new `history`
(compaction: earlier turns replaced by a summary); the rollout then starts a new branch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from rollwire.errors import EnvSpecError
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


def resolve_env(spec: str) -> EnvFactory:
    """The factory a spec names: a registered name (`shapes`, `zoom`, `dataset`) or an import path
    `package.module:factory` (any callable returning an environment, a class included)."""
    from rollwire.rollout import envs  # noqa: F401  (registers the built-in environments)

    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        raise EnvSpecError(f"unknown environment {spec!r} (known: {', '.join(sorted(_REGISTRY))}; "
                           "or give an import path package.module:factory)")
    return cast(EnvFactory, import_object(spec, "environment"))


def import_object(spec: str, what: str) -> Callable[..., Any]:
    """The callable an import path `package.module:name` (or `module:Class.attr`) names; `what` says
    what it is for, in the `EnvSpecError` raised when it names nothing callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EnvSpecError(f"{what} {spec!r}: an import path is package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvSpecError(f"{what} {spec!r}: cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise EnvSpecError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise EnvSpecError(f"{what} {spec!r}: {attr!r} is a {type(target).__name__}, not callable")
    return cast(Callable[..., Any], target)


def make_env(spec: str, **kwargs: Any) -> Environment:
    """A fresh environment instance (one per rollout) from a registered name or an import path."""
    factory = resolve_env(spec)
    try:
        env = factory(**kwargs)
    except TypeError as exc:
        if not _accepts(factory, kwargs):
            raise EnvSpecError(f"environment {spec!r} does not take these arguments "
                               f"({', '.join(kwargs) or 'none'}): {exc}") from None
        raise
    if not isinstance(env, Environment):
        raise EnvSpecError(f"environment {spec!r}: the factory returned a {type(env).__name__}, which is not an "
                           "environment (it needs `name`, `async reset(seed)` and `async step(message)`)")
    return env


def env_names() -> list[str]:
    from rollwire.rollout import envs  # noqa: F401

    return sorted(_REGISTRY)


def _accepts(factory: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    """Whether `factory`'s signature takes `kwargs` (so a TypeError came from inside it)."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): cannot tell
        return True
    return True
