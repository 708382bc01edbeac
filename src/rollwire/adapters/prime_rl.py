"""prime-rl's `TrainingSample` fields (prime_rl.transports.rollouts.types, prime-rl 0.8.0).

One flat token stream per sample: `mask` marks the sampled tokens, `logprobs`, `temperatures` and
`advantages` are per token with `token_ids`' length; images travel as `mm_kwargs`, a dict of
`EncodedTensor` fields (dtype name, shape, raw bytes) keyed by the model forward's kwarg names, and
`mm_token_type_ids` (0 text, 1 image). Fields left unset are omitted (the struct's omit_defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rollwire.adapters._common import as_numpy, image_arrays
from rollwire.errors import SampleError
from rollwire.training import Sample

__all__ = ["prime_rl_sample", "prime_rl_samples"]


def prime_rl_sample(sample: Sample, *, env_name: str | None = None, temperature: float | None = None) -> dict[str, Any]:
    """`TrainingSample(**d)` keyword arguments, with `mm_kwargs` values as EncodedTensor field dicts.

    `temperature` defaults to the sample's (the run's sampling temperature); prime-rl divides the
    trainer's logits by it, so it must be known. `advantages` are the sample's advantage on its
    sampled tokens and 0 elsewhere (omitted when the sample has none).
    """
    temp = sample.temperature if temperature is None else float(temperature)
    if temp is None:
        raise SampleError(f"sample of {sample.trajectory_id} has no temperature: pass temperature= "
                          "(prime-rl scales the trainer's logits by it)")
    mask = as_numpy(sample.loss_mask, "loss_mask").astype(bool)
    n = int(mask.shape[0])
    out: dict[str, Any] = {
        "token_ids": as_numpy(sample.input_ids, "input_ids").astype(np.int64).tolist(),
        "mask": mask.tolist(),
        "logprobs": as_numpy(sample.old_logprobs, "old_logprobs").astype(np.float64).tolist(),
        "temperatures": [temp] * n,
        "env_name": sample.env if env_name is None else env_name,
    }
    if sample.advantage is not None:
        out["advantages"] = np.where(mask, float(sample.advantage), 0.0).tolist()
    images = image_arrays(sample)
    if images:
        out["mm_kwargs"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.tobytes()}
                            for k, v in images.items()}
        out["mm_token_type_ids"] = as_numpy(sample.mm_token_type_ids, "mm_token_type_ids").astype(np.int64).tolist()
    return out


def prime_rl_samples(samples: Sequence[Sample], **kwargs: Any) -> list[dict[str, Any]]:
    return [prime_rl_sample(s, **kwargs) for s in samples]
