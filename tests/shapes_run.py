"""One real multi-turn run shared by the sample and adapter tests: the `shapes` environment (a new
picture and question each turn; 2 prompts x 2 samples x 3 turns) on the embedded engine with the
tiny random-weight qwen2_vl model, written to a run directory by `run_to_dir`, as `rollwire rollout` writes one."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_to_dir
from rollwire.rollout.types import Trajectory
from rollwire.store import RunReader
from rollwire.training import RopeIndex, Sample, SampleBuilder, samples_from_run

N_PROMPTS, GROUP, TURNS, MAX_TOKENS = 2, 2, 3, 5


@dataclasses.dataclass
class Run:
    model_dir: Path
    run_dir: Path
    reader: RunReader
    renderer: Any
    trajectories: dict[str, Trajectory]
    _rope: RopeIndex | None = None

    @property
    def rope(self) -> RopeIndex:
        if self._rope is None:
            self._rope = RopeIndex.from_model_dir(self.model_dir)
        return self._rope

    def samples(self, *, mrope: bool = False, **kwargs: Any) -> list[Sample]:
        return samples_from_run(self.reader, renderer=self.renderer, mrope=self.rope if mrope else False, **kwargs)

    def ragged(self, *, mrope: bool = False) -> list[Sample]:
        """Three real samples of different lengths: rollouts of the run cut after 1, 2 and 3 turns."""
        builder = SampleBuilder.for_renderer(self.renderer, temperature=1.0, rope_index=self.rope if mrope else None)
        out = []
        for turns, trajectory in zip((1, 2, 3), sorted(self.trajectories.values(), key=lambda t: t.id), strict=False):
            self.reader.load_features(builder.features, trajectory)  # type: ignore[arg-type]
            out += builder.build(msgspec.structs.replace(trajectory, steps=trajectory.steps[:turns]))
        assert len({len(s) for s in out}) == 3
        return out


@pytest.fixture(scope="session")
def shapes_run(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    model_dir = tiny("qwen2_vl")
    run_dir = tmp_path_factory.mktemp("shapes-run")
    renderer = create_renderer(model_dir)
    config = RunConfig(env="shapes", n_prompts=N_PROMPTS, group=GROUP, concurrency=6, seed=0,
                       rollout=RolloutConfig(max_turns=TURNS, max_tokens=MAX_TOKENS, temperature=1.0))

    summary = asyncio.run(run_to_dir(config, run_dir, model=model_dir, renderer=renderer))  # the embedded engine
    assert summary.ok and summary.done == N_PROMPTS * GROUP
    reader = RunReader(run_dir)
    return Run(model_dir, run_dir, reader, renderer, {t.id: t for t in reader.trajectories()})


@pytest.fixture(scope="session")
def qwen2_model(shapes_run: Run) -> Any:
    """The run's model, loaded by transformers, for forward passes over the samples."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        str(shapes_run.model_dir), dtype=torch.float32).eval()
