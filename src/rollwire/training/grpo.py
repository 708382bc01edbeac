"""Group-relative advantages (GRPO): each rollout's reward minus its group's mean.

`scale="std"` divides by the group's standard deviation + `eps` (GRPO as DeepSeekMath, verl's
`grpo` estimator and TRL compute it: the unbiased std, ddof=1); `scale=None` leaves the
difference unscaled (Dr. GRPO, which drops the std to avoid its difficulty bias). A group of one
rollout has no baseline: its advantage is 0. Statistics are over rollouts, not samples, so a
rollout whose rewritten history made two samples counts once, and both get its advantage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

from rollwire.errors import SampleError
from rollwire.training.samples import Sample

__all__ = ["Scale", "grpo_advantages", "with_advantages"]

Scale = Literal["std"] | None


def grpo_advantages(rewards: Sequence[float], group_ids: Sequence[Hashable], *, scale: Scale = "std",
                    eps: float = 1e-6) -> np.ndarray:
    """float64 advantages aligned with `rewards`, grouped by `group_ids`."""
    if scale not in ("std", None):
        raise SampleError(f"scale must be 'std' or None (Dr. GRPO), got {scale!r}")
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 1 or len(group_ids) != values.shape[0]:
        raise SampleError(f"{len(group_ids)} group ids for rewards of shape {values.shape}")
    if not bool(np.isfinite(values).all()):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise SampleError(f"reward {bad} is not finite ({values[bad]})")
    members: dict[Hashable, list[int]] = {}
    for k, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(k)
    out = np.zeros_like(values)
    for rows in members.values():
        if len(rows) < 2:
            continue
        group = values[rows]
        centred = group - group.mean()
        out[rows] = centred / (group.std(ddof=1) + eps) if scale == "std" else centred
    return out


def with_advantages(samples: Sequence[Sample], *, scale: Scale = "std", eps: float = 1e-6) -> list[Sample]:
    """New samples with `advantage` set from their rollouts' rewards, per `group_id` (inputs unchanged).

    All samples of a group must be passed together: a group's mean is over the rollouts given.
    """
    rollouts: dict[str, tuple[float, str]] = {}
    for k, sample in enumerate(samples):
        if sample.reward is None or not math.isfinite(sample.reward):
            raise SampleError(f"sample {k} ({sample.trajectory_id}) has no finite reward ({sample.reward})")
        if not sample.group_id:
            raise SampleError(f"sample {k} ({sample.trajectory_id}) has no group_id")
        seen = rollouts.setdefault(sample.trajectory_id, (sample.reward, sample.group_id))
        if seen != (sample.reward, sample.group_id):
            raise SampleError(f"samples of rollout {sample.trajectory_id} disagree on reward or group "
                              f"({seen} vs {(sample.reward, sample.group_id)})")
    ids = list(rollouts)
    advantages = grpo_advantages([rollouts[i][0] for i in ids], [rollouts[i][1] for i in ids], scale=scale, eps=eps)
    by_rollout = dict(zip(ids, advantages.tolist(), strict=True))
    return [dataclasses.replace(s, advantage=by_rollout[s.trajectory_id]) for s in samples]
