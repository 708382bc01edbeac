"""Qwen3.5 against the real vLLM server (CPU build 0.32): render parity, the pixel format probe,
token-in/token-out against the local engine, and a short multi-turn rollout.

vLLM 0.32's CPU Gated-DeltaNet kernels run in bfloat16 only (`--dtype float32` passes /health,
then the first request kills the engine core: "CPU GDN attention requires BF16."), so this server
and the local engine it is compared with both run in bfloat16. Prefix caching is off: with it, a
hybrid model's prefill is split at cache-block boundaries, and a seeded request whose prefill is
split kills the CPU engine core ("CPU Generator does not use offset").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import FIGURES
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
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
PORT = port("QWEN3_5", 18433)
FAMILY = "qwen3_5"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[Server]:
    with served(tiny(FAMILY), FAMILY, PORT, dtype="bfloat16", extra_args="--no-enable-prefix-caching") as srv:
        yield srv


# Sizes that need no resize (multiples of 32, at least min_pixels), so PIL and the server's
# torchvision resizing cannot differ. (messages, tools, enable_thinking)
CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = [
    ([{"role": "user", "content": "Hello"}], None, True),
    ([{"role": "user", "content": [img(64, 64, 1), text("What is this?")]}], None, True),
    ([{"role": "user", "content": [text("Two: "), img(64, 64, 2), img(96, 64, 3), text("compare")]}], None, True),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": [img(128, 96, 4), text("?")]}],
     None, True),
    ([{"role": "user", "content": [img(64, 64, 5), text("a")]}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": [img(64, 128, 6), text("c")]}], None, True),
    ([{"role": "user", "content": [img(64, 64, 7), text("crop it")]}, CALL,
      {"role": "tool", "tool_call_id": "c0", "content": [text("cropped:"), img(64, 64, 8)]}], [CROP], True),
    ([{"role": "user", "content": [img(64, 64, 9), text("x")]}, {"role": "assistant", "content": "y"},
      {"role": "user", "content": [img(64, 64, 9), text("same picture?")]}], None, False),
    ([{"role": "user", "content": [img(64, 64, 10), img(64, 64, 11), img(64, 64, 12), text("three")]}], None, False),
]


def test_rendered_ids_equal_the_servers_render(server: Server) -> None:
    renderers = {on: create_renderer(server.model_dir, enable_thinking=on) for on in (True, False)}
    matched = 0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for conv, tools, thinking in CONVERSATIONS:
            answer = server_render(client, FAMILY, conv, tools, thinking)
            ours = renderers[thinking].render(conv, tools=tools)
            assert list(ours.token_ids) == answer["token_ids"]
            placeholders = answer["features"]["mm_placeholders"]["image"] if ours.images else []
            assert [(p["offset"], p["length"]) for p in placeholders] == [(i.offset, i.length) for i in ours.images]
            matched += 1
    FIGURES[f"{FAMILY} render parity conversations"] = matched
    assert matched == len(CONVERSATIONS)


async def test_greedy_completion_equals_chat_completions_and_local_engine(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    conv = CONVERSATIONS[4][0]
    prompt = renderer.render(conv)
    request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                              sampling=SamplingParams(max_tokens=8, temperature=0.0))
    async with VLLMEngine.for_renderer(server.url, renderer) as engine:
        ours = (await engine.generate(request)).completions[0]
        assert engine.pixel_format == "uint8"  # detected by the render probe, not given
    answer = server_chat(server, conv, 8)
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == list(prompt.token_ids)
    assert ours.token_ids == choice["token_ids"] and ours.logprobs is not None
    np.testing.assert_allclose(ours.logprobs, [e["logprob"] for e in choice["logprobs"]["content"]], atol=1e-6)
    mine = await local_completion(server.model_dir, renderer, request, dtype="bfloat16")
    assert mine.token_ids == ours.token_ids
    diff = max_logprob_diff(mine, ours)
    FIGURES[f"{FAMILY} max |logprob| local vs vLLM (both bfloat16)"] = diff
    assert diff < 1e-5


async def test_a_short_rollout_run_against_vllm(server: Server, tmp_path: Path) -> None:
    """`short_rollout`'s checks, every turn bridged."""
    summary = await short_rollout(server, tmp_path, "uint8")
    assert summary.bridge_attempts == summary.bridge_successes == 8
