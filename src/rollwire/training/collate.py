"""Pad samples into one batch a transformers forward pass takes as is.

Per-token arrays are padded to the longest sample (or `pad_to`) on the right or the left;
`attention_mask` is 1 on real tokens. `position_ids` (M-RoPE, when every sample has them) are laid
out (3, B, L) as the Qwen-VL models take them, 0 on padding, which is what the model's own
`get_rope_index` gives for the padded batch with its attention mask. Images are concatenated in
sample order (`pixel_values` rows, `image_grid_thw` rows, and each of `image_inputs`' arrays), as
the model's forward pass consumes them. Samples are not modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from rollwire.errors import SampleError
from rollwire.training.samples import Array, Sample, TensorKind, _import_torch

__all__ = ["PaddingSide", "collate"]

PaddingSide = Literal["right", "left"]


def collate(samples: Sequence[Sample], *, padding_side: PaddingSide = "right", pad_token_id: int = 0,
            pad_to: int | None = None, tensors: TensorKind = "numpy") -> dict[str, Array]:
    """input_ids, attention_mask (int64), loss_mask (bool), old_logprobs (float32), mm_token_type_ids,
    advantages (float32, the sample's advantage on its loss tokens; only when every sample has one),
    position_ids (3, B, L), pixel_values, image_grid_thw, and `image_inputs` (a dict of the samples'
    processor-declared arrays, when they have them)."""
    if not samples:
        raise SampleError("collate needs at least one sample")
    if padding_side not in get_args(PaddingSide):
        raise SampleError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if tensors not in get_args(TensorKind):
        raise SampleError(f"tensors must be one of {get_args(TensorKind)}, got {tensors!r}")
    lengths = [len(s) for s in samples]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise SampleError(f"pad_to={pad_to} is shorter than the longest sample ({max(lengths)} tokens)")
    n = len(samples)

    def padded(name: str, dtype: Any, fill: Any = 0) -> np.ndarray:
        out = np.full((n, width), fill, dtype=dtype)
        for row, sample in enumerate(samples):
            out[row, _span(lengths[row], width, padding_side)] = np.asarray(getattr(sample, name))
        return out

    batch: dict[str, Any] = {
        "input_ids": padded("input_ids", np.int64, pad_token_id),
        "attention_mask": np.zeros((n, width), dtype=np.int64),
        "loss_mask": padded("loss_mask", np.bool_, False),
        "old_logprobs": padded("old_logprobs", np.float32),
        "mm_token_type_ids": padded("mm_token_type_ids", np.int64),
    }
    for row in range(n):
        batch["attention_mask"][row, _span(lengths[row], width, padding_side)] = 1
    has_advantage = [s.advantage is not None for s in samples]
    if any(has_advantage):
        if not all(has_advantage):
            raise SampleError(f"sample {has_advantage.index(False)} has no advantage but others do")
        advantages = np.array([s.advantage for s in samples], dtype=np.float32)[:, None]
        batch["advantages"] = np.where(batch["loss_mask"], advantages, np.float32(0))
    has_positions = [s.position_ids is not None for s in samples]
    if any(has_positions):
        if not all(has_positions):
            raise SampleError(f"sample {has_positions.index(False)} has no position_ids but others do")
        positions = np.zeros((3, n, width), dtype=np.int64)
        for row, sample in enumerate(samples):
            positions[:, row, _span(lengths[row], width, padding_side)] = np.asarray(sample.position_ids)
        batch["position_ids"] = positions
    batch.update(_images(samples))
    if tensors == "torch":
        torch = _import_torch()
        batch = {k: _to_torch(torch, v) for k, v in batch.items()}
    return batch


def _to_torch(torch: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_torch(torch, v) for k, v in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _span(length: int, width: int, side: PaddingSide) -> slice:
    return slice(0, length) if side == "right" else slice(width - length, width)


def _images(samples: Sequence[Sample]) -> dict[str, Any]:
    """Every image array, concatenated in sample order (torch stays torch: bfloat16 has no numpy)."""
    with_images = [s for s in samples if s.pixel_values is not None]
    if not with_images:
        return {}
    out = {"pixel_values": _cat([s.pixel_values for s in with_images]),
           "image_grid_thw": _cat([s.image_grid_thw for s in with_images])}
    keys = {frozenset(s.image_inputs) for s in with_images}
    if len(keys) > 1:
        raise SampleError(f"samples carry different image_inputs: {sorted(sorted(k) for k in keys)}")
    names = sorted(next(iter(keys)))
    if names:
        out["image_inputs"] = {key: _cat([s.image_inputs[key] for s in with_images]) for key in names}
    return out


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return _import_torch().cat(parts)
