"""docs/write-an-environment.md runs as written: its files are extracted, its command is run
through the real CLI (embedded engine), and its test is run, so the page cannot rot."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import doc_blocks
from rollwire.config import read_config_file, resolve_settings

PAGE = "write-an-environment.md"


def files() -> dict[str, str]:
    return doc_blocks.files(PAGE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("doc")
    for name, body in files().items():
        (folder / name).write_text(body)
    return folder


def test_the_environment_is_about_40_lines() -> None:
    code = [line for line in files()["mymod.py"].splitlines() if line.strip()]
    assert len(code) <= 50, len(code)


def commands() -> list[list[str]]:
    return [args for args in doc_blocks.rollwire_commands(PAGE) if args[0] == "rollout"]


def test_the_command_runs_through_the_cli(workdir: Path, cache_dir: Path) -> None:
    args = commands()[0]
    env = {**os.environ, "ROLLWIRE_CACHE": str(cache_dir), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rollwire.cli", *args, "--no-progress"], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "4 / 0 / 0 / 0" in proc.stdout  # -n 2 --group 2: four rollouts done, none failed
    rows = [json.loads(line) for line in (workdir / "runs" / "dots" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["env"] for r in rows} == {"dots"}
    manifest = json.loads((workdir / "runs" / "dots" / "run.json").read_text())
    assert manifest["settings"]["env"] == "mymod:make_env" and manifest["settings"]["env_kwargs"] == {"max_zooms": 1}
    # the TOML block says the same as the command's flags
    toml = resolve_settings(read_config_file(workdir / "rollout.toml"), {})
    config = manifest["about"]["config"]
    for key in ("env", "out", "prompts", "group", "max_tokens", "env_args"):
        assert getattr(toml, key) == config[key], key


def test_the_scripted_test_passes(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(workdir))
    for name in ("mymod", "test_mymod"):
        sys.modules.pop(name, None)
    module = importlib.import_module("test_mymod")
    module.test_the_zoom_tool_returns_an_image()


def test_the_dataset_command_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from rollwire.cli import app
    from rollwire.store import RunReader

    args = next(a for a in commands() if "dataset" in a)
    (workdir / "rows.jsonl").write_text(doc_blocks.blocks(PAGE, "jsonl")[0])
    Image.new("RGB", (64, 48), "white").save(workdir / "dots.png")
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    result = CliRunner().invoke(app, [*args, "--max-tokens", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    trajectories = sorted(RunReader(workdir / "runs" / "data").trajectories(),
                          key=lambda t: (t.prompt_index, t.sample_index))
    assert [t.prompt_index for t in trajectories] == [0, 0, 1, 1]  # -n 2, the default group of 2
    assert all(t.error is None and len(t.steps) == 1 and len(t.steps[0].images) == 1 for t in trajectories)
    assert [m["role"] for m in trajectories[2].messages] == ["system", "user", "assistant"]
