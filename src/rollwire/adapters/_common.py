"""What the adapters share: a sample's arrays as numpy, its prompt / response split."""

from __future__ import annotations

from typing import Any

import numpy as np

from rollwire.errors import SampleError
from rollwire.training import Sample


def as_numpy(value: Any, what: str) -> np.ndarray:
    """A sample array as numpy (torch tensors too; bfloat16 has no numpy dtype and is refused)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    except TypeError as exc:
        raise SampleError(f"{what} cannot be exported ({exc}): build samples with pixel_format='float32'") from None


def split(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_ids, response_ids, response_mask int, response_logprobs float32): the response starts
    at the first trained token and runs to the end (environment tokens in it are masked out)."""
    ids = as_numpy(sample.input_ids, "input_ids").astype(np.int64, copy=False)
    mask = as_numpy(sample.loss_mask, "loss_mask").astype(bool, copy=False)
    logprobs = as_numpy(sample.old_logprobs, "old_logprobs").astype(np.float32, copy=False)
    start = sample.prompt_length
    if start >= len(ids):
        raise SampleError(f"sample of {sample.trajectory_id} has no trained token")
    return ids[:start], ids[start:], mask[start:].astype(np.int64), logprobs[start:]


def image_arrays(sample: Sample) -> dict[str, np.ndarray]:
    """The arrays the model's forward pass takes for the sample's images (empty without images):
    the processor-declared `image_inputs` when built with them, else pixel_values + image_grid_thw."""
    if sample.pixel_values is None:
        return {}
    source = sample.image_inputs or {"pixel_values": sample.pixel_values, "image_grid_thw": sample.image_grid_thw}
    return {k: np.ascontiguousarray(as_numpy(v, k)) for k, v in source.items()}
