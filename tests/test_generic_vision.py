"""The generic vision path, on model directories whose model type no family claims.

The directories are copies of tiny Qwen-VL models with `config.json`'s model type changed and a
`processor_config.json` naming the processor class (as Hugging Face repos ship it), so their
processor, template and tokenizer are real HF ones and the renderer has no family code to lean on.
The oracle is `processor.apply_chat_template(..., tokenize=True)` with the PIL image processor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from rollwire.errors import (
    FeatureError,
    ImageError,
    ImageRejectedError,
    PlaceholderError,
    RenderError,
    UnsupportedProcessorError,
)
from rollwire.features import FeatureStore, VisionConfig, compute_features
from rollwire.features.hf import HFImageProcessor
from rollwire.render import ImageRef, create_renderer, validate_placeholders
from rollwire.render.generic import ChatTemplateRenderer
from rollwire.render.generic_vision import GenericVisionRenderer

PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen3_5": "Qwen3VLProcessor"}


def outside_the_table(model_dir: Path, out: Path, processor_class: str | None) -> Path:
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "somethingelse"}))
    if processor_class is not None:
        (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    return out


@pytest.fixture(scope="module")
def generic_dir(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = outside_the_table(tiny(family), tmp_path_factory.mktemp(family) / "m", PROCESSORS[family])
        return made[family]

    return get


@pytest.fixture(scope="module")
def renderer(generic_dir: Callable[[str], Path]) -> Callable[[str], GenericVisionRenderer]:
    made: dict[str, GenericVisionRenderer] = {}

    def get(family: str) -> GenericVisionRenderer:
        if family not in made:
            r = create_renderer(generic_dir(family))
            assert isinstance(r, GenericVisionRenderer)
            made[family] = r
        return made[family]

    return get


@pytest.fixture(scope="module")
def reference(generic_dir: Callable[[str], Path]) -> Callable[[str], Any]:
    made: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in made:
            from transformers import AutoProcessor
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            processor = AutoProcessor.from_pretrained(str(generic_dir(family)))
            processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(generic_dir(family)))
            made[family] = processor
        return made[family]

    return get


def img(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    return make_image(w, h, mode, seed=seed)


def call(name: str, cid: str, **args: Any) -> dict[str, Any]:
    return {"type": "function", "id": cid, "function": {"name": name, "arguments": json.dumps(args)}}


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The oracle's input: tool-call arguments as a dict, as transformers documents for templates."""
    out = []
    for m in messages:
        calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                 for c in m.get("tool_calls", [])]
        out.append({**m, "tool_calls": calls} if calls else m)
    return out


@dataclass
class Case:
    name: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


ZOOM = {"type": "function", "function": {"name": "zoom", "description": "Zoom into the image.",
                                         "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
SHARED = img(90, 70, seed=40)
CASES = [
    Case("one_image", [{"role": "user", "content": [{"type": "image", "image": img(100, 80, 1)},
                                                    {"type": "text", "text": "What is this?"}]}]),
    Case("text_only", [{"role": "user", "content": "Hello there"}]),
    Case("two_images_one_message", [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": img(64, 64, 2)},
        {"type": "text", "text": "and"}, {"type": "image", "image": img(120, 50, 3)}]}]),
    Case("three_shapes", [{"role": "user", "content": [
        {"type": "image", "image": img(30, 300, 4)}, {"type": "image", "image": img(300, 30, 5)},
        {"type": "image", "image": img(57, 57, 6)}, {"type": "text", "text": "tall, wide, square"}]}]),
    Case("system_and_image", [{"role": "system", "content": "You see images."},
                              {"role": "user", "content": [{"type": "image", "image": img(80, 80, 7)}]}]),
    Case("multi_turn", [
        {"role": "user", "content": [{"type": "image", "image": img(70, 90, 8)}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image", "image": img(96, 40, 9)}]},
        {"role": "assistant", "content": "A blue line."},
        {"role": "user", "content": "Thanks"}]),
    Case("tool_returns_image", [
        {"role": "user", "content": [{"type": "image", "image": img(100, 100, 10)}, {"type": "text", "text": "zoom"}]},
        {"role": "assistant", "content": "", "tool_calls": [call("zoom", "c1", x=2)]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "zoomed"},
                                                           {"type": "image", "image": img(56, 84, 11)}]}],
         tools=[ZOOM]),
    Case("two_tool_messages", [
        {"role": "user", "content": "look twice"},
        {"role": "assistant", "content": "", "tool_calls": [call("zoom", "a", x=1), call("zoom", "b", x=3)]},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "image", "image": img(60, 60, 12)}]},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "image", "image": img(44, 130, 13)}]}],
         tools=[ZOOM]),
    Case("same_image_twice", [
        {"role": "user", "content": [{"type": "image", "image": SHARED}, {"type": "text", "text": "once"}]},
        {"role": "assistant", "content": "seen"},
        {"role": "user", "content": [{"type": "image", "image": SHARED}, {"type": "text", "text": "twice"}]}]),
    Case("rgba_and_grey", [{"role": "user", "content": [
        {"type": "image", "image": img(50, 70, 14, "RGBA")}, {"type": "image", "image": img(66, 48, 15, "L")}]}]),
    Case("no_generation_prompt", [
        {"role": "user", "content": [{"type": "image", "image": img(84, 84, 16)}]},
        {"role": "assistant", "content": "Done."}], kwargs={"add_generation_prompt": False}),
    Case("large_image", [{"role": "user", "content": [{"type": "image", "image": img(640, 480, 17)},
                                                      {"type": "text", "text": "big"}]}]),
]
# Qwen3.5's template: tools, thinking on and off, images in tool results.
CASES_3_5 = [c for c in CASES if c.name in ("one_image", "three_shapes", "multi_turn", "tool_returns_image",
                                            "two_tool_messages")] + [
    Case("thinking_off", CASES[0].messages, kwargs={"enable_thinking": False})]
