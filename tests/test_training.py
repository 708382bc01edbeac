"""Training samples from real multi-turn rollouts on tiny random-weight models (no mocks).

The proof: a merged 3-turn sample (a new image each turn, bridged prompts, one turn cut by
length) fed to a freshly loaded transformers model in ONE forward pass gives, at every loss
token, the logprob the engine reported while sampling it, turn by turn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import FIGURES, make_image
from rollwire.engines.local import LocalEngine
from rollwire.engines.types import Completion, GenerateRequest, SamplingParams
from rollwire.errors import PlaceholderError, SampleError
from rollwire.features import FeatureStore
from rollwire.render import ImageRef, RenderedTokens, Renderer, create_renderer
from rollwire.rollout.types import AssistantRecord, Step, ToolCallRecord, Trajectory
from rollwire.training import Sample, SampleBuilder, build_samples, step_extends

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration"}
IMAGES = (make_image(64, 48, seed=11), make_image(40, 72, seed=12), make_image(90, 60, seed=13))
IM_END = 151645
MAX_TOKENS = 6


def user(text: str, image: Any | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image", "image": image})
    return {"role": "user", "content": content}


TURNS = [user("Describe this:", IMAGES[0]), user("And this one?", IMAGES[1]), user("Last:", IMAGES[2])]


@dataclass
class Run:
    """One family's real rollouts: a linear 3-turn one and one whose history was rewritten."""

    family: str
    model_dir: Path
    renderer: Any
    linear: Trajectory
    branched: Trajectory

    @property
    def store(self) -> FeatureStore:
        store = self.renderer.feature_store
        assert isinstance(store, FeatureStore)
        return store


async def sample_step(engine: LocalEngine, renderer: Renderer, prompt: RenderedTokens, *, bridged: bool,
                      branch: int = 0, render_reason: str | None = None, **sampling: Any) -> Step:
    """Generate one completion for `prompt` and record it as a Step."""
    params = SamplingParams(**{"max_tokens": MAX_TOKENS, "stop_token_ids": renderer.stop_token_ids,
                               "banned_token_ids": renderer.vision_token_ids, **sampling})
    result = await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                                   sampling=params))
    completion: Completion = result.completions[0]
    parsed = renderer.parse_response(completion.token_ids)
    msg = parsed.message
    record = AssistantRecord(
        content=msg.content if isinstance(msg.content, str) else None,
        reasoning_content=msg.reasoning_content,
        tool_calls=tuple(ToolCallRecord(name=c.name, id=c.id, arguments=c.arguments if isinstance(c.arguments, str)
                                        else json.dumps(c.arguments)) for c in msg.tool_calls),
    )
    return Step(prompt_ids=list(prompt.token_ids), images=prompt.images, completion_ids=completion.token_ids,
                completion_logprobs=completion.logprobs, finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason, status=parsed.status, parse_error=parsed.error,
                message=record, bridged=bridged, render_reason=render_reason, branch=branch)


