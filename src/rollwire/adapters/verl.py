"""verl's agent-loop output and its padded DataProto batch (verl 0.9.1,
verl/experimental/agent_loop/agent_loop.py: `AgentLoopOutput`, `_agent_loop_postprocess`,
`_compute_position_ids`, `_postprocess`).

verl splits a sequence into a prompt and a response; a multi-turn response holds the environment's
tokens too, with `response_mask` 0 there. In the batch, prompts are left-padded and responses
right-padded; M-RoPE `position_ids` are (B, 4, L): a text row (arange over real tokens, 1 on
padding) above the model's three `get_rope_index` rows (0 on padding); without M-RoPE they are
(B, L), `clip(cumsum(attention_mask) - 1, 0)`. `rm_scores` puts the reward on the last response
token. `non_tensor_batch["multi_modal_inputs"]` holds one dict of image arrays per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import numpy as np

from rollwire.adapters._common import as_numpy, image_arrays, split
from rollwire.errors import SampleError
from rollwire.training import Sample, TensorKind
from rollwire.training.samples import _import_torch

__all__ = ["verl_agent_loop_output", "verl_batch"]


def verl_agent_loop_output(sample: Sample, *, image: Callable[[str], Any] | None = None,
                           num_turns: int | None = None) -> dict[str, Any]:
    """`AgentLoopOutput(**d)` keyword arguments.

    `image(image_id)` gives an image's original (e.g. `RunReader.image`): `multi_modal_data` then
    lists one per occurrence, which verl's processor turns into its inputs again. `num_turns`
    (verl counts user, assistant and tool messages) defaults to two per merged step.
    """
    prompt, response, mask, logprobs = split(sample)
    images = None
    if image is not None and sample.image_ids:
        images = {"images": [image(i) for i in sample.image_ids]}
    return {
        "prompt_ids": prompt.tolist(),
        "response_ids": response.tolist(),
        "response_mask": mask.tolist(),
        "response_logprobs": logprobs.astype(np.float64).tolist(),
        "multi_modal_data": images,
        "reward_score": sample.reward,
        "num_turns": 2 * len(sample.step_indices) if num_turns is None else num_turns,
        "metrics": {},
        "extra_fields": {"trajectory_id": sample.trajectory_id, "uid": sample.group_id,
                         "policy_version": sample.policy_version},
    }


def verl_batch(samples: Sequence[Sample], *, pad_token_id: int, prompt_length: int | None = None,
               response_length: int | None = None,
               tensors: TensorKind = "numpy") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(batch, non_tensor_batch) for `DataProto.from_dict(tensors=batch, non_tensors=non_tensor_batch)`
    (with `tensors="torch"`). Widths default to the longest prompt / response."""
    if not samples:
        raise SampleError("verl_batch needs at least one sample")
    if tensors not in get_args(TensorKind):
        raise SampleError(f"tensors must be one of {get_args(TensorKind)}, got {tensors!r}")
    parts = [split(s) for s in samples]
    width_p = max(len(p[0]) for p in parts) if prompt_length is None else prompt_length
    width_r = max(len(p[1]) for p in parts) if response_length is None else response_length
    n = len(samples)
    prompts = np.full((n, width_p), pad_token_id, dtype=np.int64)
    responses = np.full((n, width_r), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, width_p + width_r), dtype=np.int64)
    response_mask = np.zeros((n, width_r), dtype=np.int64)
    logprobs = np.zeros((n, width_r), dtype=np.float32)
    mrope = [s.position_ids is not None for s in samples]
    if any(mrope) and not all(mrope):
        raise SampleError(f"sample {mrope.index(False)} has no position_ids but others do")
    positions = (np.zeros((n, 4, width_p + width_r), dtype=np.int64) if all(mrope)
                 else np.zeros((n, width_p + width_r), dtype=np.int64))
    for row, (sample, (p, r, m, lp)) in enumerate(zip(samples, parts, strict=True)):
        if len(p) > width_p or len(r) > width_r:
            raise SampleError(f"sample {row} ({sample.trajectory_id}): prompt {len(p)} / response {len(r)} tokens "
                              f"exceed prompt_length {width_p} / response_length {width_r}")
        prompts[row, width_p - len(p):] = p
        responses[row, : len(r)] = r
        response_mask[row, : len(r)] = m
        logprobs[row, : len(r)] = lp
        real = slice(width_p - len(p), width_p + len(r))
        attention[row, real] = 1
        if all(mrope):
            positions[row, 0] = 1
            positions[row, 0, real] = np.arange(len(p) + len(r))
            positions[row, 1:, real] = as_numpy(sample.position_ids, "position_ids")
    if not all(mrope):
        positions = np.clip(np.cumsum(attention, axis=-1) - 1, 0, None)
    batch: dict[str, Any] = {
        "prompts": prompts, "responses": responses, "response_mask": response_mask,
        "input_ids": np.concatenate([prompts, responses], axis=1), "attention_mask": attention,
        "position_ids": positions, "rollout_log_probs": logprobs,
    }
    if all(s.reward is not None for s in samples):
        scores = np.zeros((n, width_r), dtype=np.float32)
        scores[np.arange(n), [len(p[1]) - 1 for p in parts]] = [s.reward for s in samples]
        batch["rm_scores"] = scores
    non_tensor: dict[str, np.ndarray] = {
        "__num_turns__": np.array([2 * len(s.step_indices) for s in samples], dtype=np.int32),
        "uid": _objects([s.group_id for s in samples]),
        "trajectory_id": _objects([s.trajectory_id for s in samples]),
    }
    inputs = [_verl_inputs(s) for s in samples]
    if any(inputs):
        non_tensor["multi_modal_inputs"] = _objects(inputs)
    if tensors == "torch":
        torch = _import_torch()
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        if "multi_modal_inputs" in non_tensor:
            non_tensor["multi_modal_inputs"] = _objects([{k: torch.from_numpy(v) for k, v in d.items()}
                                                         for d in non_tensor["multi_modal_inputs"]])
    return batch, non_tensor


def _verl_inputs(sample: Sample) -> dict[str, np.ndarray]:
    """The row's image arrays, plus the `images_seqlens` (patches per frame) verl adds for Qwen-VL."""
    arrays = image_arrays(sample)
    grid = arrays.get("image_grid_thw")
    if grid is not None:
        arrays["images_seqlens"] = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return arrays


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
