"""The run directory: round trip, honest JSON, corruption refused, and crash safety with a real
killed subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from rollwire.engines.local import LocalEngine
from rollwire.features import FeatureStore
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.store import ROWS, RunReader, RunWriter, StoreError
from rollwire.training import SampleBuilder


@pytest.fixture(scope="module")
def produced(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real run (shapes, 3 prompts x 2 samples, 2 turns) written to a run directory."""
    model_dir = tiny("qwen2_vl")
    renderer = create_renderer(model_dir)
    run_dir = tmp_path_factory.mktemp("run")
    results: list[Any] = []

    async def go() -> None:
        engine = LocalEngine(model_dir, feature_store=renderer.feature_store)
        with RunWriter(run_dir, renderer.feature_store) as writer:
            def keep(r: Any) -> None:
                results.append(r)
                writer.write(r.trajectory, r.originals)
            await run_rollouts(RunConfig(env="shapes", n_prompts=3, group=2, concurrency=6,
                                         rollout=RolloutConfig(max_turns=2, max_tokens=5), env_kwargs={"turns": 2}),
                               renderer, engine, on_result=keep, progress=False)
        await engine.close()

    asyncio.run(go())
    return {"dir": run_dir, "results": results, "renderer": renderer}


def test_round_trip(produced: dict[str, Any]) -> None:
    reader = RunReader(produced["dir"])
    rows = list(reader.rows())
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    by_id = {r.trajectory.id: r.trajectory for r in produced["results"]}
    store = produced["renderer"].feature_store
    for row in rows:
        t = reader.trajectory(row)
        assert msgspec.to_builtins(t) == msgspec.to_builtins(by_id[t.id])
        assert row["image_ids"] == t.image_ids and row["turns"] == len(t.steps)
        for image_id in t.image_ids:
            np.testing.assert_array_equal(reader.features(image_id).pixel_values, store.get(image_id).pixel_values)
            # the archived original is the same picture: processing it again gives the same id
            assert FeatureStore(store.config).get_or_process(reader.image(image_id)).id == image_id
    # each unique image is on disk once, however many rollouts refer to it
    blobs = list((produced["dir"] / "blobs").rglob("*.features"))
    assert len(blobs) == len({i for r in rows for i in r["image_ids"]}) < sum(len(r["image_ids"]) for r in rows)


def test_samples_from_a_run_directory_alone(produced: dict[str, Any]) -> None:
    """A trainer needs nothing but the run directory (features come from its blobs)."""
    reader = RunReader(produced["dir"])
    renderer = produced["renderer"]
    store = FeatureStore(renderer.feature_store.config)
    builder = SampleBuilder(store, image_pad_id=renderer.image_pad_id, merge_size=2)
    for t in reader.trajectories():
        reader.load_features(store, t)
        samples = builder.build(t)
        assert len(samples) == 1 and samples[0].num_loss_tokens == sum(len(s.completion_ids) for s in t.steps)


def test_rows_are_honest_json(produced: dict[str, Any], tmp_path: Path) -> None:
    t = produced["results"][0].trajectory
    bad = msgspec.structs.replace(t, id="nan-row", reward=float("nan"))
    with RunWriter(tmp_path, produced["renderer"].feature_store) as writer, \
            pytest.raises(StoreError, match="column 'reward'"):
        writer.write(bad)
    assert not (tmp_path / ROWS).read_text()  # nothing committed


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corruption_is_refused(produced: dict[str, Any], tmp_path: Path) -> None:
    run = copy_run(produced["dir"], tmp_path / "c1")
    row = next(RunReader(run).rows())
    shard = run / "shards" / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="CRC"):
        RunReader(run).trajectory(row)
    shard.write_bytes(bytes(data[: row["offset"] + 30]))
    with pytest.raises(StoreError, match="truncated"):
        RunReader(run).trajectory(row)
    blob = next((run / "blobs").rglob("*.features"))
    raw = bytearray(blob.read_bytes())
    raw[-5] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupted"):
        RunReader(run).features(blob.stem)


def test_a_torn_last_row_is_cut_on_reopen(produced: dict[str, Any], tmp_path: Path) -> None:
    run = copy_run(produced["dir"], tmp_path / "c2")
    rows = (run / ROWS).read_bytes()
    (run / ROWS).write_bytes(rows + b'{"id": "half-writ')
    with pytest.raises(StoreError, match="truncated"):
        list(RunReader(run).rows())
    with RunWriter(run, produced["renderer"].feature_store) as writer:
        assert len(writer.done_ids) == 6
    assert (run / ROWS).read_bytes() == rows


def cli(*args: str, cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "ROLLWIRE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "rollwire.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killing_the_process_loses_only_rollouts_in_flight(cache_dir: Path, tiny: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    tiny("qwen2_vl")
    run = tmp_path / "killed"
    args = ("rollout", "--env", "shapes", "-n", "10", "--group", "2", "--max-turns", "2", "--max-tokens", "4",
            "--concurrency", "2", "--out", str(run), "--no-progress")
    proc = cli(*args, cache=cache_dir)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = (run / ROWS).read_text().count("\n") if (run / ROWS).exists() else 0
        if rows >= 4 or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read() if proc.stderr else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader = RunReader(run)
    committed = [r["id"] for r in reader.rows()]
    assert 4 <= len(committed) < 20
    for t in reader.trajectories():  # everything committed is whole
        assert t.steps and all(reader.features(i).id == i for i in t.image_ids)
    done = cli(*args, cache=cache_dir)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert f"{20 - len(committed)} / 0 / 0 / {len(committed)}" in out  # done / failed / unwritten / resumed
    ids = [r["id"] for r in RunReader(run).rows()]
    assert len(ids) == len(set(ids)) == 20 and ids[: len(committed)] == committed
    assert len(list(RunReader(run).trajectories())) == 20
    assert json.loads((run / ROWS).read_text().splitlines()[-1])["finish"] in ("done", "max_turns")


def test_the_run_keeps_qwen_features_once_per_frame(produced: dict[str, Any]) -> None:
    """The writer passes the processor's repeated frames: each blob holds one of Qwen2-VL's two."""
    store = produced["renderer"].feature_store
    blobs = list((produced["dir"] / "blobs").rglob("*.features"))
    assert blobs
    for blob in blobs:
        data = blob.read_bytes()
        assert data[:4] == b"RWF2"
        assert len(data) < 0.55 * store.get(blob.stem).pixel_values.nbytes
