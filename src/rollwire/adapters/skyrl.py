"""SkyRL's `GeneratorOutput` (skyrl 0.4.0, skyrl/train/generators/base.py): one row per sample.

`prompt_token_ids` / `response_ids` split each sample at its first trained token; `loss_masks`
are 0 on the environment's tokens inside the response; `rollout_logprobs` align with
`response_ids`. `rewards` are one float per row, or with `token_rewards=True` one per response
token with the reward on the last one. Vision rows carry `pixel_values` / `image_grid_thw` as
one tensor per row (torch, as SkyRL's generator gives them). The keys SkyRL fills elsewhere
(timings, expert routes, step-wise flags) are None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rollwire.adapters._common import image_arrays, split
from rollwire.errors import SampleError
from rollwire.training import Sample
from rollwire.training.samples import _import_torch

__all__ = ["skyrl_generator_output"]


def skyrl_generator_output(samples: Sequence[Sample], *, token_rewards: bool = False,
                           trajectory_id: Callable[..., Any] | None = None) -> dict[str, Any]:
    """A `GeneratorOutput` dict. `trajectory_id` (SkyRL's `TrajectoryID` class, say) is called with
    `instance_id=` the sample's group id and `repetition_id=` its sample index for each row."""
    if not samples:
        raise SampleError("skyrl_generator_output needs at least one sample")
    prompts, responses, masks, logprobs, rewards, stops = [], [], [], [], [], []
    for k, sample in enumerate(samples):
        p, r, m, lp = split(sample)
        if sample.reward is None:
            raise SampleError(f"sample {k} ({sample.trajectory_id}) has no reward")
        prompts.append(p.tolist())
        responses.append(r.tolist())
        masks.append(m.tolist())
        logprobs.append(lp.astype(np.float64).tolist())
        rewards.append([0.0] * (len(r) - 1) + [sample.reward] if token_rewards else sample.reward)
        stops.append(sample.finish_reason or "stop")
    images = [image_arrays(s) for s in samples]
    pixel_values = image_grid_thw = None
    if any(images):
        torch = _import_torch()
        pixel_values = [torch.from_numpy(d["pixel_values"]) if d else None for d in images]
        image_grid_thw = [torch.from_numpy(d["image_grid_thw"]) if d else None for d in images]
    return {
        "prompt_token_ids": prompts,
        "response_ids": responses,
        "rewards": rewards,
        "loss_masks": masks,
        "stop_reasons": stops,
        "rollout_metrics": _metrics(samples),
        "rollout_logprobs": logprobs,
        "trajectory_ids": None if trajectory_id is None else [
            trajectory_id(instance_id=s.group_id, repetition_id=s.sample_index) for s in samples],
        "trajectory_generation_times": None,
        "trajectory_time_splits": None,
        "rollout_expert_indices": None,
        "rollout_sample_support": None,
        "is_last_step": None,
        "env_metrics": None,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
    }


def _metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """SkyRL's response-length figures (generators/utils.py `get_rollout_metrics`)."""
    responses = np.array([len(s) - s.prompt_length for s in samples], dtype=np.float64)
    return {"generate/min_num_tokens": float(responses.min()), "generate/max_num_tokens": float(responses.max()),
            "generate/avg_num_tokens": float(responses.mean()), "generate/std_num_tokens": float(responses.std())}