async def rollouts(engine: LocalEngine, renderer: Renderer) -> tuple[Trajectory, Trajectory]:
    # Linear: greedy (cut by length), seeded sampling (cut by length), then a forced stop (every id
    # but <|im_end|> banned; the recorded logprob stays the model's raw one).
    p1 = renderer.render([TURNS[0]])
    s1 = await sample_step(engine, renderer, p1, bridged=False, render_reason="first turn", temperature=0.0)
    p2 = renderer.bridge(p1, s1.completion_ids, [TURNS[1]]).tokens
    assert p2 is not None
    s2 = await sample_step(engine, renderer, p2, bridged=True, temperature=1.0, top_k=200, seed=5)
    p3 = renderer.bridge(p2, s2.completion_ids, [TURNS[2]]).tokens
    assert p3 is not None
    close = renderer.im_end_id  # type: ignore[attr-defined]  (the family's <|im_end|>)
    everything_but_im_end = tuple(t for t in range(engine.vocab_size) if t != close)
    s3 = await sample_step(engine, renderer, p3, bridged=True, temperature=0.0,
                           banned_token_ids=everything_but_im_end)
    linear = Trajectory(id="linear", env="test", prompt_index=0, sample_index=0, seed=5, steps=[s1, s2, s3])

    # Branched: after turn 1 the environment rewrites the assistant turn (a compaction) and renders
    # the whole conversation again; turn 3 then extends that new prompt.
    rewritten = [TURNS[0], {"role": "assistant", "content": "(earlier answer, summarised)"}, TURNS[1]]
    pb = renderer.render(rewritten)
    sb = await sample_step(engine, renderer, pb, bridged=False, branch=1, render_reason="history rewritten",
                           temperature=0.0, max_tokens=4)
    pc = renderer.bridge(pb, sb.completion_ids, [TURNS[2]]).tokens
    assert pc is not None
    sc = await sample_step(engine, renderer, pc, bridged=True, branch=1, temperature=0.9, seed=11)
    branched = Trajectory(id="branched", env="test", prompt_index=0, sample_index=1, seed=11, steps=[s1, sb, sc])
    return linear, branched


@pytest.fixture(scope="module")
def runs(tiny: Callable[[str], Path]) -> Iterator[Callable[[str], Run]]:
    made: dict[str, Run] = {}

    def get(family: str) -> Run:
        if family not in made:
            model_dir = tiny(family)
            renderer = create_renderer(model_dir)
            engine = LocalEngine(model_dir, feature_store=renderer.feature_store)  # type: ignore[attr-defined]

            async def go() -> tuple[Trajectory, Trajectory]:
                try:
                    return await rollouts(engine, renderer)
                finally:
                    await engine.close()

            linear, branched = asyncio.run(go())
            made[family] = Run(family, model_dir, renderer, linear, branched)
        return made[family]

    yield get


@pytest.fixture
def qwen2(runs: Callable[[str], Run]) -> Run:
    return runs("qwen2_vl")


def forward_logprobs(model: Any, sample: Sample) -> Any:
    """log-softmax rows of one full forward pass over the sample (positions left to the model)."""
    ids = sample.input_ids[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=sample.pixel_values,
                       image_grid_thw=sample.image_grid_thw, mm_token_type_ids=sample.mm_token_type_ids[None]).logits
    return logits[0].float().log_softmax(-1)


def loss_logprob_diff(model: Any, sample: Sample) -> float:
    rows = forward_logprobs(model, sample)
    t = sample.loss_mask.nonzero()[:, 0]
    assert int(t.min()) > 0
    got = rows[t - 1, sample.input_ids[t]]
    return float((got - sample.old_logprobs[t]).abs().max())


def replace_step(trajectory: Trajectory, index: int, **changes: Any) -> Trajectory:
    steps = list(trajectory.steps)
    steps[index] = msgspec.structs.replace(steps[index], **changes)
    return msgspec.structs.replace(trajectory, steps=steps)


# --- the proof ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_merged_sample_reproduces_the_engine_logprobs(runs: Callable[[str], Run], family: str) -> None:
    run = runs(family)
    assert [s.finish_reason for s in run.linear.steps] == ["length", "length", "stop"]
    assert [s.bridged for s in run.linear.steps] == [False, True, True]
    assert run.linear.steps[2].completion_ids == (run.renderer.im_end_id,)  # type: ignore[attr-defined]
    builder = SampleBuilder.for_renderer(run.renderer, pixel_format="float32", tensors="torch")
    linear = builder.build(run.linear)
    branched = builder.build(run.branched)
    assert [s.step_indices for s in linear] == [(0, 1, 2)]
    assert [s.step_indices for s in branched] == [(0,), (1, 2)]

    model = getattr(transformers, MODEL_CLASSES[family]).from_pretrained(
        str(run.model_dir), dtype=torch.float32).eval()
    diffs = [loss_logprob_diff(model, sample) for sample in (*linear, *branched)]
    FIGURES[f"training {family}: max |logprob diff| (merged 3-turn, branched x2)"] = [f"{d:.2e}" for d in diffs]
    assert max(diffs) < 1e-3, diffs

    # The control: the check sees pixels. Feeding the wrong image's rows moves the loss logprobs.
    sample = linear[0]
    assert sample.pixel_values is not None
    swapped = Sample(**{**sample.__dict__, "pixel_values": sample.pixel_values.flip(0)})
    control = loss_logprob_diff(model, swapped)
    FIGURES[f"training {family}: control, image rows reversed"] = f"{control:.2e}"
    assert control > 10 * max(diffs[0], 1e-6)


