"""Qwen3-VL against the real vLLM server: token-in/token-out only.

The tiny Qwen3-VL directory ships no chat template (none is available offline), so the server
cannot render a conversation: there is no render parity and no pixel-format probe. The client is
given the format explicitly and verifies what it can; completions must equal the local engine's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_vllm import REQUIRED, VENV, start_server, stop_server

from conftest import FIGURES, make_image
from rollwire.engines.local import LocalEngine
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.errors import PixelFormatError
from rollwire.render import create_renderer

if not (VENV / "bin" / "python").exists() and not REQUIRED:
    pytest.skip("no vLLM venv", allow_module_level=True)

pytestmark = pytest.mark.vllm
PORT = int(os.environ.get("ROLLWIRE_VLLM_PORT_QWEN3_VL", "18432"))


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[tuple[str, Path]]:
    model_dir = tiny("qwen3_vl")
    pid = start_server(model_dir, "qwen3_vl", port=PORT)
    yield f"http://127.0.0.1:{PORT}", model_dir
    stop_server(pid)


async def test_qwen3_vl_completions_equal_the_local_engine(server: tuple[str, Path]) -> None:
    url, model_dir = server
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
    local = LocalEngine(model_dir, feature_store=renderer.feature_store)
    try:
        ours = (await local.generate(request)).completions[0]
    finally:
        await local.close()
    assert theirs.token_ids == ours.token_ids and theirs.logprobs is not None and ours.logprobs is not None
    diff = float(np.max(np.abs(np.asarray(theirs.logprobs) - np.asarray(ours.logprobs))))
    FIGURES["qwen3_vl max |logprob| local vs vLLM"] = diff
    assert diff < 1e-3
