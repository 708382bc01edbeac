"""Samples for trainers, checked on a real multi-turn run (the `shapes` environment, the embedded
engine on the tiny random-weight qwen2_vl model, written to a run directory and read back).

The proofs: each sample's loss mask covers exactly the sampled tokens of its merged turns (the
environment's tokens between them are context), its logprobs are the engine's token for token;
M-RoPE positions from the model's own `get_rope_index` reproduce the engine's logprobs in a forward
pass (and plain positions do not); a left-padded collated batch reproduces them in one forward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import FIGURES
from rollwire.errors import SampleError
from rollwire.training import (
    RopeIndex,
    Sample,
    SampleBuilder,
    collate,
    grpo_advantages,
    samples_from_run,
    with_advantages,
)
from shapes_run import GROUP, N_PROMPTS, TURNS, Run


@pytest.fixture(scope="module")
def samples(shapes_run: Run) -> list[Sample]:
    """Read the way a user reads a run: model directory and temperature from its run.json."""
    return samples_from_run(shapes_run.run_dir)


# --- alignment on the real run ------------------------------------------------------------------


def test_loss_mask_and_logprobs_align_with_the_sampled_turns(shapes_run: Run, samples: list[Sample]) -> None:
    assert len(shapes_run.trajectories) == N_PROMPTS * GROUP
    assert {s.trajectory_id for s in samples} == set(shapes_run.trajectories)
    env_tokens = 0
    for sample in samples:
        trajectory = shapes_run.trajectories[sample.trajectory_id]
        steps = [trajectory.steps[k] for k in sample.step_indices]
        tail = steps[-1]
        assert np.asarray(sample.input_ids).tolist() == [*tail.prompt_ids, *tail.completion_ids]
        want_mask = np.zeros(len(sample), dtype=bool)
        want_logprobs = np.zeros(len(sample), dtype=np.float32)
        for step in steps:
            start = len(step.prompt_ids)
            want_mask[start : start + len(step.completion_ids)] = True
            want_logprobs[start : start + len(step.completion_ids)] = step.completion_logprobs
        np.testing.assert_array_equal(sample.loss_mask, want_mask)
        np.testing.assert_array_equal(sample.old_logprobs, want_logprobs)
        # Between two turns: the environment's next picture and question, never trained on.
        for before, after in itertools.pairwise(steps):
            gap = slice(len(before.prompt_ids) + len(before.completion_ids), len(after.prompt_ids))
            assert gap.stop - gap.start > 20 and not sample.loss_mask[gap].any()
            env_tokens += gap.stop - gap.start
        assert sample.prompt_length == len(steps[0].prompt_ids)
        # What a trainer groups and weights by.
        assert sample.env == "shapes" and sample.reward == trajectory.reward
        assert sample.group_id == f"shapes-s0-p{trajectory.prompt_index}"
        assert sample.prompt_id == f"shapes-p{trajectory.prompt_index}"
        assert sample.sample_index == trajectory.sample_index
        assert sample.temperature == 1.0  # from run.json
        assert sample.finish_reason == steps[-1].finish_reason
        assert sample.policy_version is None and sample.position_ids is None
    assert max(len(s.step_indices) for s in samples) == TURNS and env_tokens > 0
    FIGURES["samples: shapes run, samples / rollouts / environment tokens masked"] = (
        f"{len(samples)} / {len(shapes_run.trajectories)} / {env_tokens}")


def test_policy_version_is_the_oldest_trained_steps(shapes_run: Run) -> None:
    """A rollout whose steps record `policy_version` (a weight update mid-rollout) gives the oldest:
    the smallest number, or the first sampled label when the server's labels are not numbers."""
    trajectory = next(t for t in shapes_run.trajectories.values() if len(t.steps) == TURNS)
    versioned = [msgspec.structs.replace(s, policy_version=v)
                 for s, v in zip(trajectory.steps, (7, 5, 6), strict=True)]
    builder = SampleBuilder.for_renderer(shapes_run.renderer)
    shapes_run.reader.load_features(builder.features, trajectory)  # type: ignore[arg-type]
    [sample] = builder.build(msgspec.structs.replace(trajectory, steps=versioned))
    assert sample.policy_version == 5 and sample.policy_versions == (7, 5, 6)
    labelled = [msgspec.structs.replace(s, policy_version=v) for s, v in zip(trajectory.steps, ("b", "a", "c"),
                                                                             strict=True)]
    [sample] = builder.build(msgspec.structs.replace(trajectory, steps=labelled))
    assert sample.policy_version == "b" and sample.policy_versions == ("b", "a", "c")
    bad = [msgspec.structs.replace(versioned[0], policy_version=1.5), *versioned[1:]]  # type: ignore[arg-type]
    with pytest.raises(SampleError, match="policy_version must be an int or a str"):
        builder.build(msgspec.structs.replace(trajectory, steps=bad))
    with pytest.raises(SampleError, match="temperature"):
        SampleBuilder.for_renderer(shapes_run.renderer, temperature=float("nan"))