# --- merging and masks --------------------------------------------------------------------------


def test_linear_rollout_is_one_sample_with_exact_masks(qwen2: Run) -> None:
    trajectory = qwen2.linear
    [sample] = build_samples(trajectory, qwen2.store, image_pad_id=qwen2.renderer.image_pad_id, merge_size=2)
    last = trajectory.steps[-1]
    assert sample.input_ids.dtype == np.int64 and sample.loss_mask.dtype == np.bool_
    assert sample.old_logprobs.dtype == np.float32 and sample.mm_token_type_ids.dtype == np.int64
    assert sample.input_ids.tolist() == [*last.prompt_ids, *last.completion_ids]

    want_mask = np.zeros(len(sample), dtype=bool)
    want_logprobs = np.zeros(len(sample), dtype=np.float32)
    for step in trajectory.steps:
        start = len(step.prompt_ids)
        want_mask[start : start + len(step.completion_ids)] = True
        want_logprobs[start : start + len(step.completion_ids)] = step.completion_logprobs
    np.testing.assert_array_equal(sample.loss_mask, want_mask)
    np.testing.assert_array_equal(sample.old_logprobs, want_logprobs)
    assert sample.num_loss_tokens == sum(len(s.completion_ids) for s in trajectory.steps) == 13

    # The bridge closed the two length-cut turns with <|im_end|>: context, not trained on.
    for step in trajectory.steps[:2]:
        close = len(step.prompt_ids) + len(step.completion_ids)
        assert sample.input_ids[close] == IM_END and not sample.loss_mask[close]
    # The sampled <|im_end|> of the last turn is trained on.
    assert sample.input_ids[-1] == IM_END and sample.loss_mask[-1]

    store = qwen2.store
    assert sample.image_ids == tuple(trajectory.image_ids) and len(sample.image_ids) == 3
    assert sample.images == last.images
    feats = [store.get(i) for i in sample.image_ids]
    np.testing.assert_array_equal(sample.image_grid_thw, [f.grid_thw for f in feats])
    for ref, feat in zip(sample.images, feats, strict=True):
        assert ref.length * 4 == feat.pixel_values.shape[0]
        assert (sample.input_ids[ref.offset : ref.end] == qwen2.renderer.image_pad_id).all()
    assert sample.mm_token_type_ids.tolist() == (sample.input_ids == qwen2.renderer.image_pad_id).astype(int).tolist()


def test_rewritten_history_starts_a_new_sample(qwen2: Run) -> None:
    steps = qwen2.branched.steps
    assert not step_extends(steps[0], steps[1]) and step_extends(steps[1], steps[2])
    first, second = build_samples(qwen2.branched, qwen2.store, image_pad_id=qwen2.renderer.image_pad_id,
                                  merge_size=2)
    assert first.step_indices == (0,) and second.step_indices == (1, 2)
    assert first.num_loss_tokens == len(steps[0].completion_ids)
    assert second.num_loss_tokens == len(steps[1].completion_ids) + len(steps[2].completion_ids)
    assert first.image_ids == (steps[0].images[0].id,) and len(second.image_ids) == 3
    total = sum(s.num_loss_tokens for s in (first, second))
    assert total == sum(len(s.completion_ids) for s in steps)


