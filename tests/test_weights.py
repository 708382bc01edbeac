"""Weight updates mid-run against real `rollwire serve` replicas: pause (wait for, or abort, the
turns in flight), the trainer's update while every server is paused, resume with a new version;
steps carry the version that sampled them and no rollout fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollwire.engines.pool import EnginePool
from rollwire.engines.server import EngineServer
from rollwire.engines.weights import PausableEngine
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


@pytest.fixture
def servers(replicas: list[EngineServer]) -> list[EngineServer]:
    return replicas


def config() -> RunConfig:
    return RunConfig(env="shapes", n_prompts=4, group=2, concurrency=4, seed=5,
                     rollout=RolloutConfig(max_turns=3, max_tokens=2))


async def _run_with_update(servers: list[EngineServer], renderer: Any, mode: Any) -> tuple[Any, list[Any], Any]:
    engine = PausableEngine(EnginePool.for_renderer([s.url for s in servers], renderer), version=0)
    results: list[Any] = []
    seen_in_apply: list[Any] = []
    received = [s.stats().images_received for s in servers]
    ok0 = sum(s.stats().ok for s in servers)

    def apply() -> None:  # the trainer's update: runs while every server is paused and nothing is in flight
        seen_in_apply.append(([s.pausing.paused for s in servers], len(engine._in_flight)))

    async def update_when_busy() -> None:
        while sum(s.stats().ok for s in servers) < ok0 + 6:
            await asyncio.sleep(0.01)
        await engine.update_weights(1, apply, mode=mode)

    async with engine:
        updater = asyncio.create_task(update_when_busy())
        summary = await run_rollouts(config(), renderer, engine, on_result=results.append, progress=False)
        await updater
    assert seen_in_apply == [([True, True], 0)]
    assert [s.pausing.paused for s in servers] == [False, False]
    assert [s.pausing.version for s in servers] == ["1", "1"]
    assert sum(s.stats().images_received - r for s, r in zip(servers, received, strict=True)) > 0
    return summary, results, engine


def _versions(results: list[Any]) -> list[list[Any]]:
    return [[step.policy_version for step in r.trajectory.steps] for r in results]


async def test_a_pause_update_resume_cycle_tags_steps_with_both_versions(
        servers: list[EngineServer], renderer: Any) -> None:
    summary, results, engine = await _run_with_update(servers, renderer, "wait")
    assert summary.done == 8 and summary.failed == 0  # no rollout failed across the update
    versions = _versions(results)
    flat = [v for vs in versions for v in vs]
    assert set(flat) == {0, 1} and flat.count(0) >= 6  # read back from the servers' weight_versions
    assert all(vs == sorted(vs) for vs in versions)  # within a rollout, old weights then new
    assert engine.updates == 1 and engine.resent == 0


async def test_abort_mode_resends_the_aborted_turns_with_the_new_weights(
        servers: list[EngineServer], renderer: Any) -> None:
    for s in servers:
        s.faults.delay_s = 0.2  # turns are in flight when the pause comes
    try:
        summary, results, engine = await _run_with_update(servers, renderer, "abort")
    finally:
        for s in servers:
            s.faults.delay_s = 0.0
    assert summary.done == 8 and summary.failed == 0
    assert engine.resent >= 1  # aborted turns went again, after the resume
    versions = _versions(results)
    assert {v for vs in versions for v in vs} == {0, 1} and all(vs == sorted(vs) for vs in versions)


async def test_a_paused_server_answers_503_and_reports_its_weight_version(servers: list[EngineServer]) -> None:
    server = servers[0]
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.post("/pause?mode=keep")).status_code == 400
        assert (await http.post("/pause?mode=wait")).json() == {"status": "paused"}
        assert (await http.get("/is_paused")).json() == {"is_paused": True}
        answer = await http.post("/inference/v1/generate", json={"token_ids": [1], "sampling_params": {}})
        assert answer.status_code == 503 and "paused" in answer.text
        assert (await http.post("/update_weight_version", json={"new_version": "7"})).status_code == 200
        assert (await http.post("/update_weight_version", json={})).status_code == 400
        await http.post("/resume")
        assert (await http.get("/weight_info")).json() == {"weight_version": "7"}
        assert (await http.get("/is_paused")).json() == {"is_paused": False}


def test_a_completion_keeps_the_servers_label_unless_the_server_could_not_be_relabelled() -> None:
    from rollwire.engines.types import Completion, GenerateResult, Timings
    from rollwire.engines.weights import _tagged

    result = GenerateResult(completions=[Completion(token_ids=[1], logprobs=None, finish_reason="stop",
                                                    policy_version="default"),
                                         Completion(token_ids=[2], logprobs=None, finish_reason="stop")],
                            timings=Timings(total_s=0.0))
    assert [c.policy_version for c in _tagged(result, 2, override=False).completions] == ["default", 2]
    assert [c.policy_version for c in _tagged(result, 2, override=True).completions] == [2, 2]