PARAMS = [("qwen2_vl", c) for c in CASES] + [("qwen3_5", c) for c in CASES_3_5]


@pytest.mark.parametrize(("family", "case"), PARAMS, ids=[f"{f}-{c.name}" for f, c in PARAMS])
def test_tokens_and_pixels_equal_the_hf_processor(family: str, case: Case, renderer: Callable[[str], Any],
                                                  reference: Callable[[str], Any]) -> None:
    r, processor = renderer(family), reference(family)
    if case.kwargs.get("enable_thinking") is False:
        r = GenericVisionRenderer(r.processor, feature_store=r.feature_store, enable_thinking=False)
    gen = case.kwargs.get("add_generation_prompt", True)
    out = r.render(case.messages, case.tools, add_generation_prompt=gen)
    hf = processor.apply_chat_template(hf_messages(case.messages), tools=case.tools, tokenize=True, return_dict=True,
                                       return_tensors="np", **{"add_generation_prompt": True, **case.kwargs})
    assert list(out.token_ids) == hf["input_ids"][0].tolist()
    n_images = sum(isinstance(p, dict) and p.get("type") == "image" for m in case.messages
                   for p in (m["content"] if isinstance(m["content"], list) else []))
    assert len(out.images) == n_images
    validate_placeholders(out.token_ids, out.images, pad_id=r.image_pad_id, merge_size=r.merge_size,
                          known_ids=r.feature_store)
    if n_images:
        store = r.feature_store
        inputs = store.config.model_inputs([store.get(ref.id) for ref in out.images])
        assert inputs["pixel_values"].dtype == np.float32
        assert np.array_equal(inputs["pixel_values"], hf["pixel_values"])
        assert np.array_equal(inputs["image_grid_thw"], hf["image_grid_thw"])
    assert len(out.message_index) == len(out.token_ids) and not any(out.sampled_mask)
    assert out.num_messages == len(case.messages)