def test_same_tokens_but_other_images_do_not_merge(qwen2: Run) -> None:
    steps = qwen2.linear.steps
    other = ImageRef(steps[0].images[0].id[::-1], *msgspec.structs.astuple(steps[0].images[0])[1:])
    changed = (other, *steps[1].images[1:])
    assert not step_extends(steps[0], msgspec.structs.replace(steps[1], images=changed))


# --- pixels and tensors -------------------------------------------------------------------------


def test_pixel_formats_come_from_the_store(qwen2: Run) -> None:
    store, pad = qwen2.store, qwen2.renderer.image_pad_id
    feats = [store.get(ref.id) for ref in qwen2.linear.steps[-1].images]
    [raw] = build_samples(qwen2.linear, store, image_pad_id=pad, merge_size=2, pixel_format="uint8")
    [flt] = build_samples(qwen2.linear, store, image_pad_id=pad, merge_size=2, pixel_format="float32")
    [bf16] = build_samples(qwen2.linear, store, image_pad_id=pad, merge_size=2, pixel_format="bfloat16",
                           tensors="torch")
    assert raw.pixel_values is not None and flt.pixel_values is not None and bf16.pixel_values is not None
    assert raw.pixel_values.dtype == np.uint8 and flt.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(raw.pixel_values, np.concatenate([f.pixel_values for f in feats]))
    np.testing.assert_array_equal(flt.pixel_values, np.concatenate([f.normalized(store.config) for f in feats]))
    assert bf16.pixel_values.dtype == torch.bfloat16
    assert torch.equal(bf16.pixel_values, torch.cat([f.normalized_torch(store.config, torch.bfloat16) for f in feats]))
    # A new array per sample: the store's read-only rows are never handed out.
    assert not any(np.shares_memory(raw.pixel_values, f.pixel_values) for f in feats)
    with pytest.raises(SampleError, match="bfloat16"):
        build_samples(qwen2.linear, store, image_pad_id=pad, merge_size=2, pixel_format="bfloat16")


def test_torch_output_matches_numpy(qwen2: Run) -> None:
    for fmt in ("uint8", "float32"):
        n = SampleBuilder.for_renderer(qwen2.renderer, pixel_format=fmt).build(qwen2.branched)
        t = SampleBuilder.for_renderer(qwen2.renderer, pixel_format=fmt, tensors="torch").build(qwen2.branched)
        assert len(n) == len(t) == 2
        for a, b in zip(n, t, strict=True):
            for name in ("input_ids", "loss_mask", "old_logprobs", "mm_token_type_ids", "pixel_values",
                         "image_grid_thw"):
                x, y = getattr(a, name), getattr(b, name)
                assert isinstance(y, torch.Tensor) and y.dtype == torch.from_numpy(x).dtype, name
                np.testing.assert_array_equal(x, y.numpy(), err_msg=name)
            assert (a.image_ids, a.images, a.step_indices) == (b.image_ids, b.images, b.step_indices)


def test_each_image_occurrence_is_listed(qwen2: Run) -> None:
    renderer = qwen2.renderer
    prompt = renderer.render([user("Same twice:", IMAGES[0]), user("again", IMAGES[0])])
    step = Step(prompt_ids=prompt.token_ids, images=prompt.images, completion_ids=[198, 198],
                completion_logprobs=[-11.9, -11.8], finish_reason="length", status="length",
                message=AssistantRecord(content="\n\n"), bridged=False)
    trajectory = Trajectory(id="twice", env="test", prompt_index=0, sample_index=0, seed=0, steps=[step])
    [sample] = SampleBuilder.for_renderer(renderer, pixel_format="uint8").build(trajectory)
    image_id = prompt.images[0].id
    assert sample.image_ids == (image_id, image_id)
    rows = qwen2.store.get(image_id).pixel_values
    np.testing.assert_array_equal(sample.pixel_values, np.concatenate([rows, rows]))
    assert sample.image_grid_thw is not None and sample.image_grid_thw.shape == (2, 3)


