"""Qwen3.5 parity: rollwire's tokens and pixels against the official Qwen3.5 template run by the
HF processor (the tiny model's own processor and template), on the shared corpus plus
Qwen3.5-specific conversations (XML tool calls, typed arguments, thinking on and off)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollwire.errors import ImageError, MessageError, RenderError
from rollwire.render import ModelDir, create_renderer, validate_placeholders
from test_render_parity import CASES, QWEN3_CASES, SYSTEM, WEATHER_TOOL, Case, img, text, tool, user

jinja2 = pytest.importorskip("jinja2")
pytest.importorskip("torchvision")


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


Q35_CASES = [
    Case("q35 typed arguments", [user(img("56", 40), text("crop")), {"role": "assistant", "content": "Zooming.",
         "tool_calls": [call("crop", box=[0, 0, 5, 5], scale=1.5, fast=True, label="x", meta={"a": None})]},
         tool(img("28", 41), text("done"))], tools=[WEATHER_TOOL]),
    Case("q35 two calls, no content", [user("go"), {"role": "assistant", "content": "", "tool_calls": [
        call("crop", box=[1]), call("crop", box=[2])]}, tool("one"), tool("two"), user("thanks")],
        tools=[WEATHER_TOOL]),
    Case("q35 reasoning after the last query", [user("a"), {"role": "assistant", "content": "b",
                                                            "reasoning_content": " r \n"}]),
    Case("q35 reasoning before the last query is dropped", [user("a"), {"role": "assistant", "content": "b",
         "reasoning_content": "r"}, user(img("56", 42), text("c"))]),
    Case("q35 think in content", [user("a"), {"role": "assistant", "content": "<think>\nr\n</think>\n\nyes"}],
         kwargs={"add_generation_prompt": False}),
    Case("q35 thinking off", [SYSTEM, user(img("100x80", 43), text("hi"))], kwargs={"enable_thinking": False}),
    Case("q35 thinking off, tools", [user("crop")], tools=[WEATHER_TOOL], kwargs={"enable_thinking": False}),
    Case("q35 empty system with tools", [{"role": "system", "content": "  "}, user("x")], tools=[WEATHER_TOOL]),
    Case("q35 multi-step reasoning", [user("q"), {"role": "assistant", "content": "", "reasoning_content": "look",
         "tool_calls": [call("crop", box=[3])]}, tool(img("56", 48)), {"role": "assistant", "content": "seen",
         "reasoning_content": "done looking"}], kwargs={"add_generation_prompt": False}),
    Case("q35 only tool responses", [user("<tool_response>x</tool_response>")]),
    Case("q35 image in system", [{"role": "system", "content": [img("56", 44)]}, user("q")]),
    Case("q35 vision ids", [user(img("56", 45), img("28", 46)), {"role": "assistant", "content": "ok",
                            "tool_calls": [call("crop", box=[1])]}, tool(img("100x80", 47))],
         kwargs={"add_vision_id": True}),
]
ALL_CASES = [*CASES, *QWEN3_CASES, *Q35_CASES]


def hf_messages(case: Case) -> list[dict[str, Any]]:
    """The messages for the template: OpenAI's JSON-string arguments as the mapping it iterates."""
    msgs = copy.deepcopy(case.messages)
    for m in msgs:
        for c in m.get("tool_calls", []):
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return msgs


@pytest.fixture(scope="module")
def processor(tiny: Callable[[str], Path]) -> Any:
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model_dir = tiny("qwen3_5")
    proc = AutoProcessor.from_pretrained(str(model_dir))
    proc.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))  # the pixel reference
    return proc


@pytest.fixture(scope="module")
def renderers(tiny: Callable[[str], Path]) -> Callable[[bool, bool], Any]:
    """One renderer per (add_vision_id, enable_thinking), sharing one model directory read."""
    model = ModelDir.load(tiny("qwen3_5"))
    made: dict[tuple[bool, bool], Any] = {}

    def get(vision_id: bool, thinking: bool) -> Any:
        if (vision_id, thinking) not in made:
            made[vision_id, thinking] = create_renderer(model, add_vision_id=vision_id, enable_thinking=thinking)
        return made[vision_id, thinking]

    return get


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_qwen3_5_matches_the_official_template(case: Case, processor: Any,
                                               renderers: Callable[[bool, bool], Any]) -> None:
    kwargs = {"add_generation_prompt": True, **case.kwargs}
    renderer = renderers(kwargs.get("add_vision_id", False), kwargs.get("enable_thinking", True))
    gen = kwargs["add_generation_prompt"]
    try:
        expected = processor.apply_chat_template(hf_messages(case), tools=case.tools, tokenize=True,
                                                 return_dict=True, return_tensors="np", **kwargs)
    except jinja2.TemplateError as exc:  # the template refuses the conversation: so does rollwire
        with pytest.raises((RenderError, MessageError)):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        pytest.skip(f"the template refuses it ({exc}); rollwire raises a typed error too")
    except (ValueError, ZeroDivisionError) as exc:
        with pytest.raises(ImageError):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        pytest.skip(f"HF rejects an image ({type(exc).__name__}); rollwire raises ImageError too")
    ours = renderer.render(case.messages, case.tools, add_generation_prompt=gen)
    assert list(ours.token_ids) == np.asarray(expected["input_ids"])[0].tolist()
    if not ours.images:
        return
    pad = renderer.image_pad_id
    assert pad is not None
    store = renderer.feature_store  # type: ignore[attr-defined]
    validate_placeholders(ours.token_ids, ours.images, pad_id=pad, merge_size=2, known_ids=store)
    assert [list(r.grid_thw) for r in ours.images] == np.asarray(expected["image_grid_thw"]).tolist()
    feats = [store.get(r.id) for r in ours.images]
    np.testing.assert_allclose(np.concatenate([f.normalized(store.config) for f in feats]),
                               np.asarray(expected["pixel_values"]), atol=1e-5, rtol=0)


def test_the_corpus_is_large_enough() -> None:
    assert len(ALL_CASES) >= 20
