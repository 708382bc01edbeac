"""One multi-turn rollout: render (or bridge), generate, parse, step the environment, record.

Each turn's prompt extends the latest earlier step whose conversation (through its sampled
assistant message) is a prefix of the new conversation, with only the new messages, so the
sampled tokens are never re-rendered; when no step is such a prefix (the environment rewrote
history) or the bridge declines, the conversation is rendered in full and the reason counted.
Errors end the rollout with the error recorded on it; what was done is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from rollwire.engines.types import Engine, GenerateRequest, SamplingParams
from rollwire.errors import (
    CompletionError,
    EnvValueError,
    ImageError,
    MessageError,
    PromptTooLongError,
    RenderError,
    RollwireError,
    UnknownImageError,
)
from rollwire.features import ImageFeatures
from rollwire.messages import Message, MessageLike, message_to_dict, parse_messages
from rollwire.render.completion import validate_completion
from rollwire.render.types import RenderedTokens, Renderer
from rollwire.rollout.env import Environment
from rollwire.rollout.types import AssistantRecord, ErrorKind, RolloutError, Step, ToolCallRecord, Trajectory
from rollwire.rollout.values import honest_value

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutConfig:
    max_turns: int = 4
    max_tokens: int = 64  # per turn
    max_total_tokens: int = 4096  # prompt + completion budget of the whole rollout
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class RolloutResult:
    trajectory: Trajectory
    # Image sources by id (the environment's objects, not copies), for the store to archive.
    originals: dict[str, Any] = field(default_factory=dict)
    # The features of every image the trajectory refers to (the store's objects, not copies).
    features: dict[str, ImageFeatures] = field(default_factory=dict)


class _Images:
    """Which id each image object of the conversation got, and the sources to archive."""

    def __init__(self, renderer: Renderer) -> None:
        self.originals: dict[str, Any] = {}
        # The rollout's features, held until it is written: the store is an LRU and may evict them.
        self.features: dict[str, ImageFeatures] = {}
        self._ids: dict[int, str] = {}  # id() of an image object alive in the conversation -> image id
        self._store = renderer.feature_store

    def note(self, conversation: Sequence[Message], prompt: RenderedTokens) -> None:
        """Image parts and the prompt's refs come in the same order."""
        parts = [p for m in conversation for p in m.images]
        if len(parts) != len(prompt.images):
            raise RenderError(f"{len(parts)} images in the conversation but {len(prompt.images)} in the prompt")
        for part, ref in zip(parts, prompt.images, strict=True):
            self._ids.setdefault(id(part.image), ref.id)
            self.originals.setdefault(ref.id, part.image)
            if ref.id not in self.features and self._store is not None:
                self.features[ref.id] = self._features(ref.id, part.image)

    def _features(self, image_id: str, image: Any) -> ImageFeatures:
        """The stored features, or (a store under pressure evicted them, or they exceed its bound)
        the same features computed again from the image."""
        assert self._store is not None
        try:
            return self._store.get(image_id)
        except UnknownImageError:
            features = self._store.get_or_process(image)
        if features.id != image_id:
            raise RenderError(f"image {image_id[:12]} hashed to {features.id[:12]} when processed again")
        return features

    @contextlib.contextmanager
    def pinned(self, prompt: RenderedTokens) -> Iterator[None]:
        """Pin the prompt's images in the store for the block, putting back any it evicted since."""
        if self._store is None:
            yield
            return
        with self._store.pinned(prompt.image_ids):
            for image_id in dict.fromkeys(prompt.image_ids):
                if image_id not in self._store:
                    self._store.put(self.features[image_id])
            yield

    def id_for(self, image: Any) -> str | None:
        known = self._ids.get(id(image))
        if known is None and self._store is not None:  # never rendered (after the last turn)
            try:
                features = self._store.get_or_process(image)
            except RollwireError:
                return None
            known = features.id
            self._ids[id(image)] = known
            self.originals.setdefault(known, image)
            self.features.setdefault(known, features)
        return known


@dataclass
class _Turn:
    """What a later turn may extend: the conversation through a sampled assistant message."""

    conversation: list[Message]
    prompt: RenderedTokens
    completion_ids: list[int]


async def run_rollout(
    env: Environment,
    renderer: Renderer,
    engine: Engine,
    config: RolloutConfig,
    *,
    seed: int,
    trajectory_id: str,
    prompt_index: int = 0,
    sample_index: int = 0,
    sampling_seed: int | None = None,
    session_id: str | None = None,
) -> RolloutResult:
    """`session_id` (default: the trajectory id; a runner passes the GRPO group's) keeps the
    rollout's requests on one server replica."""
    state = _State(Trajectory(id=trajectory_id, env=env.name, prompt_index=prompt_index,
                              sample_index=sample_index, seed=seed), _Images(renderer),
                   session_id=session_id or trajectory_id)
    try:
        error = await _turns(state, env, renderer, engine, config, sampling_seed)
    except Exception as exc:  # a bug anywhere in one rollout must not take down the others
        error = _error("internal_error", exc, len(state.traj.steps))
    return _finish(state, error)