def test_image_tokens_carry_their_message_index(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    case = next(c for c in CASES if c.name == "tool_returns_image")
    out = r.render(case.messages, case.tools)
    assert [out.message_index[ref.offset] for ref in out.images] == [0, 2]
    assert out.message_index[-1] == len(case.messages)  # the generation prompt
    assert out.images[0].id != out.images[1].id
    same = next(c for c in CASES if c.name == "same_image_twice")
    twice = r.render(same.messages)
    assert twice.images[0].id == twice.images[1].id and twice.images[0].offset < twice.images[1].offset


def test_refs_validate_and_a_moved_ref_does_not(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    out = r.render(CASES[2].messages)
    first = out.images[0]
    moved = (ImageRef(first.id, first.offset + 1, first.length, first.grid_thw), *out.images[1:])
    with pytest.raises(PlaceholderError, match="image 0"):
        validate_placeholders(out.token_ids, moved, pad_id=r.image_pad_id, merge_size=r.merge_size)
    with pytest.raises(PlaceholderError, match="outside every image range"):
        validate_placeholders(out.token_ids, out.images[:1], pad_id=r.image_pad_id, merge_size=r.merge_size)


def test_bridge_declines_with_a_reason(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    prompt = r.render(CASES[0].messages)
    done = [*r.tokenizer.encode_ids("A cat."), r.stop_token_ids[0]]
    result = r.bridge(prompt, done, [{"role": "user", "content": "more"}])
    assert result.tokens is None and not result
    assert result.reason is not None and "re-render" in result.reason


def test_hermes_tool_calls_are_parsed(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    im_end = r.tokenizer.token_id("<|im_end|>")
    assert im_end in r.stop_token_ids
    text = 'Let me zoom.\n<tool_call>\n{"name": "zoom", "arguments": {"x": 2}}\n</tool_call>'
    parsed = r.parse_response([*r.tokenizer.encode_ids(text), im_end])
    assert parsed.status == "stop" and parsed.error is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.message.tool_calls] == [("zoom", {"x": 2})]
    assert parsed.message.content == "Let me zoom.\n"
    bad = r.parse_response([*r.tokenizer.encode_ids("<tool_call>\n{not json}\n</tool_call>"), im_end])
    assert bad.status == "malformed" and bad.error is not None and "not JSON" in bad.error
    cut = r.parse_response(r.tokenizer.encode_ids('<tool_call>\n{"name": "zo'))
    assert cut.status == "length" and not cut.message.tool_calls
    plain = r.parse_response([*r.tokenizer.encode_ids("A cat."), im_end])
    assert (plain.status, plain.message.content, plain.message.tool_calls) == ("stop", "A cat.", ())


def test_a_sampled_vision_token_is_malformed_and_banned(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    assert {r.tokenizer.token_id(n) for n in names} <= set(r.vision_token_ids)
    assert r.tokenizer.token_id("<|im_end|>") not in r.vision_token_ids
    ids = [*r.tokenizer.encode_ids("look"), r.image_pad_id, r.tokenizer.token_id("<|im_end|>")]
    parsed = r.parse_response(ids)
    assert parsed.status == "malformed" and parsed.error is not None and "position 1" in parsed.error


def test_an_image_the_processor_rejects_is_a_typed_error(renderer: Callable[[str], Any],
                                                        reference: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    sliver = Image.new("RGB", (1000, 2), (9, 9, 9))
    with pytest.raises(ValueError, match="aspect ratio"):  # the HF processor refuses it too
        reference("qwen2_vl").image_processor(images=[sliver])
    before = len(r.feature_store)
    with pytest.raises(ImageRejectedError, match=r"Qwen2VLImageProcessorPil rejects the 1000x2 image") as info:
        r.render([{"role": "user", "content": [{"type": "image", "image": sliver}]}])
    assert isinstance(info.value, ImageError)
    assert len(r.feature_store) == before


def test_image_tokens_the_template_did_not_write_for_an_image_are_refused(renderer: Callable[[str], Any]) -> None:
    r = renderer("qwen2_vl")
    with pytest.raises(RenderError, match="wrote 2 image token"):
        r.render([{"role": "user", "content": [{"type": "text", "text": "<|image_pad|>"},
                                               {"type": "image", "image": img(56, 56, 20)}]}])


def test_the_image_processor_adapter_matches_rollwires_own_qwen_processor(generic_dir: Callable[[str], Path]) -> None:
    """Independent check: rollwire's Qwen-VL processor (parity-tested on its own) gives the same rows."""
    adapter = HFImageProcessor.from_pretrained(generic_dir("qwen2_vl"))
    own = VisionConfig.from_pretrained(generic_dir("qwen2_vl"))
    assert type(adapter.processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (adapter.merge_size, adapter.row_size, adapter.unresized_side()) == (2, own.row_size, own.unresized_side())
    for seed, (w, h) in enumerate([(100, 80), (33, 250), (56, 56)]):
        rows, grid = adapter.process(img(w, h, 30 + seed))
        want_rows, want_grid = own.process(img(w, h, 30 + seed))
        assert grid == want_grid and np.array_equal(rows, want_rows) and not rows.flags.writeable
        assert np.array_equal(adapter.normalize(rows), own.normalize(want_rows))
        arrays = adapter.wire_arrays(compute_features(img(w, h, 30 + seed).convert("RGB"), adapter))
        assert adapter.from_wire(rows, arrays) == grid
    with pytest.raises(FeatureError, match="does not fit"):
        adapter.from_wire(rows[:-4], arrays)
    again = HFImageProcessor.from_pretrained(generic_dir("qwen2_vl"))
    assert again.fingerprint() == adapter.fingerprint()
    cfg = json.loads((generic_dir("qwen2_vl") / "preprocessor_config.json").read_text())
    assert HFImageProcessor.from_dict(cfg).fingerprint() == adapter.fingerprint()
    with pytest.raises(UnsupportedProcessorError, match="cannot build NoSuchProcessor"):
        HFImageProcessor.from_dict({**cfg, "image_processor_type": "NoSuchProcessor"})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    smaller = HFImageProcessor(Qwen2VLImageProcessorPil.from_pretrained(str(generic_dir("qwen2_vl")),
                                                                        max_pixels=56 * 56 * 4))
    assert smaller.fingerprint() != adapter.fingerprint()


def test_processors_that_cannot_be_adapted_are_refused(generic_dir: Callable[[str], Path]) -> None:
    from transformers import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with pytest.raises(UnsupportedProcessorError, match="CLIPImageProcessorPil declares no merge_size"):
        HFImageProcessor(CLIPImageProcessorPil())
    clip = CLIPImageProcessorPil()
    clip.merge_size = 1
    with pytest.raises(UnsupportedProcessorError, match=r"CLIPImageProcessorPil returns no per-image grid"):
        HFImageProcessor(clip)

    class HalfStep(Qwen2VLImageProcessorPil):  # un-normalised output off the uint8 grid
        def _preprocess(self, images: Any, **kwargs: Any) -> Any:
            out = super()._preprocess(images, **kwargs)
            if not kwargs["do_normalize"]:
                out["pixel_values"] = out["pixel_values"] + 0.5
            return out

    with pytest.raises(UnsupportedProcessorError, match=r"HalfStep: un-normalised output .* not integral"):
        HFImageProcessor(HalfStep())

    class PerImage(Qwen2VLImageProcessorPil):  # normalises by the image's own mean: not from rows alone
        def normalize(self, image: np.ndarray, mean: Any, std: Any, **kwargs: Any) -> np.ndarray:
            return (image - image.mean()).astype(np.float32)

    with pytest.raises(UnsupportedProcessorError, match=r"PerImage: its default output .* cannot be reproduced"):
        HFImageProcessor(PerImage())


def test_a_directory_without_an_adaptable_processor_stays_text_only(
        tiny: Callable[[str], Path], tmp_path: Path, renderer: Callable[[str], Any]) -> None:
    d = outside_the_table(tiny("qwen2_vl"), tmp_path / "noproc", None)  # no processor_class: a tokenizer
    r = create_renderer(d)
    assert isinstance(r, ChatTemplateRenderer)
    with pytest.raises(RenderError, match="processor is a Qwen2Tokenizer"):
        r.render([{"role": "user", "content": [{"type": "image", "image": img(56, 56, 21)}]}])
    with pytest.raises(RenderError, match="feature store's processor"):
        GenericVisionRenderer(renderer("qwen2_vl").processor, feature_store=FeatureStore(VisionConfig()))


def test_the_local_engine_runs_a_model_outside_the_table(generic_dir: Callable[[str], Path],
                                                        renderer: Callable[[str], Any],
                                                        tiny: Callable[[str], Path]) -> None:
    """The embedded engine takes the class from `architectures` when no family names it: the
    generic path's prompt gives the same greedy ids and logprobs as the family path on the same
    weights."""
    import asyncio

    from rollwire.engines.local import LocalEngine
    from rollwire.engines.types import GenerateRequest, SamplingParams

    msgs = [{"role": "user", "content": [{"type": "image", "image": img(64, 48, 5)},
                                         {"type": "text", "text": "What is it?"}]}]
    generic = renderer("qwen2_vl")
    family = create_renderer(tiny("qwen2_vl"))

    async def run(model_dir: Path, r: Any) -> Any:
        prompt = r.render(msgs)
        async with LocalEngine(model_dir, feature_store=r.feature_store) as engine:
            result = await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                                           sampling=SamplingParams(max_tokens=4, temperature=0.0)))
        return prompt.token_ids, result.completions[0]

    ids_g, out_g = asyncio.run(run(generic_dir("qwen2_vl"), generic))
    ids_f, out_f = asyncio.run(run(tiny("qwen2_vl"), family))
    assert ids_g == ids_f
    assert out_g.token_ids == out_f.token_ids
    assert max(abs(a - b) for a, b in zip(out_g.logprobs, out_f.logprobs, strict=True)) < 1e-5
