"""Gemma 4 parity: rollwire's tokens and pixels against the official Gemma 4 template run by the HF
`Gemma4Processor` (the tiny model's own processor and template, the PIL image processor as the
pixel reference), on the shared corpus's conversations that fit Gemma plus Gemma-specific ones
(structured tool calls and results, typed arguments, tool declarations, thinking on and off)."""

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
from test_render_parity import CASES, SYSTEM, WEATHER_TOOL, Case, asst, img, text, tool, user

jinja2 = pytest.importorskip("jinja2")
pytest.importorskip("torchvision")  # Gemma4Processor builds its video processor with it
pytest.importorskip("transformers.models.gemma4")


def call(name: str, id: str | None = None, **arguments: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if id is not None:
        out["id"] = id
    return out


def said(content: str = "", *calls: dict[str, Any], reasoning: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = list(calls)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


RICH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the catalogue",
    "parameters": {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "description": "What to look for"},
        "mode": {"type": "string", "enum": ["fast", "exact"]},
        "limit": {"type": "integer", "nullable": True},
        "tags": {"type": "array", "items": {"type": "string"}},
        "Filter": {"type": "object", "description": "Narrowing", "required": ["year"],
                   "properties": {"year": {"type": "integer"}, "lang": {"type": "string"}}},
        "boxes": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}},
                                             "required": ["x"]}}}}}}
NO_PARAMS_TOOL = {"type": "function", "function": {"name": "ping", "description": "Ping"}}

THINK_OFF = {"enable_thinking": False}
G4_CASES = [
    Case("g4 thinking off", [SYSTEM, user(img("100x80", 50), text("hi"))], kwargs=THINK_OFF),
    Case("g4 thinking off, no system", [user("hello")], kwargs=THINK_OFF),
    Case("g4 tools declared", [SYSTEM, user("find cats")], tools=[WEATHER_TOOL, RICH_TOOL, NO_PARAMS_TOOL]),
    Case("g4 tools, thinking off", [user("find")], tools=[RICH_TOOL], kwargs=THINK_OFF),
    Case("g4 call and result", [user(img("56", 51), text("crop")), said("", call("crop", box=[0, 0, 5, 5])),
                                tool("cropped")], tools=[WEATHER_TOOL]),
    Case("g4 call and result, thinking off", [user("crop"), said("", call("crop", box=[1])), tool("ok")],
         tools=[WEATHER_TOOL], kwargs=THINK_OFF),
    Case("g4 typed arguments", [user("go"), said("", call("search", query="cats", limit=3, ratio=1.5, fast=True,
                                                         tags=["a", "b"], Filter={"year": 2020, "lang": None}))],
         tools=[RICH_TOOL]),
    Case("g4 two calls, two results by id", [user("go"), said("", call("crop", "c1", box=[1]),
                                                              call("search", "c2", query="x")),
                                             {"role": "tool", "tool_call_id": "c1", "content": "one"},
                                             {"role": "tool", "tool_call_id": "c2", "content": "two"},
                                             user(text("thanks"), img("28", 52))], tools=[WEATHER_TOOL, RICH_TOOL]),
    Case("g4 content after the results", [user("q"), said("Let me look.", call("crop", box=[2])), tool("seen"),
                                          said("It is a cat.")], tools=[WEATHER_TOOL],
         kwargs={"add_generation_prompt": False}),
    Case("g4 answer after results, then user", [user("q"), said("", call("crop", box=[2])), tool("r1"),
                                                said("Done."), user("more"), said("Sure.")],
         kwargs={"add_generation_prompt": False}),
    Case("g4 reasoning with a call after the last query", [user("q"), said("", call("crop", box=[3]),
                                                                           reasoning="need a closer look"),
                                                           tool("x")]),
    Case("g4 reasoning without a call is dropped", [user("a"), said("b", reasoning="r"), user("c")]),
    Case("g4 thought channel in content is stripped", [user("a"), said("<|channel>thought\nhmm<channel|>yes"),
                                                       user("b")]),
    Case("g4 call without a result", [user("q"), said("calling", call("crop", box=[4]))],
         kwargs={"add_generation_prompt": False}),
    Case("g4 result as text parts", [user("q"), said("", call("crop", box=[5])), tool(text("a "), text("b"))]),
    Case("g4 late system", [user("a"), asst("b"), {"role": "system", "content": " late "}, user("c")]),
    Case("g4 multi-turn, images each turn, thinking off",
         [user(img("56", 53), text("one")), asst("A."), user(text("two"), img("100x80", 54), img("28", 55)),
          asst("B."), user(img("rgba", 56))], kwargs=THINK_OFF),
    Case("g4 trimmed parts", [user(text("  spaced  "), img("56", 57), text("\n tail \n"))]),
    Case("g4 tool image is refused", [user("q"), said("", call("crop", box=[6])), tool(text("here"), img("56", 58))]),
    Case("g4 system as parts is refused", [{"role": "system", "content": [text("Be brief.")]}, user("hi")]),
]
# The shared corpus minus what assumes Hermes text tool calls (the Gemma template drops tool results
# that follow no structured call) or system content parts (the template prints the list's repr).
SHARED = [c for c in CASES if not any(m["role"] == "tool" for m in c.messages) and c.name != "system as parts"]
ALL_CASES = [*SHARED, *G4_CASES]
# What rollwire refuses although the template renders it, and what the template does instead.
REFUSED = {"g4 tool image is refused": "drops the tool result's image (then the processor counts too few)",
           "g4 system as parts is refused": "writes the Python repr of the parts list"}


