"""Rollout workers on a local Ray cluster (2 workers, the embedded tiny model): each writes its own
row and shard files into one run directory, RunReader merges them, a worker that dies loses only
its in-flight rollouts, and a rerun with another number of workers redoes only what is missing.
A driver-side weight update (`RayWeightGate`) pauses both workers against `rollwire serve` replicas."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, SamplingParams, Timings
from rollwire.errors import EngineTimeoutError
from rollwire.features import FeatureStore
from rollwire.rollout import RolloutConfig, RunConfig
from rollwire.rollout.ray_gate import RayWeightGate, follow_gate
from rollwire.rollout.runner import trajectory_id
from rollwire.rollout.workers import merge_summaries, run_on_ray, split_ids
from rollwire.store import RunReader, RunWriter

ray = pytest.importorskip("ray")

ENV = "dying_env:DyingShapes"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_DEDUP_LOGS": "0"}})
    try:
        yield ray
    finally:
        ray.shutdown()


def config(marker: Path, **kw: Any) -> RunConfig:
    return RunConfig(env=ENV, n_prompts=6, group=1, concurrency=1, seed=0,
                     env_kwargs={"marker": str(marker), "die_seed": 3},
                     rollout=RolloutConfig(max_turns=2, max_tokens=2), **kw)


def test_a_dead_worker_loses_only_its_in_flight_rollouts_and_a_rerun_with_other_n_finishes(
        cluster: Any, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    model, out, marker = tiny("qwen2_vl"), tmp_path / "run", tmp_path / "died"
    cfg = config(marker)
    ids = [trajectory_id(cfg, i, 0) for i in range(6)]
    assert split_ids(cfg, set(), 2) == [ids[0::2], ids[1::2]]  # whole groups, balanced

    summary, lost = run_on_ray(cfg, out, model=model, workers=2, max_retries=0)
    assert marker.exists()  # worker w1 died at prompt 3 (its process exited mid-rollout)
    assert len(lost) == 1 and lost[0].startswith("worker w1 (3 rollouts) was lost")
    assert summary.done == 3 and summary.failed == 0  # w0's share, all of it
    rows = {r["id"] for r in RunReader(out).rows()}
    assert rows == {ids[0], ids[2], ids[4], ids[1]}  # w1 kept what it committed before it died
    assert (out / "rollouts-w0.jsonl").is_file() and (out / "rollouts-w1.jsonl").is_file()
    assert {p.name.split("-")[1] for p in (out / "shards").glob("shard-*.bin")} == {"w0", "w1"}

    summary, lost = run_on_ray(cfg, out, model=model, workers=1)  # another N: only the missing two
    assert lost == [] and summary.skipped == 4 and summary.done == 2 and summary.failed == 0
    reader = RunReader(out)
    rows_all = list(reader.rows(all_rows=True))
    assert sorted(r["id"] for r in rows_all) == sorted(ids)  # each rollout once, none twice
    assert all(r["error"] is None for r in rows_all)
    assert [t.id for t in reader.trajectories()] and all(len(t.steps) == 2 for t in reader.trajectories())
    # A single writer afterwards sees the merged run: nothing left to do.
    with RunWriter(out, FeatureStore()) as writer:
        assert writer.done_ids == set(ids)


def test_summaries_merge() -> None:
    a = {"done": 2, "failed": 1, "turns": 5, "errors": {"env_error": 1}, "error_messages": {"x": 1}}
    b = {"done": 3, "turns": 7, "errors": {"env_error": 2}, "error_messages": {"x": 2, "y": 1}}
    total = merge_summaries([a, b], skipped=4, seconds=2.0)
    assert (total.done, total.failed, total.turns, total.skipped) == (5, 1, 12, 4)
    assert total.errors == {"env_error": 3} and total.top_errors(1) == [("x", 3)]
    assert total.rollouts_per_second == 3.0


@pytest.mark.parametrize("mode", ["wait", "abort"])
async def test_a_driver_side_update_pauses_every_worker_and_each_server_once(
        cluster: Any, replicas: list[Any], tiny: Callable[[str], Path], tmp_path: Path, mode: str) -> None:
    cfg = RunConfig(env="shapes", n_prompts=4, group=2, concurrency=2, seed=5,
                    rollout=RolloutConfig(max_turns=3, max_tokens=2))
    pauses = [s.pausing.pauses for s in replicas]
    seen_in_apply: list[Any] = []

    refused = [s.pausing.refused for s in replicas]

    async def apply() -> None:  # the trainer's update: every server paused, nothing running on any
        await asyncio.sleep(0.3)  # (a weight push takes a while; a worker that kept sending would be refused)
        seen_in_apply.append(([s.pausing.paused for s in replicas],
                              [s.pausing.in_flight for s in replicas] if mode == "wait" else None))

    def ok() -> int:
        return sum(s.stats().ok for s in replicas)

    for s in replicas:  # slow until both workers follow the gate: one that starts first cannot finish alone
        s.faults.delay_s = 2.0
    try:
        with RayWeightGate(version=0) as gate:
            run = asyncio.ensure_future(asyncio.to_thread(
                run_on_ray, cfg, tmp_path / "run", model=tiny("qwen2_vl"), workers=2,
                servers=[s.url for s in replicas], weights=gate))
            deadline = time.monotonic() + 40
            while len((await gate.report())["workers"]) < 2:  # both workers follow the gate
                assert time.monotonic() < deadline and not run.done(), "the workers did not join the gate"
                await asyncio.sleep(0.02)
            for s in replicas:  # turns are in flight when the pause comes
                s.faults.delay_s = 0.1 if mode == "wait" else 0.3
            ok0 = ok()
            while ok() < ok0 + 4:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # those answers reach their rollouts; the next turns are in flight
            await gate.update_weights(1, apply, mode=mode)  # type: ignore[arg-type]
            summary, lost = await run
            report = await gate.report()
    finally:
        for s in replicas:
            s.faults.delay_s = 0.0
    assert lost == [] and summary.done == 8 and summary.failed == 0  # no rollout failed across the update
    assert seen_in_apply == [([True, True], [0, 0] if mode == "wait" else None)]
    # Every worker's gate closed before the servers paused: no request came while they were paused.
    assert [s.pausing.refused - r for s, r in zip(replicas, refused, strict=True)] == [0, 0]
    assert [s.pausing.pauses - p for s, p in zip(replicas, pauses, strict=True)] == [1, 1]  # each server once
    assert [s.pausing.paused for s in replicas] == [False, False]
    assert [s.pausing.version for s in replicas] == ["1", "1"]
    versions = [[step.policy_version for step in t.steps] for t in RunReader(tmp_path / "run").trajectories()]
    flat = [v for vs in versions for v in vs]
    assert len(versions) == 8 and set(flat) == {0, 1}, versions  # read back from the servers' weight_versions
    assert flat.count(0) >= 4, versions  # the turns answered before the update
    assert all(vs == sorted(vs) for vs in versions), versions  # within a rollout, old weights then new
    stats = report["stats"]
    assert sorted(stats) == ["w0", "w1"] and report["workers"] == []  # both left when done
    assert [(st["updates"], st["policy_version"]) for st in stats.values()] == [(1, 1), (1, 1)]  # a new epoch each
    resent = sum(st["resent"] for st in stats.values())
    assert resent >= 1 if mode == "abort" else resent == 0  # aborted turns went again, after the resume


class HeldEngine:
    """An engine whose answers wait for `release` (a turn that is still in flight), for fault injection."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.closed = False

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        await self.release.wait()
        return GenerateResult(completions=[Completion(token_ids=[1], logprobs=None, finish_reason="stop")],
                              timings=Timings(total_s=0.0))

    async def close(self) -> None:
        self.closed = True


