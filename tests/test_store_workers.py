"""Several writers in one run directory (Ray workers): each its own row and shard files, one
reader over all of them, resume across writers, and the locks that keep them apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollwire.errors import StoreError
from rollwire.features import FeatureStore
from rollwire.rollout.types import AssistantRecord, RolloutError, Step, Trajectory
from rollwire.store import RunReader, RunWriter


def traj(tid: str, *, failed: bool = False, version: int | None = None) -> Trajectory:
    step = Step(prompt_ids=[1, 2, 3], images=(), completion_ids=[4, 5], completion_logprobs=[-0.5, -0.25],
                finish_reason="stop", status="stop", message=AssistantRecord(content="x"), bridged=False,
                policy_version=version)
    error = RolloutError(kind="engine_error", message="boom", step=1) if failed else None
    return Trajectory(id=tid, env="t", prompt_index=0, sample_index=0, seed=0, steps=[step], error=error,
                      finish="error" if failed else "done")


def test_two_workers_write_at_once_and_one_reader_merges_them(tmp_path: Path) -> None:
    store = FeatureStore()
    with RunWriter(tmp_path, store, worker="w0") as a, RunWriter(tmp_path, store, worker="w1") as b:
        a.write(traj("p0", version=3))
        b.write(traj("p1", failed=True))
        a.write(traj("p2"))
        b.write(traj("p3", version="default"))
        with pytest.raises(StoreError, match="being written"):  # a single writer waits for them
            RunWriter(tmp_path, store)
        with pytest.raises(StoreError, match="another writer named 'w1'"):
            RunWriter(tmp_path, store, worker="w1")
    assert sorted(p.name for p in tmp_path.glob("rollouts*.jsonl")) == ["rollouts-w0.jsonl", "rollouts-w1.jsonl"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-w0-00000.bin", "shard-w1-00000.bin"]
    reader = RunReader(tmp_path)
    assert [r["id"] for r in reader.rows()] == ["p0", "p2", "p1", "p3"]  # file by file, in merge order
    assert {t.id: t.steps[0].policy_version for t in reader.trajectories()} == {
        "p0": 3, "p2": None, "p1": None, "p3": "default"}
    # Another worker (a rerun with other N) sees the merged done ids and retries only the failure;
    # its success supersedes the failed row that lives in another writer's file.
    with RunWriter(tmp_path, store, worker="w2") as c:
        assert c.done_ids == {"p0", "p2", "p3"}
        c.write(traj("p0"))  # done: skipped
        c.write(traj("p1"))
    rows = list(RunReader(tmp_path).rows(all_rows=True))
    assert [(r["id"], r["error"] is None, r["superseded"]) for r in rows] == [
        ("p0", True, False), ("p2", True, False), ("p1", False, True), ("p3", True, False), ("p1", True, False)]
    with RunWriter(tmp_path, store) as single:
        assert single.done_ids == {"p0", "p1", "p2", "p3"}


def test_a_torn_row_of_a_dead_worker_is_cut_by_the_next_writer_alone(tmp_path: Path) -> None:
    store = FeatureStore()
    with RunWriter(tmp_path, store, worker="w1") as w:
        w.write(traj("p0"))
    rows = tmp_path / "rollouts-w1.jsonl"
    rows.write_bytes(rows.read_bytes() + b'{"id": "p1", "half')  # killed mid-row
    with pytest.raises(StoreError, match="truncated"):
        list(RunReader(tmp_path).rows())
    with RunWriter(tmp_path, store, worker="w0") as w:  # alone: repairs every worker's file
        assert w.done_ids == {"p0"}
    assert [json.loads(line)["id"] for line in rows.read_text().splitlines()] == ["p0"]
    with pytest.raises(StoreError, match="worker name"):
        RunWriter(tmp_path, store, worker="../x")