# --- GRPO -----------------------------------------------------------------------------------------


def test_grpo_advantages_by_hand() -> None:
    rewards, groups = [1.0, 0.0, 0.0, 1.0, 2.0, 4.0], ["a", "a", "a", "b", "c", "c"]
    # group a: mean 1/3, unbiased std sqrt(1/3); b alone: no baseline; c: mean 3, std sqrt(2).
    want = [(2 / 3) / np.sqrt(1 / 3), -(1 / 3) / np.sqrt(1 / 3), -(1 / 3) / np.sqrt(1 / 3), 0.0,
            -1 / np.sqrt(2), 1 / np.sqrt(2)]
    np.testing.assert_allclose(grpo_advantages(rewards, groups, eps=0.0), want, rtol=1e-12)
    np.testing.assert_allclose(grpo_advantages(rewards, groups, scale=None), [2 / 3, -1 / 3, -1 / 3, 0, -1, 1])
    np.testing.assert_array_equal(grpo_advantages([1.0, 1.0], ["a", "a"]), [0.0, 0.0])  # no spread: 0, not NaN
    with pytest.raises(SampleError, match="not finite"):
        grpo_advantages([1.0, float("nan")], ["a", "a"])
    with pytest.raises(SampleError, match="group ids"):
        grpo_advantages([1.0, 0.0], ["a"])
    with pytest.raises(SampleError, match="scale"):
        grpo_advantages([1.0], ["a"], scale="max")  # type: ignore[arg-type]


def test_with_advantages_counts_each_rollout_once(samples: list[Sample]) -> None:
    """Rewards of the real run, set by hand per rollout; a rollout split into two samples (its
    history rewritten) must count once in its group's mean."""
    base = samples[0]
    made = [dataclasses.replace(base, trajectory_id=t, group_id=g, reward=r)
            for t, g, r in (("x0", "x", 1.0), ("x1", "x", 0.0), ("x1", "x", 0.0), ("y0", "y", 3.0))]
    got = with_advantages(made, scale=None)
    assert [s.advantage for s in got] == [0.5, -0.5, -0.5, 0.0]
    assert all(s.advantage is None for s in made)  # inputs unchanged
    on_run = with_advantages(samples)
    for sample in on_run:
        group = [s.reward for s in on_run if s.group_id == sample.group_id]
        assert sample.reward is not None and sample.advantage is not None
        if np.std(group) == 0:
            assert sample.advantage == 0.0
        else:
            assert np.sign(sample.advantage) == np.sign(sample.reward - np.mean(group))
    with pytest.raises(SampleError, match="disagree"):
        with_advantages([made[1], dataclasses.replace(made[2], reward=5.0)])
    with pytest.raises(SampleError, match="no finite reward"):
        with_advantages([dataclasses.replace(base, reward=None)])


# --- collate --------------------------------------------------------------------------------------


