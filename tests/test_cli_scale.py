"""`rollwire rollout --group-requests` and `--workers N` as a user runs them (a subprocess of the CLI),
against `rollwire serve`'s engine server, whose request and image counters are the evidence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from rollwire.config import read_config_file, resolve_settings
from rollwire.engines import content_parts as cp
from rollwire.engines.server import EngineServer
from rollwire.render import create_renderer
from rollwire.store import RunReader
from test_cli import run

PROMPTS, GROUP = 2, 4


def unique_images(out: Path) -> set[str]:
    return {i for t in RunReader(out).trajectories() for i in t.image_ids}


def test_group_requests_send_a_groups_first_turn_as_one_request(
        cache_dir: Path, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    model, out = tiny("qwen2_vl"), tmp_path / "run"
    with EngineServer(model) as server:
        proc = run("rollout", "--env", "shapes", "--model", str(model), "--server", server.url,
                   "-n", str(PROMPTS), "--group", str(GROUP), "--concurrency", "8", "--max-turns", "2",
                   "--max-tokens", "4", "--group-requests", "--out", str(out), "--no-progress", cache=cache_dir)
        stats = server.stats()
    assert proc.returncode == 0, proc.stderr
    assert f"{PROMPTS * GROUP} / 0 / 0 / 0" in proc.stdout
    rows = list(RunReader(out).rows())
    assert len(rows) == PROMPTS * GROUP and all(r["error"] is None and r["turns"] >= 1 for r in rows)
    turns = sum(r["turns"] for r in rows)
    # Each group's four first turns went as one n=4 request; every later turn went on its own.
    assert stats.requests == stats.ok == turns - PROMPTS * (GROUP - 1)
    assert stats.images_received == len(unique_images(out))  # each image once
    recorded = json.loads((out / "run.json").read_text())["about"]["config"]
    assert recorded["group_requests"] is True and recorded["group"] == GROUP


def test_group_requests_is_a_config_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('env = "shapes"\nout = "x"\ngroup-requests = true\n')
    assert resolve_settings(read_config_file(path), {}).group_requests is True
    assert resolve_settings(read_config_file(path), {"group_requests": False}).group_requests is False


def test_workers_run_on_a_local_ray_cluster_with_the_wire_and_group_requests_given(
        cache_dir: Path, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """`--workers 2` starts a local Ray cluster; both workers write their own files, and each one
    sends images as `--wire content-parts` says (the image bytes are the PNG data URLs, not the
    features) and a group's first turn as one request."""
    pytest.importorskip("ray")
    model, out = tiny("qwen2_vl"), tmp_path / "run"
    with EngineServer(model) as server:
        proc = run("rollout", "--env", "shapes", "--model", str(model), "--server", server.url, "--workers", "2",
                   "-n", "2", "--group", "2", "--max-turns", "2", "--max-tokens", "3", "--wire", "content-parts",
                   "--group-requests", "--out", str(out), "--no-progress", cache=cache_dir)
        stats = server.stats()
    assert proc.returncode == 0, proc.stderr
    assert "4 / 0 / 0 / 0" in proc.stdout
    assert (out / "rollouts-w0.jsonl").is_file() and (out / "rollouts-w1.jsonl").is_file()
    reader = RunReader(out)
    rows = list(reader.rows())
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    assert stats.requests == sum(r["turns"] for r in rows) - 2  # one request for each group's first turn
    renderer = create_renderer(model)
    store = renderer.feature_store
    assert store is not None
    ids = unique_images(out)
    assert stats.images_received == len(ids)
    png = sum(len(cp.image_url(reader.features(i), store.config)) for i in ids)
    sent = sum(t.metrics["image_bytes_sent"] for t in reader.trajectories())
    assert sent == png  # content_parts: each image once, as its PNG data URL