def hf_messages(case: Case) -> list[dict[str, Any]]:
    msgs = copy.deepcopy(case.messages)
    for m in msgs:
        for c in m.get("tool_calls", []):
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return msgs


@pytest.fixture(scope="module")
def processor(tiny: Callable[[str], Path]) -> Any:
    from transformers import AutoProcessor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    model_dir = tiny("gemma4")
    proc = AutoProcessor.from_pretrained(str(model_dir))
    proc.image_processor = Gemma4ImageProcessorPil.from_pretrained(str(model_dir))  # the pixel reference
    return proc


@pytest.fixture(scope="module")
def renderers(tiny: Callable[[str], Path]) -> Callable[[bool], Any]:
    model = ModelDir.load(tiny("gemma4"))
    made = {thinking: create_renderer(model, enable_thinking=thinking) for thinking in (True, False)}
    return made.__getitem__


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_gemma4_matches_the_official_template(case: Case, processor: Any, renderers: Callable[[bool], Any]) -> None:
    kwargs = {"add_generation_prompt": True, "enable_thinking": True, **case.kwargs}
    renderer = renderers(kwargs["enable_thinking"])
    gen = kwargs["add_generation_prompt"]
    try:
        expected = processor.apply_chat_template(hf_messages(case), tools=case.tools, tokenize=True,
                                                 return_dict=True, return_tensors="np", **kwargs)
    except jinja2.TemplateError as exc:  # the template refuses the conversation: so does rollwire
        with pytest.raises((RenderError, MessageError)):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        pytest.skip(f"the template refuses it ({exc}); rollwire raises a typed error too")
    except (ValueError, ZeroDivisionError) as exc:  # the processor rejects it (an image, or the template's output)
        with pytest.raises(RenderError if case.name in REFUSED else ImageError):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        pytest.skip(f"HF rejects it ({type(exc).__name__}: {str(exc)[:80]}); rollwire raises a typed error too")
    if case.name in REFUSED:
        with pytest.raises(RenderError):
            renderer.render(case.messages, case.tools, add_generation_prompt=gen)
        given = sum(1 for m in case.messages if isinstance(m["content"], list)
                    for p in m["content"] if p.get("type") == "image")
        written = int((np.asarray(expected["input_ids"])[0] == 255999).sum())
        assert written < given or isinstance(case.messages[0]["content"], list), REFUSED[case.name]
        return
    ours = renderer.render(case.messages, case.tools, add_generation_prompt=gen)
    assert list(ours.token_ids) == np.asarray(expected["input_ids"])[0].tolist()
    if not ours.images:
        assert "pixel_values" not in expected
        return
    pad = renderer.image_pad_id
    store = renderer.feature_store
    assert pad == 258880
    validate_placeholders(ours.token_ids, ours.images, pad_id=pad, merge_size=3, known_ids=store)
    feats = [store.get(r.id) for r in ours.images]
    inputs = store.config.model_inputs(feats)
    for key in ("pixel_values", "image_position_ids"):
        want = np.asarray(expected[key])
        assert inputs[key].shape == want.shape and inputs[key].dtype == want.dtype, key
        assert np.array_equal(inputs[key], want), key
    mm = np.asarray(expected["mm_token_type_ids"])[0] if "mm_token_type_ids" in expected else None
    if mm is not None:
        assert (np.flatnonzero(mm == 1) == np.flatnonzero(np.asarray(ours.token_ids) == pad)).all()


def test_the_corpus_is_large_enough() -> None:
    assert len(ALL_CASES) >= 20 and len(G4_CASES) >= 20
