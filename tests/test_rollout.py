"""The multi-turn loop and the runner, on the real tiny model and real renderers.

Random weights never call a tool, so the tool and compaction paths are driven by a scripted
policy (an engine that answers with given text); everything else is real.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from rollwire.engines.local import LocalEngine
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.errors import EngineError, PromptTooLongError, RolloutConfigError, StoreError
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer, validate_placeholders
from rollwire.rollout import (
    EnvStep,
    Observation,
    RolloutConfig,
    RunConfig,
    register,
    run_rollout,
    run_rollouts,
)
from rollwire.rollout.envs.shapes import ShapesEnv
from rollwire.rollout.envs.zoom import ZoomEnv


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


@pytest.fixture(scope="module")
def local(tiny: Callable[[str], Path], renderer: Any) -> Iterator[LocalEngine]:
    engine = LocalEngine(tiny("qwen2_vl"), feature_store=renderer.feature_store)
    yield engine
    asyncio.run(engine.close())


class ScriptedEngine:
    """A policy that answers each turn with the next scripted text (or raises the scripted error)."""

    def __init__(self, renderer: Any, script: Sequence[str | BaseException]) -> None:
        self.renderer = renderer
        self.script = list(script)
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        ids = [*self.renderer.tokenizer.encode_ids(item), self.renderer.im_end_id]
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=[-1.0] * len(ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


def assert_extends(steps: Sequence[Any]) -> None:
    """Token identity: every bridged prompt starts with the previous prompt + completion."""
    for prev, step in itertools.pairwise(steps):
        if step.bridged:
            head = prev.prompt_ids + prev.completion_ids
            assert step.prompt_ids[: len(head)] == head
            assert step.images[: len(prev.images)] == prev.images


async def test_shapes_multi_turn_on_the_local_engine(renderer: Any, local: Any) -> None:
    config = RolloutConfig(max_turns=5, max_tokens=6)
    result = await run_rollout(ShapesEnv(turns=3), renderer, local, config, seed=7, trajectory_id="t",
                               sampling_seed=1)
    t = result.trajectory
    assert t.error is None and t.finish == "done" and len(t.steps) == 3 and len(t.rewards) == 3
    assert [len(s.images) for s in t.steps] == [1, 2, 3]  # every earlier image carried forward
    assert [s.bridged for s in t.steps] == [False, True, True]
    assert_extends(t.steps)
    for s in t.steps:
        validate_placeholders(s.prompt_ids, s.images, pad_id=renderer.image_pad_id, merge_size=2,
                              known_ids=renderer.feature_store)
        assert s.completion_logprobs is not None and len(s.completion_logprobs) == len(s.completion_ids)
    ids = [p["image_id"] for m in t.messages if isinstance(m["content"], list)
           for p in m["content"] if p["type"] == "image"]
    assert ids == [r.id for r in t.steps[-1].images] and set(result.originals) == set(ids)
    json.dumps(t.messages, allow_nan=False)  # honest JSON
    assert t.metrics["bridge_successes"] == 2
    # What a live rollout holds per token is not walked by the garbage collector on every pass (a
    # list of ids would be: 175 ms a full pass at 256 rollouts x 8 turns of 1024² images).
    gc.collect()
    held = [x for s in t.steps for x in (s.prompt_ids, s.completion_ids, s.completion_logprobs)]
    assert held and not any(gc.is_tracked(x) for x in held)


async def test_a_group_shares_its_prompt_image(renderer: Any, local: Any) -> None:
    results: list[Any] = []
    summary = await run_rollouts(RunConfig(env="shapes", n_prompts=2, group=3, concurrency=6,
                                           rollout=RolloutConfig(max_turns=1, max_tokens=4),
                                           env_kwargs={"turns": 1}),
                                 renderer, local, on_result=results.append, progress=False)
    assert summary.done == 6 and summary.failed == 0
    first = {}
    for r in results:
        first.setdefault(r.trajectory.prompt_index, set()).add(r.trajectory.steps[0].images[0].id)
    assert all(len(ids) == 1 for ids in first.values()) and len(first) == 2
    assert summary.unique_images == 2 and summary.referenced_images == 6


async def test_zoom_tool_calls_malformed_calls_and_answer(renderer: Any) -> None:
    env = ZoomEnv()
    obs = await env.reset(3)
    number = obs.info["number"]
    script = [
        'Let me look.\n<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 84, 56]}}\n</tool_call>',
        '<tool_call>\n{"name": "crop", "arguments": {box: oops}}\n</tool_call>',
        '<tool_call>\n{"name": "rotate", "arguments": {}}\n</tool_call>',
        f"ANSWER: {number}",
    ]
    engine = ScriptedEngine(renderer, script)
    result = await run_rollout(ZoomEnv(), renderer, engine, RolloutConfig(max_turns=6), seed=3, trajectory_id="z")
    t = result.trajectory
    assert t.error is None and t.finish == "done" and t.rewards == [0.0, 0.0, 0.0, 1.0]
    assert t.steps[0].message.tool_calls[0].name == "crop"
    assert t.steps[1].status == "malformed" and t.steps[1].parse_error
    assert [len(s.images) for s in t.steps] == [1, 2, 2, 2]  # the crop came back as an image
    tool_msg = next(m for m in t.messages if m["role"] == "tool" and isinstance(m["content"], list))
    assert tool_msg["content"][1]["type"] == "image" and tool_msg["content"][1]["image_id"] == t.steps[1].images[1].id
    reminder = t.messages[t.messages.index(tool_msg) + 2]
    assert reminder["role"] == "user" and "could not be parsed" in reminder["content"]
    unknown = [m for m in t.messages if m["role"] == "tool" and isinstance(m["content"], str)]
    assert unknown and "unknown tool 'rotate'" in unknown[0]["content"]
    assert all(s.bridged for s in t.steps[1:])
    assert_extends(t.steps)


class CompactingEnv:
    """Test-only: after the second answer, replaces the history by a summary (a new branch)."""

    name = "compacting"

    def __init__(self) -> None:
        self.turn = 0
        self.images = [ShapesEnv()._ask().images[0].image for _ in range(4)]

    async def reset(self, seed: int) -> Observation:
        return Observation(messages=[Message(role="user", content=(ImagePart(self.images[0]), TextPart("one")))])

    async def step(self, message: Message) -> EnvStep:
        self.turn += 1
        nxt = Message(role="user", content=(ImagePart(self.images[self.turn]), TextPart(f"turn {self.turn}")))
        if self.turn == 2:
            summary = Message(role="user", content="Summary of earlier turns: two pictures, two answers.")
            return EnvStep(history=[summary, nxt], reward=0.5)
        return EnvStep(messages=[nxt], reward=0.0, done=self.turn == 3)


async def test_compaction_starts_a_new_branch(renderer: Any, local: Any) -> None:
    result = await run_rollout(CompactingEnv(), renderer, local, RolloutConfig(max_turns=5, max_tokens=4),
                               seed=0, trajectory_id="c")
    t = result.trajectory
    assert t.error is None and len(t.steps) == 3
    assert [s.branch for s in t.steps] == [0, 0, 1]
    assert [s.bridged for s in t.steps] == [False, True, False]
    assert t.steps[2].render_reason == "history rewritten"
    assert len(t.steps[2].images) == 1  # the compacted prompt holds only the new picture
    assert t.metrics["full_render:history rewritten"] == 1


class FailingEnv(ShapesEnv):
    name = "failing"

    async def step(self, message: Message) -> EnvStep:
        if self._turn == 1:
            raise RuntimeError("the environment crashed")
        return await super().step(message)


async def test_errors_are_recorded_and_keep_what_was_done(renderer: Any, local: Any) -> None:
    r = await run_rollout(FailingEnv(turns=4), renderer, local, RolloutConfig(max_turns=4, max_tokens=4),
                          seed=1, trajectory_id="f")
    t = r.trajectory
    assert t.finish == "error" and t.error is not None and t.error.kind == "env_error"
    assert "crashed" in t.error.message and len(t.steps) == 2 and t.error.step == 2
    r = await run_rollout(ShapesEnv(), renderer, ScriptedEngine(renderer, ["2", EngineError("server gone")]),
                          RolloutConfig(max_turns=3), seed=1, trajectory_id="e")
    assert r.trajectory.error is not None and r.trajectory.error.kind == "engine_error" and len(r.trajectory.steps) == 1
    r = await run_rollout(ShapesEnv(), renderer, ScriptedEngine(renderer, [PromptTooLongError("too long")]),
                          RolloutConfig(), seed=1, trajectory_id="o")
    assert r.trajectory.error is not None and r.trajectory.error.kind == "overlong_prompt"
    r = await run_rollout(ShapesEnv(turns=9), renderer, local, RolloutConfig(max_turns=9, max_tokens=4,
                                                                              max_total_tokens=120),
                          seed=1, trajectory_id="b")
    assert r.trajectory.finish == "token_budget" and r.trajectory.error is None
    assert all(len(s.prompt_ids) + len(s.completion_ids) <= 120 for s in r.trajectory.steps)


async def test_one_failing_rollout_does_not_stop_the_others_and_runs_resume(renderer: Any, local: Any) -> None:
    register("failing", FailingEnv)
    config = RunConfig(env="failing", n_prompts=3, group=1, concurrency=3,
                       rollout=RolloutConfig(max_turns=3, max_tokens=4), env_kwargs={"turns": 3})
    results: list[Any] = []
    summary = await run_rollouts(config, renderer, local, on_result=results.append, progress=False)
    assert summary.failed == 3 and summary.errors == {"env_error": 3} and len(results) == 3
    config = RunConfig(env="shapes", n_prompts=3, group=1, rollout=RolloutConfig(max_turns=1, max_tokens=4),
                       env_kwargs={"turns": 1})
    summary = await run_rollouts(config, renderer, local, skip_ids={"shapes-s0-p1-g0"}, progress=False)
    assert summary.skipped == 1 and summary.done == 2


class NanEnv(ShapesEnv):
    name = "nan"

    async def step(self, message: Message) -> EnvStep:
        return EnvStep(reward=float("nan"))


class BrokenEngine:
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        raise ValueError("a bug, not a RollwireError")

    async def close(self) -> None:
        pass


async def test_unexpected_failures_stay_inside_their_rollout(renderer: Any, local: Any) -> None:
    r = await run_rollout(NanEnv(), renderer, local, RolloutConfig(max_tokens=3), seed=0, trajectory_id="n")
    assert r.trajectory.error is not None and r.trajectory.error.kind == "env_error"
    assert "not finite" in r.trajectory.error.message and len(r.trajectory.steps) == 1
    r = await run_rollout(ShapesEnv(), renderer, BrokenEngine(), RolloutConfig(), seed=0, trajectory_id="x")
    assert r.trajectory.error is not None and r.trajectory.error.kind == "engine_error"

    calls: list[str] = []

    def refuse_one(result: Any) -> None:
        calls.append(result.trajectory.id)
        if result.trajectory.prompt_index == 1:
            raise StoreError("disk full")
        if result.trajectory.prompt_index == 2:
            raise ValueError("a writer bug, not a RollwireError")

    config = RunConfig(env="shapes", n_prompts=3, rollout=RolloutConfig(max_turns=1, max_tokens=3),
                       env_kwargs={"turns": 1})
    summary = await run_rollouts(config, renderer, local, on_result=refuse_one, progress=False)
    # done counts only rollouts that were kept; the unwritten ones are counted and their errors shown
    assert summary.done == 1 and summary.unwritten == 2 and len(calls) == 3 and not summary.ok
    assert dict(summary.top_errors()) == {"unwritten: StoreError: disk full": 1,
                                          "unwritten: ValueError: a writer bug, not a RollwireError": 1}


def test_run_settings_are_checked() -> None:
    with pytest.raises(RolloutConfigError):
        RunConfig(env="shapes", concurrency=0)
    with pytest.raises(RolloutConfigError):
        RunConfig(env="shapes", group=0)
