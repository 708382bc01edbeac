"""Gemma 4 against the real vLLM server (CPU build 0.32, float32): render parity, the wire layout of
an image item, token-in/token-out against the local engine, and a short multi-turn rollout.

vLLM reads `vision_config.default_output_length` (the soft-token budget real Gemma 4 checkpoints
carry; transformers' config class does not declare it); the tiny model writes it, equal to the
preprocessor's `max_soft_tokens`, and the fixture checks that. vLLM's placeholder range covers the
`<|image>` ... `<image|>` pair around the soft tokens; rollwire's covers the soft tokens only (what
the server's encoder fills), so the server's is rollwire's widened by one on each side.

Not compared: a system message (vLLM hands this template every string content as a list of parts,
and the template prints the list's Python repr: "[{'type': 'text', 'text': 'Be terse.'}]") and an
image in a tool result (the template drops it; the server answers 500 "Failed to apply prompt
replacement for mm_items['image'][1]", and rollwire refuses it, README note 5).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import FIGURES
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs
from rollwire.render import create_renderer

from .conftest import (
    CALL,
    CROP,
    Server,
    img,
    local_completion,
    max_logprob_diff,
    port,
    served,
    server_chat,
    server_render,
    short_rollout,
    text,
)

pytestmark = pytest.mark.vllm
PORT = port("GEMMA4", 18471)
FAMILY = "gemma4"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = tmp_path_factory.mktemp("gemma4") / "model"
    shutil.copytree(tiny(FAMILY), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    soft = json.loads((model_dir / "preprocessor_config.json").read_text())["max_soft_tokens"]
    # The tiny model carries the soft-token budget vLLM reads, equal to the processor's.
    assert config["vision_config"]["default_output_length"] == soft
    with served(model_dir, FAMILY, PORT, dtype="float32") as srv:
        yield srv


# Sizes the processor keeps as they are (multiples of 48 whose scale-up to the 630-patch budget
# rounds back down), so PIL and the server's torchvision resizing cannot differ.
CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = [
    ([{"role": "user", "content": "Hello"}], None, False),
    ([{"role": "user", "content": [img(336, 432, 1), text("What is this?")]}], None, False),
    ([{"role": "user", "content": [img(336, 432, 1), text("What is this?")]}], None, True),
    ([{"role": "user", "content": [text("Two: "), img(384, 384, 2), img(288, 528, 3), text("compare")]}], None, True),
    ([{"role": "user", "content": [img(432, 336, 4), text("?")]}, {"role": "assistant", "content": "x"},
      {"role": "user", "content": [img(432, 336, 4), text("same picture?")]}], None, False),
    ([{"role": "user", "content": [img(384, 384, 5), text("a")]}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": [img(528, 288, 6), text("c")]}], None, False),
    ([{"role": "user", "content": [img(384, 384, 7), text("crop it")]}, CALL,
      {"role": "tool", "tool_call_id": "c0", "content": "cropped"}], [CROP], True),
    ([{"role": "user", "content": [img(384, 384, 8), img(336, 432, 9), img(288, 528, 10), text("three")]}],
     None, False),
]


def test_rendered_ids_and_image_items_equal_the_servers(server: Server) -> None:
    renderers = {on: create_renderer(server.model_dir, enable_thinking=on) for on in (True, False)}
    matched = items = 0
    worst = 0.0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for conv, tools, thinking in CONVERSATIONS:
            answer = server_render(client, FAMILY, conv, tools, thinking)
            renderer = renderers[thinking]
            ours = renderer.render(conv, tools=tools)
            assert list(ours.token_ids) == answer["token_ids"]
            placeholders = answer["features"]["mm_placeholders"]["image"] if ours.images else []
            assert [(p["offset"], p["length"]) for p in placeholders] == [
                (i.offset - 1, i.length + 2) for i in ours.images]
            store = renderer.feature_store
            for ref, item in zip(ours.images, answer["features"]["kwargs_data"]["image"] if ours.images else [],
                                 strict=True):
                mine = store.get(ref.id)  # type: ignore[attr-defined]
                pixels, grid, dtype_name = decode_image_kwargs(item, store.config)  # type: ignore[attr-defined]
                assert dtype_name == "float32" and grid == mine.grid_thw == ref.grid_thw
                ref_pixels, _, _ = decode_image_kwargs(encode_image_kwargs(mine, store, "float32"),
                                                       store.config)  # type: ignore[attr-defined]
                # The server rescales in float32 (x * float32(1/255)), the HF processor in float64: 1 ulp.
                worst = max(worst, float(np.max(np.abs(pixels - ref_pixels))))
                np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-6)
                items += 1
            matched += 1
    FIGURES[f"{FAMILY} render parity conversations"] = matched
    FIGURES[f"{FAMILY} max |pixel| server item vs rollwire item"] = f"{worst:.3g} over {items} images"
    assert matched == len(CONVERSATIONS) and items == 12


async def test_greedy_completion_equals_chat_completions_and_local_engine(server: Server) -> None:
    renderer = create_renderer(server.model_dir, enable_thinking=False)
    conv = CONVERSATIONS[5][0]
    prompt = renderer.render(conv)
    request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                              sampling=SamplingParams(max_tokens=8, temperature=0.0))
    async with VLLMEngine.for_renderer(server.url, renderer) as engine:
        ours = (await engine.generate(request)).completions[0]
        assert engine.pixel_format == "float32"  # detected by the render probe, not given
    answer = server_chat(server, conv, 8, chat_template_kwargs={"enable_thinking": False})
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == list(prompt.token_ids)
    assert ours.token_ids == choice["token_ids"] and ours.logprobs is not None
    theirs = [e["logprob"] for e in choice["logprobs"]["content"]]
    served_diff = float(np.max(np.abs(np.asarray(ours.logprobs) - theirs)))
    FIGURES[f"{FAMILY} max |logprob| token-in vs chat/completions (vLLM float32)"] = served_diff
    assert served_diff < 1e-5
    mine = await local_completion(server.model_dir, renderer, request, dtype="float32")
    assert mine.token_ids == ours.token_ids
    diff = max_logprob_diff(mine, ours)
    FIGURES[f"{FAMILY} max |logprob| local vs vLLM (both float32)"] = diff
    assert diff < 1e-5


async def test_a_short_rollout_run_against_vllm(server: Server, tmp_path: Path) -> None:
    """`short_rollout`'s checks, with the float32 pixels this server takes."""
    await short_rollout(server, tmp_path, "float32")