def test_collate_pads_left_or_right(shapes_run: Run, samples: list[Sample]) -> None:
    picked = [dataclasses.replace(s, advantage=float(k) + 0.5) for k, s in enumerate(shapes_run.ragged())]
    width = max(len(s) for s in picked)
    for side in ("right", "left"):
        batch = collate(picked, padding_side=side, pad_token_id=-7)  # type: ignore[arg-type]
        assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == np.int64
        assert batch["attention_mask"].dtype == np.int64 and batch["loss_mask"].dtype == np.bool_
        assert batch["old_logprobs"].dtype == np.float32 and batch["advantages"].dtype == np.float32
        for row, sample in enumerate(picked):
            real = slice(0, len(sample)) if side == "right" else slice(width - len(sample), width)
            pad = np.ones(width, dtype=bool)
            pad[real] = False
            np.testing.assert_array_equal(batch["input_ids"][row, real], sample.input_ids)
            assert (batch["input_ids"][row, pad] == -7).all() and batch["attention_mask"][row].sum() == len(sample)
            assert not batch["loss_mask"][row, pad].any() and not batch["old_logprobs"][row, pad].any()
            np.testing.assert_array_equal(batch["loss_mask"][row, real], sample.loss_mask)
            np.testing.assert_array_equal(batch["old_logprobs"][row, real], sample.old_logprobs)
            np.testing.assert_array_equal(batch["advantages"][row], np.where(batch["loss_mask"][row], row + 0.5, 0))
        np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([s.pixel_values for s in picked]))
        np.testing.assert_array_equal(batch["image_grid_thw"], np.concatenate([s.image_grid_thw for s in picked]))
    assert "advantages" not in collate(samples[:2]) and "position_ids" not in collate(samples[:2])
    with pytest.raises(SampleError, match="has no advantage"):
        collate([picked[0], samples[1]])
    with pytest.raises(SampleError, match="pad_to"):
        collate(picked, pad_to=width - 1)
    torch = pytest.importorskip("torch")
    as_torch = collate(picked, tensors="torch")
    assert isinstance(as_torch["input_ids"], torch.Tensor) and as_torch["loss_mask"].dtype == torch.bool


# --- M-RoPE ---------------------------------------------------------------------------------------


def _loss_logprobs(model: Any, batch: dict[str, Any], **extra: Any) -> Any:
    import torch

    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=batch["mm_token_type_ids"], **extra).logits.float()
    rows = logits.log_softmax(-1)
    b, t = batch["loss_mask"].nonzero(as_tuple=True)
    return rows[b, t - 1, batch["input_ids"][b, t]] - batch["old_logprobs"][b, t]


def test_mrope_positions_reproduce_the_engine_logprobs(shapes_run: Run, qwen2_model: Any) -> None:
    import torch

    samples = shapes_run.samples(mrope=True)
    one = next(s for s in samples if len(s.step_indices) == TURNS)
    assert one.position_ids is not None and one.position_ids.shape == (3, len(one))
    assert one.position_ids.dtype == np.int64
    # The positions are not arange: text after an image continues from the grid's largest side.
    assert one.position_ids[0, -1] < len(one) - 1
    # The model directory's class on the meta device gives what the loaded model's own function gives.
    ids = torch.from_numpy(one.input_ids)[None]
    want, _ = qwen2_model.model.get_rope_index(ids, mm_token_type_ids=torch.from_numpy(one.mm_token_type_ids)[None],
                                         image_grid_thw=torch.from_numpy(one.image_grid_thw),
                                         attention_mask=torch.ones_like(ids))
    np.testing.assert_array_equal(one.position_ids, want[:, 0].numpy())
    np.testing.assert_array_equal(RopeIndex.from_model(qwen2_model)(one.input_ids, one.mm_token_type_ids,
                                                              one.image_grid_thw), one.position_ids)

    # A left-padded batch of three, in one forward pass with the collated positions.
    picked = shapes_run.ragged(mrope=True)
    batch = collate(picked, padding_side="left", pad_token_id=0, tensors="torch")
    hf, _ = qwen2_model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                       image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    assert torch.equal(batch["position_ids"], hf)  # the model's own batch positions, padding included
    diff = _loss_logprobs(qwen2_model, batch, position_ids=batch["position_ids"]).abs().max().item()
    arange = batch["attention_mask"].cumsum(-1).clamp(min=1) - 1
    control = _loss_logprobs(qwen2_model, batch, position_ids=arange[None].expand(3, -1, -1)).abs().max().item()
    FIGURES["samples: M-RoPE collated batch, max |logprob diff| (control: arange positions)"] = (
        f"{diff:.2e} ({control:.2e})")
    assert diff < 1e-3 and control > 10 * max(diff, 1e-5)


def test_rope_index_refuses_what_it_cannot_do(tiny: Callable[[str], Path], shapes_run: Run) -> None:
    pytest.importorskip("torch")
    with pytest.raises(SampleError, match="M-RoPE"):
        RopeIndex.from_model_dir(tiny("qwen3"))  # a text-only family: 1-D positions
    rope = shapes_run.rope
    sample = shapes_run.samples()[0]
    assert sample.image_grid_thw is not None
    with pytest.raises(SampleError, match="image token runs"):
        rope(sample.input_ids, sample.mm_token_type_ids, sample.image_grid_thw[:-1])
