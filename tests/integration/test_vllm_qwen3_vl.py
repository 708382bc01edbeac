"""Qwen3-VL against the real vLLM server: token-in/token-out only.

The tiny Qwen3-VL directory ships no chat template (none is available offline), so the server
cannot render a conversation: there is no render parity and no pixel-format probe. The client is
given the format explicitly and verifies what it can; completions must equal the local engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FIGURES, make_image
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.errors import PixelFormatError
from rollwire.render import create_renderer

from .conftest import Server, local_completion, max_logprob_diff, port, served

pytestmark = pytest.mark.vllm
PORT = port("QWEN3_VL", 18432)


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[Server]:
    with served(tiny("qwen3_vl"), "qwen3_vl", PORT) as srv:
        yield srv


async def test_qwen3_vl_completions_equal_the_local_engine(server: Server) -> None:
    url, model_dir = server.url, server.model_dir
    renderer = create_renderer(model_dir)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image", "image": make_image(64, 64, seed=1)},
                                     {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": [{"type": "image", "image": make_image(96, 64, seed=2)},
                                     {"type": "text", "text": "more"}]}]
    prompt = renderer.render(messages)
    request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                              sampling=SamplingParams(max_tokens=6, temperature=0.0))
    async with VLLMEngine.for_renderer(url, renderer, banned_token_ids=()) as auto:
        with pytest.raises(PixelFormatError):  # the server cannot render: detection must not guess
            await auto.generate(request)
    async with VLLMEngine.for_renderer(url, renderer, banned_token_ids=(), pixel_format="uint8") as engine:
        theirs = (await engine.generate(request)).completions[0]
    ours = await local_completion(model_dir, renderer, request)
    assert theirs.token_ids == ours.token_ids
    diff = max_logprob_diff(theirs, ours)
    FIGURES["qwen3_vl max |logprob| local vs vLLM"] = diff
    assert diff < 1e-3