# --- errors, and inputs left alone -----------------------------------------------------------


def test_corrupted_image_ref_raises(qwen2: Run) -> None:
    builder = SampleBuilder.for_renderer(qwen2.renderer)
    last = len(qwen2.linear.steps) - 1
    ref = qwen2.linear.steps[last].images[1]
    for delta in (-1, 1):
        bad = ImageRef(ref.id, ref.offset, ref.length + delta, ref.grid_thw)
        images = list(qwen2.linear.steps[last].images)
        images[1] = bad
        with pytest.raises(PlaceholderError):
            builder.build(replace_step(qwen2.linear, last, images=tuple(images)))
    # The same corruption in every step that carries the image (so the steps still merge).
    corrupted = qwen2.linear
    for k in (1, 2):
        images = [ImageRef(r.id, r.offset, r.length - 1, r.grid_thw) if r == ref else r
                  for r in corrupted.steps[k].images]
        corrupted = replace_step(corrupted, k, images=tuple(images))
    with pytest.raises(PlaceholderError, match="grid"):
        builder.build(corrupted)


def test_unknown_image_raises(qwen2: Run) -> None:
    empty = FeatureStore(qwen2.store.config)
    with pytest.raises(PlaceholderError, match="unknown image id"):
        build_samples(qwen2.linear, empty, image_pad_id=qwen2.renderer.image_pad_id, merge_size=2)
    ref = qwen2.linear.steps[0].images[0]
    renamed = [ImageRef("f" * 40, ref.offset, ref.length, ref.grid_thw)]
    with pytest.raises(PlaceholderError, match="unknown image id"):
        SampleBuilder.for_renderer(qwen2.renderer).build(replace_step(qwen2.linear, 0, images=tuple(renamed)))


def test_error_and_empty_steps_are_context_only(qwen2: Run) -> None:
    builder = SampleBuilder.for_renderer(qwen2.renderer, pixel_format="uint8")
    [want] = builder.build(qwen2.linear)
    last = qwen2.linear.steps[-1]
    stream = last.prompt_ids + last.completion_ids
    failed = Step(prompt_ids=[*stream, 198], images=last.images, completion_ids=[], completion_logprobs=None,
                  finish_reason="error", status="malformed", message=AssistantRecord(content=None), bridged=True)
    partial = msgspec.structs.replace(failed, completion_ids=[198, 198])  # tokens but no logprobs, engine error
    for extra in ([failed], [partial], [failed, partial]):
        trajectory = msgspec.structs.replace(qwen2.linear, steps=[*qwen2.linear.steps, *extra])
        [got] = builder.build(trajectory)
        assert got.step_indices == (0, 1, 2)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    only_failed = Trajectory(id="f", env="test", prompt_index=0, sample_index=0, seed=0, steps=[failed])
    assert builder.build(only_failed) == []


def test_bad_logprobs_and_sampled_pad_raise(qwen2: Run) -> None:
    builder = SampleBuilder.for_renderer(qwen2.renderer)
    with pytest.raises(SampleError, match="no completion_logprobs"):
        builder.build(replace_step(qwen2.linear, 1, completion_logprobs=None))
    with pytest.raises(SampleError, match="logprobs for"):
        builder.build(replace_step(qwen2.linear, 0, completion_logprobs=[-1.0] * (MAX_TOKENS - 1)))
    with pytest.raises(SampleError, match="not finite"):
        builder.build(replace_step(qwen2.linear, 0, completion_logprobs=[float("nan")] * MAX_TOKENS))
    step = qwen2.linear.steps[2]
    pad = qwen2.renderer.image_pad_id
    with pytest.raises(SampleError, match="image pad token"):
        builder.build(replace_step(qwen2.linear, 2, completion_ids=[198, pad], completion_logprobs=[-1.0, -1.0]))
    assert step.completion_ids == (IM_END,)


