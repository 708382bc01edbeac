"""One multi-turn rollout: render (or bridge), generate, parse, step the environment, record.

Each turn's prompt extends the latest earlier step whose conversation (through its sampled
assistant message) is a prefix of the new conversation, with only the new messages, so the
sampled tokens are never re-rendered; when no step is such a prefix (the environment rewrote
history) or the bridge declines, the conversation is rendered in full and the reason counted.
Errors end the rollout with the error recorded on it; what was done is kept.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
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
    StoreError,
)
from rollwire.features import FeatureStore, PinLease
from rollwire.messages import Message, MessageLike, message_to_dict, parse_messages
from rollwire.render.completion import validate_completion
from rollwire.render.types import RenderedTokens, Renderer
from rollwire.rollout.env import Environment
from rollwire.rollout.images import ImageArchive, RolloutImages
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
    # Without an image archive only: image sources by id (the environment's objects, not copies),
    # for the caller to archive. With one, every image is archived already and this is empty.
    originals: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Turn:
    """What a later turn may extend: the conversation through a sampled assistant message."""

    conversation: list[Message]
    prompt: RenderedTokens
    completion_ids: tuple[int, ...]


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
    archive: ImageArchive | None = None,
    session_id: str | None = None,
) -> RolloutResult:
    """One rollout; errors end it with the error recorded on it. With `archive` (a run's blob store)
    the rollout holds image ids only: each image is archived when first seen (see `rollout.images`).
    `session_id` (default: the trajectory id; a runner passes the GRPO group's) keeps the rollout's
    requests on one server replica."""
    state = _State(Trajectory(id=trajectory_id, env=env.name, prompt_index=prompt_index,
                              sample_index=sample_index, seed=seed),
                   RolloutImages(renderer.feature_store, archive), session_id=session_id or trajectory_id)
    try:
        error = await _turns(state, env, renderer, engine, config, sampling_seed)
    except Exception as exc:  # a bug anywhere in one rollout must not take down the others
        error = _error("internal_error", exc, len(state.traj.steps))
    finally:
        state.release_pins()  # a prompt rendered and never sent (token budget, an error) pins nothing after
    # Off the loop: writing out the messages may hash an image never rendered (one the last step added),
    # which held the loop for up to 176 ms at K=256 (asyncio debug's slow-callback log).
    return await _off_loop(_finish, state, error)


@dataclass
class _State:
    traj: Trajectory
    images: RolloutImages
    conversation: list[Message] = field(default_factory=list)
    session_id: str | None = None
    metrics: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    lease: PinLease | None = None  # the pins of the prompt rendered last, until its request returns

    async def render(self, store: FeatureStore | None, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (a render or a bridge) off the loop with a new pin lease collecting: every
        image the store hands it stays pinned until the request carrying it has returned
        (`RolloutImages.pinned` releases the lease then); if it raises, its pins go at once."""
        self.release_pins()
        lease = self.lease = store.lease() if store is not None else None
        try:
            return await _off_loop(_collecting, lease, fn, *args)
        except BaseException:
            self.release_pins()
            raise

    def release_pins(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


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
        del obs  # its images live on in the conversation only (archived there after the first turn)
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
        prompt = await state.render(renderer.feature_store, renderer.render, state.conversation, traj.tools)
        metrics["render_s"] += time.perf_counter() - t0
    except (RenderError, MessageError, ImageError) as exc:
        return _error("render_error", exc, 0)

    for turn in range(config.max_turns):
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
            with images.pinned(prompt, state.lease):  # its images stay in the store until it returns
                try:
                    state.conversation = await _off_loop(images.note, state.conversation, prompt)
                except StoreError as exc:  # the run directory cannot take the image: nothing to continue
                    return _error("store_error", exc, turn)
                except (RenderError, ImageError) as exc:
                    return _error("render_error", exc, turn)
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
            prompt_ids=prompt.token_ids, images=prompt.images, completion_ids=tuple(completion.token_ids),
            completion_logprobs=None if completion.logprobs is None else tuple(completion.logprobs),
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason, status=parsed.status,
            parse_error=parsed.error, message=_record(parsed.message), bridged=bridged, render_reason=reason,
            branch=branch, timings={"generate_s": generate_s}, policy_version=completion.policy_version))
        state.conversation = [*state.conversation, parsed.message]
        turns.append(_Turn(state.conversation, prompt, traj.steps[-1].completion_ids))
        metrics["turns"] += 1

        t0 = time.perf_counter()
        problems = []
        try:
            env_step = await env.step(parsed.message)
            info = _take_info(env_step.info, f"env_steps[{turn}].info", problems)
            reward = _reward(env_step.reward, turn, problems)
            new_history = _parse(env_step.history) if env_step.history is not None else None
            new = _parse(env_step.messages, after=state.conversation) if new_history is None else []
            done = env_step.done
            del env_step
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
        if done:
            traj.finish = "done"
            return None
        t0 = time.perf_counter()
        try:
            prompt, bridged, reason, state.conversation = await state.render(
                renderer.feature_store, _next_prompt, renderer, images, turns, state.conversation, traj.tools,
                metrics)
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


def _collecting(lease: PinLease | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with `lease` collecting in this (worker) thread: the images the store hands out are pinned."""
    if lease is None:
        return fn(*args)
    with lease.collecting():
        return fn(*args)


def _next_prompt(
    renderer: Renderer, images: RolloutImages, turns: Sequence[_Turn], conversation: list[Message],
    tools: Sequence[Mapping[str, Any]] | None, metrics: defaultdict[str, float],
) -> tuple[RenderedTokens, bool, str | None, list[Message]]:
    """Bridge from the latest turn whose conversation is a prefix of this one, else render; and the
    conversation (a rewritten history's images this rollout archived become archived parts again)."""
    base = next((t for t in reversed(turns) if _is_prefix(t.conversation, conversation)), None)
    if base is None:
        conversation = images.adopt(conversation)
        base = next((t for t in reversed(turns) if _is_prefix(t.conversation, conversation)), None)
    if base is None:
        reason = "history rewritten"
    else:
        metrics["bridge_attempts"] += 1
        result = renderer.bridge(base.prompt, base.completion_ids, conversation[len(base.conversation):])
        if result.tokens is not None:
            metrics["bridge_successes"] += 1
            return result.tokens, True, None, conversation
        reason = result.reason or "bridge declined"
    metrics[f"full_render:{reason}"] += 1
    return renderer.render(images.materialize(conversation), tools), False, reason, conversation


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
    return RolloutResult(traj, state.images.originals)


def _message_json(message: Message, images: RolloutImages) -> dict[str, Any]:
    """OpenAI-format JSON of a message with each image replaced by its id."""
    return message_to_dict(message, image_repr=lambda part: {"type": "image", "image_id": images.id_for(part.image)})
