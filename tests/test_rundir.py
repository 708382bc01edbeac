"""`run_to_dir` (what `rollwire rollout` runs), environments by import path, and the config file."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rollwire.config import RolloutSettings, read_config_file, resolve_settings
from rollwire.errors import ConfigFileError, EnvSpecError, RolloutConfigError
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, make_env, run_to_dir
from rollwire.rollout.envs.zoom import ZoomEnv
from rollwire.store import RunReader
from rollwire.testing import ScriptedEngine

CROP = '<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 60, 40]}}\n</tool_call>'


def not_an_env(**kwargs: Any) -> str:
    return "a string"


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


async def test_run_to_dir_writes_a_run_and_resumes(tiny: Callable[[str], Path], renderer: Any,
                                                   tmp_path: Path) -> None:
    model = tiny("qwen2_vl")
    config = RunConfig(env="rollwire.rollout.envs.zoom:ZoomEnv", n_prompts=2, group=2,
                       env_kwargs={"size": [120, 80]}, rollout=RolloutConfig(max_turns=3, max_tokens=64))
    engine = ScriptedEngine(renderer, [CROP, "ANSWER: 1"])
    out = tmp_path / "run"
    summary = await run_to_dir(config, out, model=model, renderer=renderer, engine=engine,
                               resolved={"note": "mine"})
    assert (summary.done, summary.failed, summary.turns) == (4, 0, 8)
    rows = list(RunReader(out).rows())
    assert sorted(r["id"] for r in rows) == sorted(f"rollwire.rollout.envs.zoom:ZoomEnv-s0-p{i}-g{j}"
                                                   for i in range(2) for j in range(2))
    trajectory = next(RunReader(out).trajectories())
    assert trajectory.env == "zoom" and len(trajectory.steps[1].images) == 2  # the crop came back
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["env"] == "rollwire.rollout.envs.zoom:ZoomEnv"
    assert manifest["settings"]["env_kwargs"] == {"size": [120, 80]}
    assert manifest["about"]["config"] == {"note": "mine"}
    # The run ends with its summary.json (what `rollwire inspect` shows): 4 rollouts, 2 turns each.
    figures = json.loads((out / "summary.json").read_text())
    assert figures["rollouts"]["done"] == 4 and figures["turns"]["total"] == 8
    (out / "summary.json").unlink()
    again = await run_to_dir(config, out, model=model, renderer=renderer, engine=ScriptedEngine(renderer, []))
    assert (again.skipped, again.done) == (4, 0)
    assert json.loads((out / "summary.json").read_text())["rollouts"]["done"] == 4  # written again on resume


class FreezeSeen(ScriptedEngine):
    """Records, at each request, how many objects the garbage collector has frozen."""

    frozen: list[int]

    async def generate(self, request: Any) -> Any:
        self.frozen.append(gc.get_freeze_count())
        return await super().generate(request)


async def test_freeze_heap_hides_the_start_up_heap_during_the_rollouts_only(
        tiny: Callable[[str], Path], renderer: Any, tmp_path: Path) -> None:
    config = RunConfig(env="rollwire.rollout.envs.zoom:ZoomEnv", n_prompts=1, group=1,
                       rollout=RolloutConfig(max_turns=1, max_tokens=64))
    assert gc.get_freeze_count() == 0
    engine = FreezeSeen(renderer, ["ANSWER: 1"])
    engine.frozen = []
    summary = await run_to_dir(config, tmp_path / "run", model=tiny("qwen2_vl"), renderer=renderer, engine=engine,
                               freeze_heap=True)
    assert summary.done == 1 and engine.frozen and min(engine.frozen) > 10_000  # modules, tokenizer, ...
    assert gc.get_freeze_count() == 0  # unfrozen when the rollouts end
    engine = FreezeSeen(renderer, ["ANSWER: 1"])
    engine.frozen = []
    await run_to_dir(config, tmp_path / "plain", model=tiny("qwen2_vl"), renderer=renderer, engine=engine)
    assert engine.frozen == [0]  # the library default leaves the caller's heap alone


@pytest.mark.parametrize(("spec", "kwargs", "needle"), [
    ("nosuchmodule_xyz:make", {}, "cannot import 'nosuchmodule_xyz'"),
    ("rollwire.rollout.envs.zoom:Nope", {}, "has no attribute 'Nope'"),
    ("rollwire.rollout.envs.zoom:ANSWER", {}, "is a Pattern, not callable"),
    ("test_rundir:not_an_env", {}, "returned a str, which is not an environment"),
    ("zoom", {"colour": "red"}, "does not take these arguments (colour)"),
    ("zoomm", {}, "unknown environment 'zoomm'"),
])
async def test_a_bad_environment_spec_fails_before_anything_is_written(
        tiny: Callable[[str], Path], renderer: Any, tmp_path: Path, spec: str, kwargs: dict[str, Any],
        needle: str) -> None:
    with pytest.raises(EnvSpecError) as info:
        make_env(spec, **kwargs)
    assert needle in str(info.value)
    with pytest.raises(EnvSpecError):
        await run_to_dir(RunConfig(env=spec, env_kwargs=kwargs), tmp_path / "run", model=tiny("qwen2_vl"),
                         renderer=renderer, engine=ScriptedEngine(renderer, []))
    assert not (tmp_path / "run").exists()


def test_an_import_path_factory_gets_its_arguments() -> None:
    env = make_env("rollwire.rollout.envs.zoom:ZoomEnv", size=(64, 48), max_reminders=1)
    assert isinstance(env, ZoomEnv) and env.size == (64, 48) and env.max_reminders == 1


def test_config_file_keys_flags_override_and_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('env = "zoom"\nout = "runs/a"\nn = 3\nmax-turns = 2\ntemperature = 1\n'
                    '[env_args]\nmax_reminders = 1\n')
    values = read_config_file(path)
    assert values == {"env": "zoom", "out": "runs/a", "prompts": 3, "max_turns": 2, "temperature": 1,
                      "env_args": {"max_reminders": 1}}
    s = resolve_settings(values, {"max_turns": 5, "seed": 9})
    assert (s.env, s.prompts, s.max_turns, s.seed, s.temperature) == ("zoom", 3, 5, 9, 1.0)
    assert s.group == RolloutSettings().group == 2  # neither gave it: the default
    with pytest.raises(ConfigFileError, match=r"unknown key 'max_turn' \(config file\)"):
        resolve_settings({**values, "max_turn": 2}, {})
    with pytest.raises(ConfigFileError, match=r"prompts: Input should be a valid integer"):
        resolve_settings({**values, "prompts": "3"}, {})
    with pytest.raises(ConfigFileError, match=r"group: Input should be greater than or equal to 1 \(flag\)"):
        resolve_settings(values, {"group": 0})
    with pytest.raises(RolloutConfigError, match="--out must be given"):
        resolve_settings({"env": "zoom"}, {})
    path.write_text("env = zoom\n")
    with pytest.raises(ConfigFileError, match="is not TOML"):
        read_config_file(path)
    with pytest.raises(ConfigFileError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")


def test_cli_config_file_with_flags_on_top(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rollwire.cli import app

    (tmp_path / "run.toml").write_text('env = "shapes"\nout = "run"\nprompts = 3\ngroup = 1\nmax_turns = 1\n'
                                       'max_tokens = 3\nprogress = false\n[env_args]\nturns = 1\n')
    monkeypatch.chdir(tmp_path)  # relative paths, as on the command line
    result = CliRunner().invoke(app, ["rollout", "--config", "run.toml", "-n", "2",
                                      "--env-args", '{"turns": 1, "size": [64, 48]}'])
    assert result.exit_code == 0, result.output
    assert "2 / 0 / 0 / 0" in result.output
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["settings"]["n_prompts"] == 2 and manifest["settings"]["env_kwargs"] == {"turns": 1,
                                                                                             "size": [64, 48]}
    config = manifest["about"]["config"]
    assert (config["env"], config["prompts"], config["max_tokens"], config["progress"]) == ("shapes", 2, 3, False)


def test_cli_refuses_an_unknown_config_key_before_anything_runs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rollwire.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text(f'env = "shapes"\nout = "{tmp_path / "run"}"\nmax_turn = 1\n')
    result = CliRunner().invoke(app, ["rollout", "--config", str(bad)])
    assert result.exit_code == 2 and "ConfigFileError: unknown key 'max_turn'" in result.output
    assert not (tmp_path / "run").exists()


def test_every_rollout_flag_is_a_config_key() -> None:
    """A flag added to `rollwire rollout` must be added to `RolloutSettings` too (and so to --config)."""
    import typer.main

    from rollwire.cli import app

    command = typer.main.get_command(app).commands["rollout"]  # type: ignore[attr-defined]
    assert {p.name for p in command.params} - {"config"} == set(RolloutSettings.model_fields)