def test_inputs_are_not_mutated(qwen2: Run) -> None:
    before = msgspec.json.encode(qwen2.branched)
    rows = {i: qwen2.store.get(i).pixel_values.copy() for i in qwen2.branched.image_ids}
    for fmt in ("uint8", "float32"):
        samples = SampleBuilder.for_renderer(qwen2.renderer, pixel_format=fmt).build(qwen2.branched)
        for sample in samples:  # writing into a sample cannot reach the store or the trajectory
            assert sample.pixel_values is not None
            sample.pixel_values[...] = 0
            sample.input_ids[...] = 0
    assert msgspec.json.encode(qwen2.branched) == before
    for image_id, saved in rows.items():
        np.testing.assert_array_equal(qwen2.store.get(image_id).pixel_values, saved)


def test_builder_options(qwen2: Run, tiny: Callable[[str], Path]) -> None:
    builder = SampleBuilder.for_renderer(qwen2.renderer)
    assert (builder.image_pad_id, builder.merge_size, builder.features) == (151655, 2, qwen2.store)
    with pytest.raises(SampleError, match="merge_size"):
        SampleBuilder(qwen2.store, image_pad_id=151655, merge_size=3)
    with pytest.raises(SampleError, match="pixel_format"):
        SampleBuilder(qwen2.store, image_pad_id=151655, merge_size=2, pixel_format="float16")  # type: ignore[arg-type]

    # A text-only family: no pixels, no image inputs; a step with images is an error.
    text = create_renderer(tiny("qwen3"))
    prompt = text.render([{"role": "user", "content": "Hi"}])
    step = Step(prompt_ids=prompt.token_ids, images=(), completion_ids=[198], completion_logprobs=[-11.0],
                finish_reason="length", status="length", message=AssistantRecord(content="\n"), bridged=False)
    trajectory = Trajectory(id="t", env="test", prompt_index=0, sample_index=0, seed=0, steps=[step])
    [sample] = SampleBuilder.for_renderer(text).build(trajectory)
    assert sample.pixel_values is None and sample.image_grid_thw is None and sample.image_ids == ()
    assert not sample.mm_token_type_ids.any() and sample.num_loss_tokens == 1
    with pytest.raises(SampleError, match="has images"):
        SampleBuilder.for_renderer(text).build(qwen2.linear)


@pytest.mark.parametrize("family", ["gemma4", "qwen2_vl"])
def test_processor_declared_inputs_reproduce_the_engine_logprobs(runs: Callable[[str], Run], family: str) -> None:
    """`model_inputs=True` gives each sample the image arrays its family's processor declares
    (Gemma 4: padded pixel_values + image_position_ids), and a forward pass with exactly those
    reproduces the rollout's logprobs."""
    run = runs(family)
    builder = SampleBuilder.for_renderer(run.renderer, tensors="torch", model_inputs=True)
    samples = [*builder.build(run.linear), *builder.build(run.branched)]
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(run.model_dir), dtype=torch.float32).eval()
    diffs = []
    for sample in samples:
        assert sample.image_inputs, "every sample of these rollouts has images"
        ids = sample.input_ids[None]
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=sample.mm_token_type_ids[None],
                           **sample.image_inputs).logits[0].float().log_softmax(-1)
        t = sample.loss_mask.nonzero()[:, 0]
        diffs.append(float((logits[t - 1, sample.input_ids[t]] - sample.old_logprobs[t]).abs().max()))
    FIGURES[f"training {family}: processor-declared inputs, max |logprob diff|"] = [f"{d:.2e}" for d in diffs]
    assert max(diffs) < 1e-3, diffs
    if family == "gemma4":
        assert set(samples[0].image_inputs) == {"pixel_values", "image_position_ids"}
