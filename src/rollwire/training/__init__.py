"""Trajectories to training samples, GRPO advantages, padded batches (see `rollwire.adapters` for
the formats of prime-rl, verl and SkyRL)."""

from rollwire.training.collate import collate
from rollwire.training.grpo import grpo_advantages, with_advantages
from rollwire.training.rope import RopeIndex
from rollwire.training.run import samples_from_run
from rollwire.training.samples import (
    PixelFormat,
    Sample,
    SampleBuilder,
    TensorKind,
    build_samples,
    group_id,
    prompt_id,
    step_extends,
)

__all__ = ["PixelFormat", "RopeIndex", "Sample", "SampleBuilder", "TensorKind", "build_samples", "collate",
           "group_id", "grpo_advantages", "prompt_id", "samples_from_run", "step_extends", "with_advantages"]
