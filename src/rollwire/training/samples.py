"""Trajectories to training samples with their multimodal inputs (and what a trainer groups by).

Consecutive steps merge into one sample when each prompt extends the previous prompt +
completion token for token (with the same images there): the sample is the last merged step's
prompt + completion, and every merged step's sampled tokens carry the loss and the logprob the
engine reported. A step that does not extend the previous one (a rewritten history, a full
re-render that differs) starts a new sample. Pixels come from the feature store by id, once per
image occurrence, and every sample passes `validate_placeholders` before it is returned.

Each sample also carries what RL trainers key on: the rollout's reward, its prompt and GRPO group
ids (from the runner's trajectory ids), the sampling temperature, the policy version of its steps
(when the rollout recorded one), and on request M-RoPE `position_ids` from the model's own
`get_rope_index`. Advantages are filled in afterwards by `rollwire.training.grpo`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, get_args

import numpy as np

from rollwire.errors import PlaceholderError, SampleError
from rollwire.features import FeatureStore, ImageFeatures, PixelFormat
from rollwire.render import ImageRef, Renderer, validate_placeholders
from rollwire.rollout.types import Step, Trajectory
from rollwire.training.rope import RopeIndex

__all__ = ["PixelFormat", "Sample", "SampleBuilder", "TensorKind", "build_samples", "group_id", "prompt_id",
           "step_extends"]

TensorKind: TypeAlias = Literal["numpy", "torch"]
# np.ndarray, or torch.Tensor with tensors="torch" (chosen at run time, so typed loosely).
Array: TypeAlias = Any


@dataclass(frozen=True, eq=False)
class Sample:
    """One training sequence: token stream, loss mask, old logprobs and its image inputs.

    All per-token arrays have the stream's length. `loss_mask` is True exactly on sampled
    completion tokens (the environment's tokens between turns are context, False); `old_logprobs`
    holds their engine logprob (0 elsewhere). `pixel_values` and `image_grid_thw` are None when the
    sample has no image. `position_ids` is None (positions left to the model) unless the builder
    was given a `RopeIndex`: then (3, L) int64 M-RoPE positions. `reward` is the rollout's total;
    `advantage` is None until `grpo_advantages` sets it; `policy_version` is the oldest version of
    the trained steps (None when they recorded none).
    """

    input_ids: Array  # (L,) int64
    loss_mask: Array  # (L,) bool
    old_logprobs: Array  # (L,) float32
    mm_token_type_ids: Array  # (L,) int64: 0 text, 1 image
    pixel_values: Array | None  # (rows, row_size): uint8 patch rows or normalised float32 / bfloat16
    image_grid_thw: Array | None  # (n_images, 3) int64
    image_ids: tuple[str, ...]  # one per image occurrence, in placeholder order
    images: tuple[ImageRef, ...]  # the occurrences' ranges in input_ids
    step_indices: tuple[int, ...]  # the trajectory steps merged into this sample
    trajectory_id: str
    # With `SampleBuilder(model_inputs=True)`: the image arrays the model's forward pass takes, as
    # the family's processor declares them (Qwen-VL: pixel_values + image_grid_thw; Gemma 4: padded
    # pixel_values + image_position_ids), float32. Empty otherwise, and without images.
    image_inputs: Mapping[str, Array] = field(default_factory=dict)
    env: str = ""
    prompt_id: str = ""  # the prompt within its run: f"{env}-p{prompt_index}"
    group_id: str = ""  # the GRPO group: the trajectory id without its sample suffix
    sample_index: int = 0
    reward: float | None = None
    advantage: float | None = None
    temperature: float | None = None
    policy_version: int | str | None = None
    policy_versions: tuple[int | str | None, ...] = ()  # per merged step
    finish_reason: str | None = None  # the engine's, of the last trained step (stop / length)
    position_ids: Array | None = None  # (3, L) int64 with a RopeIndex

    @property
    def prompt_length(self) -> int:
        """Tokens before the first trained one: the prompt in verl's / SkyRL's prompt + response split."""
        mask = np.asarray(self.loss_mask)
        return int(mask.argmax()) if mask.any() else len(self)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


class SampleBuilder:
    """Builds `Sample`s from trajectories against one feature store and token layout.

    `features` and `image_pad_id` may be None for a text-only model (a step with images is then
    an error). `pixel_format` "uint8" gives the store's patch rows; "float32" / "bfloat16" give
    them normalised as the HF processor does (bfloat16 needs `tensors="torch"`). A trajectory that
    ended in error gives no samples unless `include_failed=True`. `temperature` is recorded on
    every sample (the run's sampling temperature: `run.json`'s settings.sampling.temperature);
    `rope_index` (see `RopeIndex`) adds M-RoPE `position_ids`.
    """

    def __init__(
        self,
        features: FeatureStore | None,
        *,
        image_pad_id: int | None,
        merge_size: int,
        pixel_format: PixelFormat = "float32",
        tensors: TensorKind = "numpy",
        include_failed: bool = False,
        model_inputs: bool = False,
        temperature: float | None = None,
        rope_index: RopeIndex | None = None,
    ) -> None:
        if pixel_format not in get_args(PixelFormat):
            raise SampleError(f"pixel_format must be one of {get_args(PixelFormat)}, got {pixel_format!r}")
        if tensors not in get_args(TensorKind):
            raise SampleError(f"tensors must be one of {get_args(TensorKind)}, got {tensors!r}")
        if pixel_format == "bfloat16" and tensors == "numpy":
            raise SampleError('numpy has no bfloat16: use tensors="torch" or pixel_format="float32"')
        if not isinstance(merge_size, int) or isinstance(merge_size, bool) or merge_size <= 0:
            raise SampleError(f"merge_size must be a positive int, got {merge_size!r}")
        if features is not None and features.config.merge_size != merge_size:
            raise SampleError(f"merge_size {merge_size} differs from the feature store's "
                              f"{features.config.merge_size}")
        self.features = features
        self.image_pad_id = image_pad_id
        self.merge_size = merge_size
        self.pixel_format: PixelFormat = pixel_format
        self.tensors: TensorKind = tensors
        self.include_failed = include_failed
        self.model_inputs = model_inputs
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not math.isfinite(temperature) or temperature < 0):
            raise SampleError(f"temperature must be a finite number >= 0 or None, got {temperature!r}")
        self.temperature = None if temperature is None else float(temperature)
        self.rope_index = rope_index

    @classmethod
    def for_renderer(cls, renderer: Renderer, *, pixel_format: PixelFormat = "float32",
                     tensors: TensorKind = "numpy", include_failed: bool = False,
                     model_inputs: bool = False, temperature: float | None = None,
                     rope_index: RopeIndex | None = None) -> SampleBuilder:
        """A builder using the renderer's feature store, image pad id and merge size."""
        return cls(renderer.feature_store, image_pad_id=renderer.image_pad_id, merge_size=renderer.merge_size,
                   pixel_format=pixel_format, tensors=tensors, include_failed=include_failed,
                   model_inputs=model_inputs, temperature=temperature, rope_index=rope_index)

    def build(self, trajectory: Trajectory) -> list[Sample]:
        """The trajectory's samples in step order; raises `SampleError` / `PlaceholderError`.

        A step with no completion tokens, or whose engine call failed (finish_reason "error"),
        is not trained on: it only serves as context when a later merged step extends it, and a
        sample made only of such steps is dropped.
        """
        if trajectory.error is not None and not self.include_failed:
            return []  # a failed rollout (bad completion, env or engine error) is not trained on by default
        steps = trajectory.steps
        samples = []
        for group in _merge_groups(steps):
            trained = [k for k in group if _trainable(steps[k])]
            if not trained:
                continue
            merged = tuple(k for k in group if k <= trained[-1])
            samples.append(self._sample(trajectory, merged, trained))
        return samples

    __call__ = build

    # --- one sample -------------------------------------------------------------------------

    def _sample(self, trajectory: Trajectory, merged: tuple[int, ...], trained: list[int]) -> Sample:
        steps = trajectory.steps
        tail = steps[merged[-1]]
        input_ids = np.array([*tail.prompt_ids, *tail.completion_ids], dtype=np.int64)
        n = int(input_ids.shape[0])
        if n and int(input_ids.min()) < 0:
            raise SampleError(f"step {merged[-1]}: negative token id {int(input_ids.min())}")
        loss_mask = np.zeros(n, dtype=bool)
        old_logprobs = np.zeros(n, dtype=np.float32)
        for k in trained:
            step = steps[k]
            logprobs = _checked_logprobs(k, step)
            if self.image_pad_id is not None and self.image_pad_id in step.completion_ids:
                at = step.completion_ids.index(self.image_pad_id)
                raise SampleError(f"step {k} sampled the image pad token at completion position {at}: "
                                  "ban the family's vision ids when sampling")
            start = len(step.prompt_ids)
            loss_mask[start : start + len(logprobs)] = True
            old_logprobs[start : start + len(logprobs)] = logprobs
        refs = tuple(tail.images)
        features = self._features(merged[-1], input_ids, refs)
        mm_types = np.zeros(n, dtype=np.int64)
        for ref in refs:
            mm_types[ref.offset : ref.end] = 1
        pixels: Array | None = self._pixels(features) if features else None
        grid = np.array([f.grid_thw for f in features], dtype=np.int64).reshape(-1, 3) if features else None
        positions = None if self.rope_index is None else self.rope_index(input_ids, mm_types, grid)
        arrays: list[Any] = [input_ids, loss_mask, old_logprobs, mm_types, grid, positions]
        if self.tensors == "torch":
            torch = _import_torch()
            arrays = [None if a is None else torch.from_numpy(a) for a in arrays]
            if isinstance(pixels, np.ndarray):
                pixels = torch.from_numpy(pixels)
        input_ids_out, loss_out, old_out, mm_out, grid_out, positions_out = arrays
        versions = tuple(_policy_version(steps[k], k) for k in merged)
        trained_versions = [v for k, v in zip(merged, versions, strict=True) if k in trained and v is not None]
        image_inputs: dict[str, Array] = {}
        if self.model_inputs and features:
            assert self.features is not None
            image_inputs = dict(self.features.config.model_inputs(features))
            if self.tensors == "torch":
                image_inputs = {k: _import_torch().from_numpy(v) for k, v in image_inputs.items()}
        return Sample(
            input_ids=input_ids_out, loss_mask=loss_out, old_logprobs=old_out, mm_token_type_ids=mm_out,
            pixel_values=pixels, image_grid_thw=grid_out, image_ids=tuple(ref.id for ref in refs),
            images=refs, step_indices=merged, trajectory_id=trajectory.id, image_inputs=image_inputs,
            env=trajectory.env, prompt_id=prompt_id(trajectory), group_id=group_id(trajectory),
            sample_index=trajectory.sample_index, reward=float(trajectory.reward), temperature=self.temperature,
            policy_version=_oldest(trained_versions), policy_versions=versions,
            finish_reason=steps[trained[-1]].finish_reason, position_ids=positions_out,
        )

    def _features(self, step_index: int, input_ids: np.ndarray, refs: tuple[ImageRef, ...]) -> list[ImageFeatures]:
        """Validate the placeholders and return each occurrence's features, in order."""
        where = f"step {step_index}"
        if self.image_pad_id is None or self.features is None:
            if refs:
                raise SampleError(f"{where} has images but the builder has no feature store / image pad id")
            return []
        store = self.features
        try:
            validate_placeholders(input_ids, refs, pad_id=self.image_pad_id, merge_size=self.merge_size,
                                  known_ids=store)
        except PlaceholderError as exc:
            raise PlaceholderError(f"{where}: {exc}") from None
        out = []
        row_size = store.config.row_size
        for k, ref in enumerate(refs):
            feat = store.get(ref.id)  # UnknownImageError if evicted since the check above
            rows = int(feat.pixel_values.shape[0])
            name = f"{where}, image {k} ({ref.id[:12]})"
            if tuple(feat.grid_thw) != tuple(ref.grid_thw):
                raise PlaceholderError(f"{name}: ref grid {tuple(ref.grid_thw)} but the stored features have "
                                       f"grid {feat.grid_thw}")
            if feat.merge_size != self.merge_size or ref.length * self.merge_size**2 != rows:
                raise PlaceholderError(f"{name}: {ref.length} image tokens but {rows} feature rows at merge "
                                       f"size {self.merge_size}")
            if feat.pixel_values.shape[1] != row_size:
                raise SampleError(f"{name}: rows of {feat.pixel_values.shape[1]} values, the store's config "
                                  f"implies {row_size}")
            out.append(feat)
        return out

    def _pixels(self, features: list[ImageFeatures]) -> Array:
        """All occurrences' rows in one new array (the store's rows are never handed out)."""
        if self.pixel_format == "uint8":
            return np.concatenate([f.pixel_values for f in features])
        assert self.features is not None
        config = self.features.config
        total = sum(int(f.pixel_values.shape[0]) for f in features)
        if self.pixel_format == "bfloat16":
            torch = _import_torch()
            out_t = torch.empty((total, config.row_size), dtype=torch.bfloat16)
            at = 0
            for f in features:
                rows = int(f.pixel_values.shape[0])
                out_t[at : at + rows] = torch.from_numpy(f.normalized(config))
                at += rows
            return out_t
        out = np.empty((total, config.row_size), dtype=np.float32)
        at = 0
        for f in features:
            rows = int(f.pixel_values.shape[0])
            out[at : at + rows] = f.normalized(config)
            at += rows
        return out


def build_samples(
    trajectory: Trajectory,
    features: FeatureStore | None,
    *,
    image_pad_id: int | None,
    merge_size: int,
    pixel_format: PixelFormat = "float32",
    tensors: TensorKind = "numpy",
) -> list[Sample]:
    """`SampleBuilder(...).build(trajectory)` in one call."""
    builder = SampleBuilder(features, image_pad_id=image_pad_id, merge_size=merge_size,
                            pixel_format=pixel_format, tensors=tensors)
    return builder.build(trajectory)


# --- helpers ------------------------------------------------------------------------------------


def prompt_id(trajectory: Trajectory) -> str:
    """Which prompt of its run a rollout answered (`rollwire.rollout.runner`'s prompt index)."""
    return f"{trajectory.env}-p{trajectory.prompt_index}"


def group_id(trajectory: Trajectory) -> str:
    """The rollout's GRPO group: the runner's trajectory id `{env}-s{seed}-p{i}-g{j}` without `-g{j}`
    (every sample of a prompt in a run); another id scheme groups by env, env seed and prompt index."""
    suffix = f"-g{trajectory.sample_index}"
    if trajectory.id.endswith(suffix) and len(trajectory.id) > len(suffix):
        return trajectory.id[: -len(suffix)]
    return f"{trajectory.env}-e{trajectory.seed}-p{trajectory.prompt_index}"


def _policy_version(step: Step, index: int) -> int | str | None:
    """The step's `policy_version`: an int, or the server's label when it is not a number."""
    version = step.policy_version
    if version is None:
        return None
    if not isinstance(version, int | str) or isinstance(version, bool):
        raise SampleError(f"step {index}: policy_version must be an int or a str, got {type(version).__name__}")
    return version


def _oldest(versions: list[int | str]) -> int | str | None:
    """The oldest version: the smallest when all are numbers, else the first sampled (steps are in
    sampling order, and weights only move forward during a rollout)."""
    if not versions:
        return None
    if all(isinstance(v, int) for v in versions):
        return min(versions)
    return versions[0]


def step_extends(previous: Step, step: Step) -> bool:
    """True when `step`'s prompt starts with `previous`'s prompt + completion, with the same images there."""
    n_prompt = len(previous.prompt_ids)
    boundary = n_prompt + len(previous.completion_ids)
    prompt = step.prompt_ids
    if len(prompt) < boundary:
        return False
    if prompt[:n_prompt] != previous.prompt_ids or prompt[n_prompt:boundary] != previous.completion_ids:
        return False
    head = tuple(ref for ref in step.images if ref.offset < boundary)
    return head == tuple(previous.images)


def _merge_groups(steps: Sequence[Step]) -> list[list[int]]:
    """Runs of step indices where each step extends the one before it."""
    groups: list[list[int]] = []
    for k, step in enumerate(steps):
        if groups and step_extends(steps[groups[-1][-1]], step):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def _trainable(step: Step) -> bool:
    return bool(step.completion_ids) and step.finish_reason != "error"


def _checked_logprobs(index: int, step: Step) -> np.ndarray:
    if step.completion_logprobs is None:
        raise SampleError(f"step {index} has no completion_logprobs (sample with logprobs=True)")
    logprobs = np.asarray(step.completion_logprobs, dtype=np.float32)
    if logprobs.shape != (len(step.completion_ids),):
        raise SampleError(f"step {index}: {logprobs.size} logprobs for {len(step.completion_ids)} completion tokens")
    if not bool(np.isfinite(logprobs).all()):
        raise SampleError(f"step {index}: a completion logprob is not finite")
    return logprobs


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SampleError('tensors="torch" and bfloat16 pixels need torch installed') from None
    return torch
