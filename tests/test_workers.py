"""Rollout workers on a local Ray cluster (2 workers, the embedded tiny model): each writes its own
row and shard files into one run directory, RunReader merges them, a worker that dies loses only
its in-flight rollouts, and a rerun with another number of workers redoes only what is missing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rollwire.features import FeatureStore
from rollwire.rollout import RolloutConfig, RunConfig
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
