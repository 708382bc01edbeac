"""Adapters to prime-rl, verl and SkyRL, on the real multi-turn shapes run (see shapes_run.py).

None of the three installs here on CPU in minutes (prime-rl is not on PyPI; verl 0.9.1 pins
transformers < 5.11 and pulls ray; skyrl 0.4.0 needs Python >= 3.12), so each is checked against
its type definition as read in the peer's source, transcribed below field for field as a strict
msgspec type (a wrong name, a missing field or a wrong element type fails to convert):

- prime-rl 0.8.0, src/prime_rl/transports/rollouts/types.py (`TrainingSample`, `EncodedTensor`),
  commit 559b44772e471d1538537b8805cc77f3824a5e64;
- verl 0.9.1 (PyPI wheel), verl/experimental/agent_loop/agent_loop.py (`AgentLoopOutput`,
  `AgentLoopMetrics`; the batch layout of `_agent_loop_postprocess`, `_compute_position_ids`,
  `_postprocess`);
- skyrl 0.4.0 (PyPI wheel), skyrl/train/generators/base.py (`GeneratorOutput`).

Beyond the types, each format is fed back to the model: a forward pass over what the adapter
produced gives, at every token it marks as trained, the logprob the engine sampled it with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypedDict

import msgspec
import numpy as np
import pytest

from conftest import FIGURES
from rollwire.adapters import (
    prime_rl_sample,
    prime_rl_samples,
    skyrl_generator_output,
    verl_agent_loop_output,
    verl_batch,
)
from rollwire.errors import SampleError
from rollwire.training import Sample, with_advantages
from shapes_run import Run

# --- the peers' types, transcribed ----------------------------------------------------------------


class EncodedTensor(msgspec.Struct, array_like=True, gc=False):
    dtype: str
    shape: list[int]
    data: bytes


class PrimeTrainingSample(msgspec.Struct, array_like=True, gc=False, omit_defaults=True, forbid_unknown_fields=True):
    token_ids: list[int]
    mask: list[bool]
    logprobs: list[float]
    temperatures: list[float]
    env_name: str
    ref_logprobs: list[float] | None = None
    mm_kwargs: dict[str, EncodedTensor] | None = None
    routed_experts: Any = None
    mm_token_type_ids: list[int] | None = None
    rl_weights: list[float] | None = None
    ce_weights: list[float] | None = None
    ref_kl_weights: list[float] | None = None
    advantages: list[float] | None = None


class AgentLoopMetrics(msgspec.Struct, forbid_unknown_fields=True):
    generate_sequences: float = 0.0
    tool_calls: float = 0.0
    compute_score: float = 0.0
    num_preempted: int = -1


class AgentLoopOutput(msgspec.Struct, forbid_unknown_fields=True):
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    metrics: AgentLoopMetrics
    response_logprobs: Optional[list[float]] = None  # noqa: UP045  (as verl writes it)
    routed_experts: Any = None
    multi_modal_data: Optional[dict[str, Any]] = None  # noqa: UP045
    reward_score: Optional[float] = None  # noqa: UP045
    num_turns: int = 0
    extra_fields: dict[str, Any] = {}
    mm_processor_kwargs: Optional[dict[str, Any]] = None  # noqa: UP045
    mm_processor_output: Optional[list[dict[str, Any]]] = None  # noqa: UP045


class GeneratorOutput(TypedDict):
    prompt_token_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: list[float]  # SkyRL: Union[List[float], List[List[float]]]; per-token form checked below
    loss_masks: list[list[int]]
    stop_reasons: Optional[list[str]]  # noqa: UP045
    rollout_metrics: Optional[dict[str, Any]]  # noqa: UP045
    rollout_logprobs: Optional[list[list[float]]]  # noqa: UP045
    trajectory_ids: Optional[list[Any]]  # noqa: UP045  (TrajectoryID dataclasses)
    trajectory_generation_times: Optional[list[float]]  # noqa: UP045
    trajectory_time_splits: Optional[dict[str, list[float]]]  # noqa: UP045
    rollout_expert_indices: Optional[list[Any]]  # noqa: UP045
    rollout_sample_support: Optional[list[Any]]  # noqa: UP045
    is_last_step: Optional[list[bool]]  # noqa: UP045
    env_metrics: Optional[list[dict[str, Any]]]  # noqa: UP045
    pixel_values: Optional[list[Any]]  # noqa: UP045  (torch.Tensor)
    image_grid_thw: Optional[list[Any]]  # noqa: UP045  (torch.Tensor)


class TokenRewards(TypedDict):
    rewards: list[list[float]]


@pytest.fixture(scope="module")
def samples(shapes_run: Run) -> list[Sample]:
    return with_advantages(shapes_run.samples())


def trained_logprob_diff(model: Any, input_ids: Any, trained: Any, logprobs: Any, **inputs: Any) -> float:
    """max |forward logprob - recorded logprob| over the trained positions of a (B, L) batch."""
    import torch

    with torch.inference_mode():
        rows = model(input_ids=input_ids, **inputs).logits.float().log_softmax(-1)
    b, t = trained.nonzero(as_tuple=True)
    assert len(t) and int(t.min()) > 0
    return float((rows[b, t - 1, input_ids[b, t]] - logprobs[b, t]).abs().max())


# --- prime-rl -------------------------------------------------------------------------------------


def test_prime_rl_training_sample(shapes_run: Run, samples: list[Sample], qwen2_model: Any) -> None:
    import torch

    for sample, fields in zip(samples, prime_rl_samples(samples), strict=True):
        mm = {k: EncodedTensor(**v) for k, v in fields.pop("mm_kwargs").items()}
        typed = msgspec.msgpack.decode(msgspec.msgpack.encode(PrimeTrainingSample(**fields, mm_kwargs=mm)),
                                       type=PrimeTrainingSample)
        n = len(sample)
        assert len(typed.token_ids) == len(typed.mask) == len(typed.logprobs) == len(typed.temperatures) == n
        assert typed.advantages is not None and len(typed.advantages) == n
        assert typed.mask == np.asarray(sample.loss_mask).tolist() and typed.env_name == "shapes"
        assert typed.temperatures == [1.0] * n
        assert {a for a, m in zip(typed.advantages, typed.mask, strict=True) if not m} <= {0.0}
        assert typed.mm_kwargs is not None and set(typed.mm_kwargs) == {"pixel_values", "image_grid_thw"}
        assert typed.mm_token_type_ids == np.asarray(sample.mm_token_type_ids).tolist()

    # What prime-rl's trainer does with it: decode the tensors and run the model's forward pass.
    arrays = {k: np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape) for k, t in typed.mm_kwargs.items()}
    assert arrays["pixel_values"].dtype == np.float32 and arrays["image_grid_thw"].dtype == np.int64
    ids = torch.tensor([typed.token_ids])
    diff = trained_logprob_diff(
        qwen2_model, ids, torch.tensor([typed.mask]), torch.tensor([typed.logprobs]),
        pixel_values=torch.from_numpy(arrays["pixel_values"].copy()),
        image_grid_thw=torch.from_numpy(arrays["image_grid_thw"].copy()),
        mm_token_type_ids=torch.tensor([typed.mm_token_type_ids]), attention_mask=torch.ones_like(ids))
    FIGURES["adapters: prime-rl TrainingSample forward, max |logprob diff|"] = f"{diff:.2e}"
    assert diff < 1e-3, diff

    no_temperature = dataclasses.replace(samples[0], temperature=None)
    with pytest.raises(SampleError, match="temperature"):
        prime_rl_sample(no_temperature)
    assert prime_rl_sample(no_temperature, temperature=0.7)["temperatures"][0] == 0.7


# --- verl -----------------------------------------------------------------------------------------


def test_verl_agent_loop_output(shapes_run: Run, samples: list[Sample]) -> None:
    for sample in samples:
        fields = verl_agent_loop_output(sample, image=shapes_run.reader.image)
        out = msgspec.convert(fields, AgentLoopOutput)
        ids = np.asarray(sample.input_ids).tolist()
        assert out.prompt_ids + out.response_ids == ids
        assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs or ())
        start = len(out.prompt_ids)
        assert out.response_mask == np.asarray(sample.loss_mask[start:]).astype(int).tolist()
        assert out.response_mask[0] == 1 and 0 in out.response_mask  # environment tokens inside, masked
        np.testing.assert_array_equal(np.float32(out.response_logprobs), sample.old_logprobs[start:])
        assert out.reward_score == sample.reward and out.num_turns == 2 * len(sample.step_indices)
        assert out.multi_modal_data is not None
        images = out.multi_modal_data["images"]
        assert [im.size for im in images] == [shapes_run.reader.image(i).size for i in sample.image_ids]
        assert out.extra_fields["uid"] == sample.group_id
    assert verl_agent_loop_output(samples[0])["multi_modal_data"] is None  # no image source given


def test_verl_batch_feeds_the_model(shapes_run: Run, qwen2_model: Any) -> None:
    import torch

    picked = shapes_run.ragged(mrope=True)
    batch, non_tensor = verl_batch(picked, pad_token_id=151643, tensors="torch")
    n = len(picked)
    width_p = max(s.prompt_length for s in picked)
    width_r = max(len(s) - s.prompt_length for s in picked)
    shapes = {"prompts": (n, width_p), "responses": (n, width_r), "response_mask": (n, width_r),
              "input_ids": (n, width_p + width_r), "attention_mask": (n, width_p + width_r),
              "position_ids": (n, 4, width_p + width_r), "rollout_log_probs": (n, width_r), "rm_scores": (n, width_r)}
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert {k: v.dtype for k, v in batch.items()} == {
        **dict.fromkeys(shapes, torch.int64), "rollout_log_probs": torch.float32, "rm_scores": torch.float32}
    for row, sample in enumerate(picked):
        p, r = sample.prompt_length, len(sample) - sample.prompt_length
        assert (batch["prompts"][row, : width_p - p] == 151643).all()  # prompts left-padded
        assert (batch["responses"][row, r:] == 151643).all()  # responses right-padded
        real = batch["attention_mask"][row].bool()
        np.testing.assert_array_equal(batch["input_ids"][row, real].numpy(), sample.input_ids)
        assert batch["rm_scores"][row, r - 1] == sample.reward and batch["rm_scores"][row].count_nonzero() <= 1
        text = batch["position_ids"][row, 0]
        assert text[real].tolist() == list(range(len(sample))) and (text[~real] == 1).all()
        inputs = non_tensor["multi_modal_inputs"][row]
        np.testing.assert_array_equal(inputs["pixel_values"].numpy(), sample.pixel_values)
        grid = np.asarray(sample.image_grid_thw)
        np.testing.assert_array_equal(inputs["images_seqlens"].numpy(), grid[:, 1] * grid[:, 2])
    assert non_tensor["__num_turns__"].dtype == np.int32 and list(non_tensor["uid"]) == [s.group_id for s in picked]

    # The vision rows are what verl computes: the model's get_rope_index over the padded row.
    mm_types = (batch["input_ids"] == shapes_run.renderer.image_pad_id).long()
    grids = torch.cat([non_tensor["multi_modal_inputs"][k]["image_grid_thw"] for k in range(n)])
    want, _ = qwen2_model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=mm_types, image_grid_thw=grids,
                                               attention_mask=batch["attention_mask"])
    assert torch.equal(batch["position_ids"][:, 1:].transpose(0, 1), want)

    # verl's actor: one forward pass, positions (4, B, L); rollout_log_probs where response_mask is 1.
    response_mask = torch.cat([torch.zeros(n, width_p, dtype=torch.int64), batch["response_mask"]], dim=1)
    logprobs = torch.cat([torch.zeros(n, width_p), batch["rollout_log_probs"]], dim=1)
    diff = trained_logprob_diff(
        qwen2_model, batch["input_ids"], response_mask.bool(), logprobs, attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"].transpose(0, 1), mm_token_type_ids=mm_types,
        pixel_values=torch.cat([d["pixel_values"] for d in non_tensor["multi_modal_inputs"]]), image_grid_thw=grids)
    FIGURES["adapters: verl DataProto batch (left/right padded, 4-row positions) forward, max |logprob diff|"] = (
        f"{diff:.2e}")
    assert diff < 1e-3, diff

    plain, _ = verl_batch(shapes_run.ragged(), pad_token_id=0)  # no M-RoPE: verl's 1-D positions
    assert plain["position_ids"].shape == (n, width_p + width_r)
    np.testing.assert_array_equal(plain["position_ids"], np.clip(np.cumsum(plain["attention_mask"], -1) - 1, 0, None))
    with pytest.raises(SampleError, match="exceed"):
        verl_batch(picked, pad_token_id=0, prompt_length=width_p - 1)


# --- SkyRL ----------------------------------------------------------------------------------------


def test_skyrl_generator_output(samples: list[Sample]) -> None:
    torch = pytest.importorskip("torch")

    class TrajectoryID(msgspec.Struct):  # skyrl's dataclass: instance_id, repetition_id
        instance_id: str
        repetition_id: int

    out = skyrl_generator_output(samples, trajectory_id=TrajectoryID)
    assert set(out) == set(GeneratorOutput.__annotations__)
    typed = msgspec.convert(out, GeneratorOutput)  # every key present, every element of its type
    for k, sample in enumerate(samples):
        ids = np.asarray(sample.input_ids).tolist()
        assert typed["prompt_token_ids"][k] + typed["response_ids"][k] == ids
        start = len(typed["prompt_token_ids"][k])
        assert typed["loss_masks"][k] == np.asarray(sample.loss_mask[start:]).astype(int).tolist()
        np.testing.assert_array_equal(np.float32(typed["rollout_logprobs"][k]), sample.old_logprobs[start:])
        assert typed["rewards"][k] == sample.reward and typed["stop_reasons"][k] == sample.finish_reason
        assert out["trajectory_ids"][k] == TrajectoryID(sample.group_id, sample.sample_index)
        assert isinstance(out["pixel_values"][k], torch.Tensor)
        np.testing.assert_array_equal(out["pixel_values"][k].numpy(), sample.pixel_values)
        np.testing.assert_array_equal(out["image_grid_thw"][k].numpy(), sample.image_grid_thw)
    per_token = msgspec.convert({"rewards": skyrl_generator_output(samples, token_rewards=True)["rewards"]},
                                TokenRewards)["rewards"]
    assert [len(r) for r in per_token] == [len(r) for r in typed["response_ids"]]
    assert all(r[-1] == s.reward and not any(r[:-1]) for r, s in zip(per_token, samples, strict=True))
    lengths = [len(r) for r in typed["response_ids"]]
    assert typed["rollout_metrics"]["generate/max_num_tokens"] == max(lengths)