@dataclass
class _State:
    traj: Trajectory
    images: _Images
    conversation: list[Message] = field(default_factory=list)
    session_id: str | None = None
    metrics: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


async def _turns(
    state: _State, env: Environment, renderer: Renderer, engine: Engine, config: RolloutConfig,
    sampling_seed: int | None,
) -> RolloutError | None:
    """Run the turns; returns the error that ended the rollout, if one did."""
    traj, images, metrics = state.traj, state.images, state.metrics
    turns: list[_Turn] = []
    try:
        t0 = time.perf_counter()
        obs = await env.reset(traj.seed)
        state.conversation = _parse(obs.messages)
        problems: list[str] = []
        traj.tools = _take(list(obs.tools), "tools", problems) if obs.tools else None
        traj.env_info = _take_info(obs.info, "env_info", problems)
        _check_messages(state.conversation, 0, problems)
        metrics["env_s"] += time.perf_counter() - t0
        if problems:
            raise EnvValueError(problems)
    except Exception as exc:  # an environment's own bug is the environment's error
        return _error("env_error", exc, 0)

    branch = 0
    bridged = False
    reason: str | None = "first turn"
    try:
        t0 = time.perf_counter()
        prompt = await _off_loop(renderer.render, state.conversation, traj.tools)
        metrics["render_s"] += time.perf_counter() - t0
    except (RenderError, MessageError, ImageError) as exc:
        return _error("render_error", exc, 0)

    for turn in range(config.max_turns):
        images.note(state.conversation, prompt)
        budget = config.max_total_tokens - len(prompt.token_ids)
        if budget <= 0:
            traj.finish = "token_budget"
            return None
        sampling = SamplingParams(
            max_tokens=min(config.max_tokens, budget), temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, seed=None if sampling_seed is None else turn_seed(sampling_seed, turn),
            stop_token_ids=renderer.stop_token_ids, banned_token_ids=renderer.vision_token_ids)
        t0 = time.perf_counter()
        try:
            with images.pinned(prompt):  # the request's images stay in the store until it returns
                result = await engine.generate(GenerateRequest(
                    prompt_token_ids=prompt.token_ids, images=prompt.images, sampling=sampling,
                    request_id=f"{traj.id}-{turn}", session_id=state.session_id))
        except PromptTooLongError as exc:
            return _error("overlong_prompt", exc, turn)
        except Exception as exc:
            return _error("engine_error", exc, turn)
        generate_s = time.perf_counter() - t0
        if not result.completions or result.completions[0].finish_reason in ("abort", "error"):
            why = result.completions[0].finish_reason if result.completions else "no completion"
            return RolloutError(kind="engine_error", message=f"the engine returned {why}", step=turn)
        completion = result.completions[0]
        try:
            validate_completion(completion.token_ids, completion.logprobs, vocab_size=renderer.vocab_size,
                                stop_token_ids=renderer.stop_token_ids,
                                forbidden_token_ids=(*renderer.vision_token_ids, *renderer.structure_token_ids))
        except CompletionError as exc:  # never continued from nor trained on
            return _error("bad_completion", exc, turn)
        metrics["bytes_sent"] += result.bytes_sent
        metrics["image_bytes_sent"] += result.image_bytes_sent
        metrics["prompt_tokens"] += len(prompt.token_ids)
        metrics["completion_tokens"] += len(completion.token_ids)
        parsed = await _off_loop(renderer.parse_response, completion.token_ids)
        traj.steps.append(Step(
            prompt_ids=prompt.token_ids, images=prompt.images, completion_ids=list(completion.token_ids),
            completion_logprobs=completion.logprobs, finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason, status=parsed.status, parse_error=parsed.error,
            message=_record(parsed.message), bridged=bridged, render_reason=reason, branch=branch,
            timings={"generate_s": generate_s}, policy_version=completion.policy_version))
        state.conversation = [*state.conversation, parsed.message]
        turns.append(_Turn(state.conversation, prompt, list(completion.token_ids)))
        metrics["turns"] += 1

        t0 = time.perf_counter()
        problems = []
        try:
            env_step = await env.step(parsed.message)
            info = _take_info(env_step.info, f"env_steps[{turn}].info", problems)
            reward = _reward(env_step.reward, turn, problems)
            new_history = _parse(env_step.history) if env_step.history is not None else None
            new = _parse(env_step.messages, after=state.conversation) if new_history is None else []
        except Exception as exc:
            return _error("env_error", exc, turn + 1)
        metrics["env_s"] += time.perf_counter() - t0
        traj.metadata.setdefault("env_steps", []).append(info)
        if reward is not None:
            traj.rewards.append(reward)
        if new_history is not None:
            branch += 1
            state.conversation = new_history
            _check_messages(new_history, 0, problems)
        else:
            _check_messages(new, len(state.conversation), problems)
            state.conversation = [*state.conversation, *new]
        if problems:
            return _error("env_error", EnvValueError(problems), turn + 1)
        if env_step.done:
            traj.finish = "done"
            return None
        t0 = time.perf_counter()
        try:
            prompt, bridged, reason = await _off_loop(_next_prompt, renderer, turns, state.conversation,
                                                      traj.tools, metrics)
        except (RenderError, MessageError, ImageError) as exc:
            return _error("render_error", exc, turn + 1)
        metrics["render_s"] += time.perf_counter() - t0
    traj.finish = "max_turns"
    return None


