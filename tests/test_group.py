"""A GRPO group's shared first prompt as one `n = G` request (GroupedEngine), against the fake vLLM
of test_held and through the runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rollwire.engines.group import GroupedEngine
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from test_held import FakeVLLM, client, group_request


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


def seeded(request: GenerateRequest, seed: int) -> GenerateRequest:
    return msgspec.structs.replace(request, sampling=msgspec.structs.replace(request.sampling, seed=seed))


async def test_a_group_of_16_goes_as_one_request_and_each_member_gets_its_own(renderer: Any) -> None:
    server = FakeVLLM()
    request = group_request(renderer, 7)
    async with client(renderer, FakeVLLM()) as alone:
        one = (await alone.generate(request)).image_bytes_sent
    grouped = GroupedEngine(client(renderer, server), group=16, window_s=5.0)  # full before the window ends
    results = await asyncio.gather(*(grouped.generate(seeded(request, k)) for k in range(16)))
    await grouped.close()
    assert server.requests == [16] and grouped.stats.coalesced == 15
    assert sorted(r.completions[0].token_ids[1] for r in results) == list(range(12, 28))  # one each
    assert sum(r.image_bytes_sent for r in results) == one  # the image went once, counted once


async def test_different_prompts_are_not_coalesced_and_a_partial_group_goes_after_the_window(renderer: Any) -> None:
    server = FakeVLLM()
    a, b = group_request(renderer, 8), group_request(renderer, 9)
    grouped = GroupedEngine(client(renderer, server), group=4, window_s=0.02)
    results = await asyncio.gather(grouped.generate(seeded(a, 1)), grouped.generate(seeded(b, 2)),
                                   grouped.generate(seeded(a, 3)))
    await grouped.close()
    assert sorted(server.requests) == [1, 2] and len(results) == 3
    assert [len(r.completions) for r in results] == [1, 1, 1]


class CountingEngine:
    """Answers n different completions per request and records each request's n and length."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.seen: list[tuple[int, int]] = []

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.seen.append((request.sampling.n, len(request.prompt_token_ids)))
        out = []
        for k in range(request.sampling.n):
            ids = [*self.renderer.tokenizer.encode_ids(str(k)), self.renderer.im_end_id]
            out.append(Completion(token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop"))
        return GenerateResult(completions=out, timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


def test_the_runner_sends_first_turns_of_a_group_as_one_request(renderer: Any) -> None:
    engine = CountingEngine(renderer)
    config = RunConfig(env="shapes", n_prompts=2, group=4, concurrency=8,
                       rollout=RolloutConfig(max_turns=2, max_tokens=4))
    summary = asyncio.run(run_rollouts(config, renderer, engine, progress=False, group_requests=True))
    assert summary.done == 8 and summary.failed == 0
    firsts = [n for n, _ in engine.seen if n > 1]
    # Each prompt's 4 first turns went as one; the members' answers differ, so later turns go one by one.
    assert firsts == [4, 4] and sum(n for n, _ in engine.seen) == summary.turns


async def test_with_members_a_batch_goes_when_they_have_all_joined_and_later_turns_go_straight(renderer: Any) -> None:
    server = FakeVLLM()
    request = msgspec.structs.replace(group_request(renderer, 10), session_id="g0")
    grouped = GroupedEngine(client(renderer, server), group=4, window_s=30.0, members={"g0": 3})
    # Three members of the session: sent as they join, not after the (long) window.
    results = await asyncio.wait_for(asyncio.gather(*(grouped.generate(seeded(request, k)) for k in range(3))), 5.0)
    assert server.requests == [3] and len(results) == 3
    # The same prompt again in that session (a later turn) is not held back for other members.
    await asyncio.wait_for(grouped.generate(seeded(request, 9)), 5.0)
    other = msgspec.structs.replace(request, session_id="unknown")  # a session not listed: alone
    await asyncio.wait_for(grouped.generate(other), 5.0)
    await grouped.close()
    assert server.requests == [3, 1, 1]


async def test_a_member_that_never_comes_holds_the_batch_only_for_the_window(renderer: Any) -> None:
    server = FakeVLLM()
    request = msgspec.structs.replace(group_request(renderer, 11), session_id="g1")
    grouped = GroupedEngine(client(renderer, server), group=4, window_s=0.05, members={"g1": 4})
    results = await asyncio.wait_for(asyncio.gather(*(grouped.generate(seeded(request, k)) for k in range(3))), 5.0)
    await grouped.close()
    assert server.requests == [3] and [len(r.completions) for r in results] == [1, 1, 1]


class SlowEngine(CountingEngine):
    """CountingEngine whose every request takes `delay_s`."""

    def __init__(self, renderer: Any, delay_s: float) -> None:
        super().__init__(renderer)
        self.delay_s = delay_s

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        await asyncio.sleep(self.delay_s)
        return await super().generate(request)


def test_a_groups_members_start_together_when_concurrency_splits_the_groups(
        renderer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrency 3, groups of 2: a group's second member must not wait for a slot while its first
    one waits for it in GroupedEngine (its window is short here, as a member that never came)."""
    import rollwire.rollout.runner as runner

    monkeypatch.setattr(runner, "GROUP_WINDOW_S", 0.05)
    engine = SlowEngine(renderer, delay_s=0.15)
    config = RunConfig(env="shapes", n_prompts=4, group=2, concurrency=3,
                       rollout=RolloutConfig(max_turns=2, max_tokens=4))
    summary = asyncio.run(run_rollouts(config, renderer, engine, progress=False, group_requests=True))
    assert summary.done == 8
    assert [n for n, _ in engine.seen if n > 1] == [2, 2, 2, 2] and sum(n for n, _ in engine.seen) == summary.turns
