"""The command line, run as a user runs it (a real subprocess, the installed entry point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rollwire.render import create_renderer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "conversation.json"


def run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROLLWIRE_CACHE": str(cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "rollwire.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_render_json_matches_the_library(cache_dir: Path, tiny: Callable[[str], Path]) -> None:
    proc = run("render", "--messages", str(EXAMPLE), "--json", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    renderer = create_renderer(tiny("qwen2_vl"))
    messages = json.loads(EXAMPLE.read_text())["messages"]
    for m in messages:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p["type"] == "image":
                    p["image"] = str(EXAMPLE.parent / p["image"])
    expected = renderer.render(messages)
    assert out["token_ids"] == list(expected.token_ids)
    assert out["images"] == [{"id": r.id, "offset": r.offset, "length": r.length, "grid_thw": list(r.grid_thw)}
                             for r in expected.images]
    assert len(out["images"]) == 2


def test_render_text_marks_image_spans(cache_dir: Path) -> None:
    proc = run("render", "--messages", str(EXAMPLE), cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "[[image " in proc.stdout and "12 pad tokens, grid 1x6x8" in proc.stdout
    assert "How many shapes are in this picture?" in proc.stdout


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("not json", "is not JSON"),
        ('[{"role": "wizard", "content": "x"}]', "UnknownRoleError"),
        ('[{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}]', "ImageNotFoundError"),
    ],
)
def test_bad_input_exits_2_with_a_typed_error(cache_dir: Path, tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "m.json"
    f.write_text(content)
    proc = run("render", "--messages", str(f), cache=cache_dir)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_model_command_writes_a_loadable_directory(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = run("tiny-model", "qwen2_5_vl", str(out), cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert create_renderer(out).family == "qwen2_5_vl"


def test_rollout_against_a_server(cache_dir: Path, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """`rollwire rollout --server URL` (here `rollwire serve`'s engine server) writes a readable run."""
    from rollwire.engines.server import EngineServer
    from rollwire.store import RunReader

    model_dir = tiny("qwen2_vl")
    out = tmp_path / "run"
    with EngineServer(model_dir) as server:
        proc = run("rollout", "--env", "zoom", "--model", str(model_dir), "--server", server.url, "-n", "3",
                   "--group", "2", "--max-turns", "2", "--max-tokens", "4", "--out", str(out), "--no-progress",
                   cache=cache_dir)
        received = server.stats().images_received
    assert proc.returncode == 0, proc.stderr
    assert "6 / 0 / 0 / 0" in proc.stdout
    rows = list(RunReader(out).rows())
    assert len(rows) == 6 and all(r["turns"] == 2 for r in rows)
    # 3 prompts, one picture each, shared by their group: the server received at most one copy per
    # concurrent first request of a group, never one per turn
    assert 3 <= received <= 6


def test_rollout_exit_codes_resume_and_manifest(cache_dir: Path, tmp_path: Path) -> None:
    """0 when every rollout is done and written; a rerun with other settings is refused (2).
    (Resume itself is tested through the library in test_run_integrity.py.)"""
    out = tmp_path / "run"
    args = ("rollout", "--env", "shapes", "-n", "2", "--group", "1", "--max-turns", "1", "--max-tokens", "3",
            "--out", str(out), "--no-progress")
    proc = run(*args, cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "2 / 0 / 0 / 0" in proc.stdout and (out / "run.json").is_file()
    proc = run(*args, "--temperature", "0.5", "--max-tokens", "5", cache=cache_dir)
    assert proc.returncode == 2
    assert "ManifestMismatchError" in proc.stderr and "sampling.temperature" in proc.stderr
    assert "max_tokens" in proc.stderr
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 2  # nothing appended


def test_rollout_against_an_unreachable_server_exits_2(cache_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run("rollout", "--env", "shapes", "-n", "1", "--server", f"http://127.0.0.1:{port}",
               "--retry-deadline", "0.5", "--out", str(tmp_path / "run"), "--no-progress", cache=cache_dir)
    assert proc.returncode == 2 and "ServerError" in proc.stderr and "gave up" in proc.stderr
    assert not (tmp_path / "run" / "rollouts.jsonl").exists()


def test_rollout_with_failed_rollouts_exits_3_and_names_the_errors(
        cache_dir: Path, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    from rollwire.engines.server import EngineServer, Faults

    faults = Faults()
    with EngineServer(tiny("qwen2_vl"), faults=faults) as server:
        faults.status, faults.fail_next = 400, 10**6  # every generate request is refused
        proc = run("rollout", "--env", "shapes", "--model", str(tiny("qwen2_vl")), "--server", server.url,
                   "-n", "2", "--group", "1", "--max-turns", "1", "--out", str(tmp_path / "run"), "--no-progress",
                   cache=cache_dir)
    assert proc.returncode == 3, proc.stderr
    assert "0 / 2 / 0 / 0" in proc.stdout
    assert "most common errors" in proc.stderr and "2 × engine_error: InvalidRequestError" in proc.stderr