async def test_a_worker_joining_during_a_pause_starts_closed_and_a_busy_one_times_out_with_gates_reopened(
        cluster: Any) -> None:
    request = GenerateRequest(prompt_token_ids=(1, 2), sampling=SamplingParams(max_tokens=1))
    with RayWeightGate(version=3, timeout_s=0.5) as gate:
        await gate.pause_generation("wait")  # no worker yet: nothing to wait for
        inner = HeldEngine()
        inner.release.set()
        async with follow_gate(gate.name, "late", inner) as engine:  # a worker's side, in this process
            pending = asyncio.ensure_future(engine.generate(request))
            await asyncio.sleep(0.3)
            assert not pending.done()  # it joined during the pause: its gate is closed
            await gate.resume_generation(4)
            result = await asyncio.wait_for(pending, 10)
            assert [c.policy_version for c in result.completions] == [4]  # no server label: the gate's

            inner.release.clear()  # a turn in flight that does not finish: the pause cannot complete
            stuck = asyncio.ensure_future(engine.generate(request))
            await asyncio.sleep(0.1)
            with pytest.raises(EngineTimeoutError, match=r"\['late'\] did not pause within 0.5 s"):
                await gate.pause_generation("wait")
            report = await gate.report()
            assert report["paused"] is False and report["version"] == 4 and report["workers"] == ["late"]
            inner.release.set()
            assert [c.policy_version for c in (await asyncio.wait_for(stuck, 10)).completions] == [4]
            again = await asyncio.wait_for(engine.generate(request), 10)  # its gate reopened when told to resume
            assert [c.policy_version for c in again.completions] == [4]
        assert inner.closed and (await gate.report())["workers"] == []  # it left the gate on exit
