"""Token and pixel parity with the HF reference (the official template through the real processor).

For every conversation: rollwire's token ids equal `processor.apply_chat_template(...,
tokenize=True)`'s; its features equal the HF image processor's (uint8 exactly, normalised
float to float tolerance); and each image range covers exactly one pad run. Where the HF
processor rejects an image, rollwire rejects it with a typed error.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from rollwire.errors import ImageError
from rollwire.render import create_renderer, validate_placeholders
from rollwire.render.hermes import tools_block
from rollwire.render.qwen_vl import DEFAULT_SYSTEM_PROMPT

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the HF Qwen-VL processors require it (scripts/install_torchvision_cpu.sh)

IMAGES: dict[str, tuple[int, int, str]] = {
    "56": (56, 56, "RGB"),
    "28": (28, 28, "RGB"),
    "27x29": (27, 29, "RGB"),
    "1x1": (1, 1, "RGB"),
    "100x80": (100, 80, "RGB"),
    "2000x50": (2000, 50, "RGB"),
    "50x2000": (50, 2000, "RGB"),
    "1024": (1024, 1024, "RGB"),
    "rgba": (64, 48, "RGBA"),
    "palette": (60, 40, "P"),
    "gray": (70, 50, "L"),
    "i16": (45, 33, "I;16"),
    "la": (33, 45, "LA"),
    "cmyk": (40, 40, "CMYK"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "crop",
        "description": "Crop the image to a box and return it",
        "parameters": {"type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}},
                       "required": ["box"]},
    },
}


def img(name: str, seed: int = 0) -> dict[str, Any]:
    w, h, mode = IMAGES[name]
    return {"type": "image", "image": make_image(w, h, mode, seed)}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts) if not (len(parts) == 1 and isinstance(parts[0], str))
            else parts[0]}


def asst(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def tool(*parts: Any) -> dict[str, Any]:
    return {"role": "tool", "content": list(parts) if not (len(parts) == 1 and isinstance(parts[0], str))
            else parts[0]}


SYSTEM = {"role": "system", "content": "You look at pictures carefully."}
RAW_CALL = 'Let me zoom.\n<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 10, 10]}}\n</tool_call>'


@dataclass
class Case:
    name: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("text only", [user("Hello there")]),
    Case("system + text", [SYSTEM, user("Hi")]),
    Case("image then text", [user(img("56"), text("What is it?"))]),
    Case("text then image", [user(text("Look: "), img("100x80"))]),
    Case("two images one turn", [user(img("56", 1), text(" vs "), img("100x80", 2), text("?"))]),
    Case("three sizes", [SYSTEM, user(img("28"), img("100x80"), img("rgba"), text("compare"))]),
    Case("image only", [user(img("56", 3))]),
    Case("28x28", [user(img("28"), text("x"))]),
    Case("27x29", [user(img("27x29"), text("x"))]),
    Case("1x1", [user(img("1x1"), text("x"))]),
    Case("2000x50", [user(img("2000x50"), text("wide"))]),
    Case("50x2000", [user(img("50x2000"), text("tall"))]),
    Case("1024x1024", [user(img("1024"), text("big"))]),
    Case("RGBA", [user(img("rgba"), text("alpha"))]),
    Case("palette", [user(img("palette"), text("palette"))]),
    Case("grayscale", [user(img("gray"), text("gray"))]),
    Case("16-bit", [user(img("i16"), text("sixteen"))]),
    Case("LA", [user(img("la"), text("la"))]),
    Case("CMYK", [user(img("cmyk"), text("cmyk"))]),
    Case("multi-turn images", [user(img("56", 4), text("first")), asst("A square."),
                               user(text("and now"), img("100x80", 5)), asst("A rectangle."),
                               user(img("28", 6))]),
    Case("tool call, image in tool message", [SYSTEM, user(img("100x80", 7), text("zoom in")), asst(RAW_CALL),
                                              tool(text("cropped: "), img("56", 8))]),
    Case("tool message text only", [user("what time"), asst(RAW_CALL), tool("12:00")]),
    Case("consecutive tool messages", [user(img("56", 9), text("go")), asst(RAW_CALL + "\n" + RAW_CALL),
                                       tool(img("28", 10)), tool(text("second"), img("100x80", 11))]),
    Case("tool result then answer then user", [user("q"), asst(RAW_CALL), tool(img("56", 12)),
                                               asst("Done."), user(text("again"), img("56", 13))]),
    Case("vision ids", [user(img("56", 14), img("28", 15), text("two")), asst("ok"), user(img("100x80", 16))],
         kwargs={"add_vision_id": True}),
    Case("vision ids in tool", [user(img("56", 17)), asst(RAW_CALL), tool(img("28", 18), text("crop"))],
         kwargs={"add_vision_id": True}),
    Case("no generation prompt", [user(img("56", 19), text("hi")), asst("hello")],
         kwargs={"add_generation_prompt": False}),
    Case("system as parts", [{"role": "system", "content": [text("Be "), text("brief.")]}, user("hi")]),
    Case("assistant as parts", [user("hi"), {"role": "assistant", "content": [text("he"), text("llo")]},
                                user("again")]),
    Case("unicode and newlines", [user("\n\nhé  llo 🙂\n"), asst("  spaced\n\n"), user("\tend\n")]),
    Case("special-looking text", [user("<tool_call> not a call </tool_call> <think>x</think>")]),
    Case("four turns, image each", [m for k in range(4) for m in (user(img("56", 20 + k), text(f"turn {k}")),
                                                                   asst(f"answer {k}"))][:-1]),
    Case("same image twice", [user(img("56", 30), text("a")), asst("b"), user(img("56", 30), text("same?"))]),
    Case("tools with system", [SYSTEM, user(img("56", 31), text("crop it"))], tools=[WEATHER_TOOL]),
    Case("tools without system", [user("crop please")], tools=[WEATHER_TOOL]),
]

QWEN2_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def hf_messages(case: Case) -> list[dict[str, Any]]:
    """The conversation the official template sees; with tools, rollwire declares them in the system
    message (the official Qwen2-VL template drops `tools`), so the reference gets that system message."""
    msgs = copy.copy(case.messages)
    if case.tools:
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n\n{tools_block(case.tools)}"}
        else:
            msgs.insert(0, {"role": "system", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\n{tools_block(case.tools)}"})
    return msgs


@pytest.fixture(scope="module")
def reference(tiny: Callable[[str], Path]) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in cache:
            from transformers import AutoProcessor
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            model_dir = tiny(family)
            processor = AutoProcessor.from_pretrained(str(model_dir))
            # The PIL image processor is the pixel reference (the torchvision one resizes differently).
            processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
            cache[family] = processor
        return cache[family]

    return get


def hf_render(processor: Any, case: Case) -> dict[str, Any]:
    kwargs = {"add_generation_prompt": True, **case.kwargs}
    out = processor.apply_chat_template(hf_messages(case), tokenize=True, return_dict=True,
                                        return_tensors="np", **kwargs)
    return {k: np.asarray(v) for k, v in out.items()}


def pad_runs(ids: list[int], pad: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate([*ids, -1]):
        if t == pad and start is None:
            start = i
        elif t != pad and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("family", QWEN2_FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tokens_and_pixels_match_hf(family: str, case: Case, tiny: Callable[[str], Path],
                                    reference: Callable[[str], Any]) -> None:
    processor = reference(family)
    renderer = create_renderer(tiny(family), add_vision_id=case.kwargs.get("add_vision_id", False))
    gen = case.kwargs.get("add_generation_prompt", True)
    try:
        expected = hf_render(processor, case)
    except (ValueError, ZeroDivisionError) as exc:  # the processor rejects an image
        with pytest.raises(ImageError):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        pytest.skip(f"HF rejects it ({type(exc).__name__}: {str(exc)[:60]}); rollwire raises ImageError too")
    ours = renderer.render(case.messages, case.tools, add_generation_prompt=gen)

    assert list(ours.token_ids) == expected["input_ids"][0].tolist()
    pad = renderer.image_pad_id
    assert pad is not None
    assert [(r.offset, r.length) for r in ours.images] == pad_runs(ours.token_ids, pad)
    validate_placeholders(ours.token_ids, ours.images, pad_id=pad, merge_size=2,
                          known_ids=renderer.feature_store)  # type: ignore[attr-defined]
    assert len(ours.message_index) == len(ours.token_ids) == len(ours.sampled_mask)
    assert not any(ours.sampled_mask)
    if not ours.images:
        assert "pixel_values" not in expected or expected["pixel_values"].size == 0
        return
    store = renderer.feature_store  # type: ignore[attr-defined]
    grids = [list(r.grid_thw) for r in ours.images]
    assert grids == expected["image_grid_thw"].tolist()
    feats = [store.get(r.id) for r in ours.images]
    ours_float = np.concatenate([f.normalized(store.config) for f in feats])
    np.testing.assert_allclose(ours_float, expected["pixel_values"], atol=1e-5, rtol=0)
    # uint8 patches equal the processor's un-rescaled, un-normalised output exactly
    raw = processor.image_processor(
        [p["image"] for m in hf_messages(case) if isinstance(m["content"], list)
         for p in m["content"] if p.get("type") == "image"],
        do_rescale=False, do_normalize=False, return_tensors="np",
    )
    ours_uint8 = np.concatenate([f.pixel_values for f in feats])
    assert ours_uint8.dtype == np.uint8
    np.testing.assert_array_equal(ours_uint8.astype(np.float32), raw["pixel_values"])


def test_parity_suite_is_large_enough() -> None:
    assert len(CASES) >= 30


# --- Qwen3 (text): the template shipped with the tokenizer ------------------------------------

QWEN3_CASES = [
    Case("q3 plain", [user("Hello")]),
    Case("q3 system", [SYSTEM, user("Hi")]),
    Case("q3 multi-turn drops old reasoning",
         [user("a"), {"role": "assistant", "content": "x", "reasoning_content": "think 1"}, user("b")]),
    Case("q3 reasoning after last query", [user("a"), {"role": "assistant", "content": "",
                                                       "reasoning_content": "r", "tool_calls": [
                                                           {"function": {"name": "crop", "arguments": {"box": [1]}}}]},
                                           tool("r1"), tool("r2")]),
    Case("q3 think in content", [user("a"), asst("<think>\nhmm\n</think>\n\nyes"), user("b"), asst("c")],
         kwargs={"add_generation_prompt": False}),
    Case("q3 tools", [SYSTEM, user("crop")], tools=[WEATHER_TOOL]),
    Case("q3 tools no system", [user("crop")], tools=[WEATHER_TOOL]),
    Case("q3 no thinking", [user("hi")], kwargs={"enable_thinking": False}),
    Case("q3 tool call string args", [user("q"), {"role": "assistant", "content": "sure", "tool_calls": [
        {"id": "c1", "function": {"name": "crop", "arguments": '{"box":[1,2]}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}, user("thanks")]),
    Case("q3 late system", [user("a"), asst("b"), {"role": "system", "content": "late"}, user("c")]),
]


@pytest.mark.parametrize("case", QWEN3_CASES, ids=[c.name for c in QWEN3_CASES])
def test_qwen3_text_matches_its_template(case: Case, tiny: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    model_dir = tiny("qwen3")
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    kwargs = {"add_generation_prompt": True, **case.kwargs}
    expected = hf_tok.apply_chat_template(case.messages, tools=case.tools, tokenize=True,
                                          return_dict=True, **kwargs)["input_ids"]
    renderer = create_renderer(model_dir, enable_thinking=case.kwargs.get("enable_thinking", True))
    ours = renderer.render(case.messages, case.tools, add_generation_prompt=kwargs["add_generation_prompt"])
    assert list(ours.token_ids) == list(expected)


# --- Qwen3-VL: only when the official template is supplied -----------------------------------

QWEN3_VL_TEMPLATE = os.environ.get("ROLLWIRE_QWEN3_VL_TEMPLATE")
QWEN3_VL_CASES = [c for c in CASES if "CMYK" not in c.name] + QWEN3_CASES


@pytest.mark.skipif(not QWEN3_VL_TEMPLATE, reason="set ROLLWIRE_QWEN3_VL_TEMPLATE to a Qwen3-VL chat template file")
@pytest.mark.parametrize("case", QWEN3_VL_CASES, ids=[c.name for c in QWEN3_VL_CASES])
def test_qwen3_vl_matches_a_supplied_template(case: Case, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    from transformers import AutoProcessor

    template = Path(QWEN3_VL_TEMPLATE or "").read_text()
    thinking = "'<|im_start|>assistant\\n<think>" in template
    processor = AutoProcessor.from_pretrained(str(tiny("qwen3_vl")), chat_template=template)
    kwargs = {"add_generation_prompt": True, **case.kwargs}
    kwargs.pop("enable_thinking", None)
    try:
        expected = processor.apply_chat_template(case.messages, tools=case.tools, tokenize=True,
                                                 return_dict=True, return_tensors="np", **kwargs)
    except (ValueError, ZeroDivisionError):
        pytest.skip("HF rejects an image of this case")
    from rollwire.render.qwen3_vl import Qwen3VLRenderer

    base = create_renderer(tiny("qwen3_vl"))
    renderer = Qwen3VLRenderer(base.tokenizer, feature_store=base.feature_store,  # type: ignore[attr-defined]
                               add_vision_id=case.kwargs.get("add_vision_id", False), thinking=thinking)
    ours = renderer.render(case.messages, case.tools, add_generation_prompt=kwargs["add_generation_prompt"])
    assert list(ours.token_ids) == np.asarray(expected["input_ids"])[0].tolist()


def test_images_are_shared_not_copied(tiny: Callable[[str], Path]) -> None:
    """The same picture twice gives one id and one stored feature block."""
    renderer = create_renderer(tiny("qwen2_vl"))
    pic = make_image(56, 56, "RGB", 99)
    out = renderer.render([user(img_part(pic), text("a")), asst("b"), user(img_part(pic.copy()), text("c"))])
    assert out.images[0].id == out.images[1].id
    store = renderer.feature_store  # type: ignore[attr-defined]
    assert len(store) == 1 and store.stats().hits >= 1


def img_part(image: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": image}