def turn_seed(rollout_seed: int, turn: int) -> int:
    """A distinct sampling seed per (rollout, turn), in vLLM's 32-bit range."""
    return int(np.random.SeedSequence([rollout_seed, turn]).generate_state(1)[0]) & 0x7FFFFFFF


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in a worker thread: rendering hashes, resizes and tokenizes (all release the GIL),
    so the event loop stays free for the other rollouts and concurrent rollouts use every core."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _next_prompt(
    renderer: Renderer, turns: Sequence[_Turn], conversation: list[Message],
    tools: Sequence[Mapping[str, Any]] | None, metrics: defaultdict[str, float],
) -> tuple[RenderedTokens, bool, str | None]:
    """Bridge from the latest turn whose conversation is a prefix of this one, else render."""
    base = next((t for t in reversed(turns) if _is_prefix(t.conversation, conversation)), None)
    if base is None:
        reason = "history rewritten"
    else:
        metrics["bridge_attempts"] += 1
        result = renderer.bridge(base.prompt, base.completion_ids, conversation[len(base.conversation):])
        if result.tokens is not None:
            metrics["bridge_successes"] += 1
            return result.tokens, True, None
        reason = result.reason or "bridge declined"
    metrics[f"full_render:{reason}"] += 1
    return renderer.render(conversation, tools), False, reason


def _is_prefix(prefix: Sequence[Message], conversation: Sequence[Message]) -> bool:
    return len(prefix) < len(conversation) and all(
        a is b or a == b for a, b in zip(prefix, conversation, strict=False))


def _parse(messages: Sequence[MessageLike], after: Sequence[Message] | None = None) -> list[Message]:
    return parse_messages(messages, start_index=len(after or ()), previous=after[-1] if after else None)


def _record(message: Message) -> AssistantRecord:
    calls = tuple(ToolCallRecord(name=c.name, id=c.id, arguments=c.arguments_json()) for c in message.tool_calls)
    content = message.content if isinstance(message.content, str) or message.content is None else message.text
    return AssistantRecord(content=content, reasoning_content=message.reasoning_content, tool_calls=calls)


def _take(value: Any, field: str, problems: list[str]) -> Any:
    clean, found = honest_value(value, field)
    problems.extend(found)
    return clean


def _take_info(info: Any, field: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(info, Mapping):
        problems.append(f"{field}: must be a mapping, got {type(info).__name__}")
        return {}
    return dict(_take(info, field, problems))


def _reward(value: Any, turn: int, problems: list[str]) -> float | None:
    """A finite real number (bools and numpy scalars count); anything else is reported and dropped."""
    field = f"rewards[{turn}]"
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, (int, float)):
        problems.append(f"{field}: reward must be a number, got {type(value).__name__}")
        return None
    reward = float(value) if abs(value) < 2**1023 else math.inf
    if not math.isfinite(reward):
        problems.append(f"{field}: reward {value} is not finite")
        return None
    return reward


def _check_messages(messages: Sequence[Message], start: int, problems: list[str]) -> None:
    """Report message text a run directory cannot hold (lone surrogates, ...); it is cleaned on write."""
    for k, message in enumerate(messages, start):
        problems.extend(honest_value(message_to_dict(message), f"messages[{k}]")[1])


def _error(kind: ErrorKind, exc: BaseException, step: int) -> RolloutError:
    return RolloutError(kind=kind, message=f"{type(exc).__name__}: {exc}", step=step)


def _finish(state: _State, error: RolloutError | None) -> RolloutResult:
    traj = state.traj
    if error is not None:
        traj.error = error
        traj.finish = "error"
    traj.reward = float(sum(traj.rewards))
    try:
        messages, problems = honest_value([_message_json(m, state.images) for m in state.conversation], "messages")
        traj.messages = messages
        if problems and traj.error is None:  # the boundary checks should have caught it; never lose it
            traj.error, traj.finish = _error("env_error", EnvValueError(problems), len(traj.steps)), "error"
    except Exception as exc:  # keep the rollout even if its messages cannot be written out
        traj.messages = []
        if traj.error is None:
            traj.error, traj.finish = _error("internal_error", exc, len(traj.steps)), "error"
    traj.metrics = {k: float(v) for k, v in state.metrics.items()}
    return RolloutResult(traj, state.images.originals, state.images.features)


def _message_json(message: Message, images: _Images) -> dict[str, Any]:
    """OpenAI-format JSON of a message with each image replaced by its id."""
    return message_to_dict(message, image_repr=lambda part: {"type": "image", "image_id": images.id_for(part.image)})
