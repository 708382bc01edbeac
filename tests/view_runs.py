"""Real run directories for the viewer's tests, made once per session with the embedded engine:

- `shapes`: `rollwire rollout --env shapes -n 2 --group 2` through the CLI;
- `zoom`: `run_to_dir` (what the CLI runs) with `testing.ScriptedEngine` playing the policy, so
  the rollouts call the `crop` tool and get the crop back as an image (random weights never do);
- `hostile`: `run_to_dir` with the embedded engine, on an environment whose messages hold markup that
  would break or inject into a page (`</script>`, `<img onerror>`, `</style>`), 1024² images
  (noise, the worst case for a thumbnail's size; one RGBA), a GRPO group sharing its prompt's
  images, rewards per step, and a prompt whose environment fails (an `env_error` row).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rollwire.cli import app
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer
from rollwire.rollout import EnvStep, Observation, RolloutConfig, RunConfig, register, run_to_dir
from rollwire.testing import ScriptedEngine

SCRIPT = "</script><script>window.pwned = 1;</script>"
MARKUP = '<img src=x onerror="window.pwned = 2"> &amp; <!-- <b>not bold</b>'
STYLE = "</style><style>body{display:none}</style>"
ENV_FAILURE = "environment broke: </script><b>bold</b>"
BIG = 1024
CROP = '<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 60, 40]}}\n</tool_call>'
ANSWER = "ANSWER: 123"


def noise(size: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, len(mode)), dtype=np.uint8), mode)


class HostileEnv:
    """Two turns; odd seeds fail in the first step. Rewards 0.5 then 1.0."""

    name = "view-hostile"

    def __init__(self, size: int = BIG) -> None:
        self.size = size
        self.seed = 0
        self.turn = 0

    async def reset(self, seed: int) -> Observation:
        self.seed, self.turn = seed, 0
        user = Message(role="user", content=(ImagePart(noise(self.size, seed)), ImagePart(noise(self.size, seed + 500)),
                                             TextPart(MARKUP)))
        return Observation(messages=[Message(role="system", content=SCRIPT), user], info={"note": SCRIPT})

    async def step(self, message: Message) -> EnvStep:
        self.turn += 1
        if self.seed % 2:
            raise RuntimeError(ENV_FAILURE)
        if self.turn == 1:
            rgba = noise(self.size, 1000 + self.seed, "RGBA")
            return EnvStep(reward=0.5, messages=[Message(role="user", content=(ImagePart(rgba), TextPart(STYLE)))])
        return EnvStep(reward=1.0, done=True)


register(HostileEnv.name, HostileEnv)


def downscaling_model(model_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model whose processor shrinks images to at most 448² (as deployments set
    max_pixels): the run archives 1024² originals while the model sees 256 tokens per image."""
    shutil.copytree(model_dir, dest)
    path = dest / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["max_pixels"] = 448 * 448
    path.write_text(json.dumps(config))
    return dest


_BUILT: dict[str, Path] = {}  # the runs, made once even though two test modules import the fixture


@pytest.fixture(scope="session")
def view_runs(tmp_path_factory: pytest.TempPathFactory, tiny: Callable[[str], Path]) -> dict[str, Path]:
    if not _BUILT:
        _BUILT.update(_build(tmp_path_factory.mktemp("view-runs"), tiny("qwen2_vl")))
    return dict(_BUILT)


def _build(root: Path, model_dir: Path) -> dict[str, Path]:
    shapes = root / "shapes"
    result = CliRunner().invoke(app, ["rollout", "--env", "shapes", "-n", "2", "--group", "2", "--out", str(shapes),
                                      "--model", str(model_dir), "--no-progress", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    renderer = create_renderer(model_dir)
    zoom = root / "zoom"
    config = RunConfig(env="zoom", n_prompts=2, group=1, rollout=RolloutConfig(max_turns=3, max_tokens=64))
    asyncio.run(run_to_dir(config, zoom, model=model_dir, renderer=renderer,
                           engine=ScriptedEngine(renderer, [CROP, ANSWER])))
    hostile = root / "hostile"
    config = RunConfig(env=HostileEnv.name, n_prompts=2, group=2, seed=0,
                       rollout=RolloutConfig(max_turns=3, max_tokens=6, max_total_tokens=8192))
    asyncio.run(run_to_dir(config, hostile, model=downscaling_model(model_dir, root / "model-448")))
    return {"shapes": shapes, "zoom": zoom, "hostile": hostile}
