"""Qwen3.5 against the real vLLM server (CPU build 0.32): render parity, the pixel format probe,
token-in/token-out against the local engine, and a short multi-turn rollout.

vLLM 0.32's CPU Gated-DeltaNet kernels run in bfloat16 only (`--dtype float32` passes /health,
then the first request kills the engine core: "CPU GDN attention requires BF16."), so this server
and the local engine it is compared with both run in bfloat16. Prefix caching is off: with it, a
hybrid model's prefill is split at cache-block boundaries, and a seeded request whose prefill is
split kills the CPU engine core ("CPU Generator does not use offset").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_vllm import REQUIRED, VENV, Server, img, start_server, stop_server, text, to_server

from conftest import FIGURES
from rollwire.engines.local import LocalEngine
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import encode_image_kwargs
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.store import RunReader, RunWriter
from rollwire.training import SampleBuilder

if not (VENV / "bin" / "python").exists() and not REQUIRED:
    pytest.skip("no vLLM venv", allow_module_level=True)

pytestmark = pytest.mark.vllm
PORT = int(os.environ.get("ROLLWIRE_VLLM_PORT_QWEN3_5", "18433"))
FAMILY = "qwen3_5"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[Server]:
    model_dir = tiny(FAMILY)
    pid = start_server(model_dir, FAMILY, port=PORT, dtype="bfloat16",
                       extra_args="--no-enable-prefix-caching")
    srv = Server(FAMILY, model_dir, f"http://127.0.0.1:{PORT}", pid)
    yield srv
    stop_server(srv.pid)


CROP = {"type": "function", "function": {"name": "crop", "description": "Crop the image.", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}, "required": ["box"]}}}
CALL = {"role": "assistant", "content": "Zooming.", "tool_calls": [{"id": "c0", "type": "function", "function": {
    "name": "crop", "arguments": json.dumps({"box": [0, 0, 8, 8]})}}]}
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
            body: dict[str, Any] = {"model": FAMILY, "messages": to_server(conv),
                                    "chat_template_kwargs": {"enable_thinking": thinking}}
            if tools:
                body |= {"tools": tools, "tool_choice": "none"}  # no tool parser on this server
            r = client.post("/v1/chat/completions/render", json=body)
            assert r.status_code == 200, r.text[:300]
            ours = renderers[thinking].render(conv, tools=tools)
            assert ours.token_ids == r.json()["token_ids"]
            placeholders = r.json()["features"]["mm_placeholders"]["image"] if ours.images else []
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
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={
            "model": FAMILY, "messages": to_server(conv), "max_tokens": 8, "temperature": 0,
            "logprobs": True, "return_token_ids": True})
    assert r.status_code == 200, r.text[:300]
    choice = r.json()["choices"][0]
    assert r.json()["prompt_token_ids"] == prompt.token_ids
    assert ours.token_ids == choice["token_ids"] and ours.logprobs is not None
    np.testing.assert_allclose(ours.logprobs, [e["logprob"] for e in choice["logprobs"]["content"]], atol=1e-6)
    local = LocalEngine(server.model_dir, feature_store=renderer.feature_store, dtype="bfloat16")
    try:
        mine = (await local.generate(request)).completions[0]
    finally:
        await local.close()
    assert mine.token_ids == ours.token_ids and mine.logprobs is not None
    diff = float(np.max(np.abs(np.asarray(mine.logprobs) - np.asarray(ours.logprobs))))
    FIGURES[f"{FAMILY} max |logprob| local vs vLLM (both bfloat16)"] = diff
    assert diff < 1e-5


async def test_a_short_rollout_run_against_vllm(server: Server, tmp_path: Path) -> None:
    """The rollout loop on the real server: bridged turns, each unique image's pixels sent once,
    the run directory read back into training samples."""
    renderer = create_renderer(server.model_dir)
    engine = VLLMEngine.for_renderer(server.url, renderer)
    config = RunConfig(env="shapes", n_prompts=2, group=2, concurrency=1, env_kwargs={"turns": 3},
                       rollout=RolloutConfig(max_turns=3, max_tokens=6))
    with RunWriter(tmp_path, renderer.feature_store) as writer:  # type: ignore[attr-defined]
        summary = await run_rollouts(config, renderer, engine, progress=False,
                                     on_result=lambda r: writer.write(r.trajectory, r.originals))
    await engine.close()
    assert summary.done == 4 and summary.failed == 0, summary.errors
    assert summary.bridge_attempts == summary.bridge_successes == 8
    per_image = len(encode_image_kwargs(renderer.feature_store.get(  # type: ignore[attr-defined]
        next(iter(RunReader(tmp_path).rows()))["image_ids"][0]), renderer.feature_store, "uint8"))
    assert summary.unique_images == 6 and summary.referenced_images == 4 * (1 + 2 + 3)
    assert summary.image_bytes_sent == summary.unique_images * per_image  # each picture once
    FIGURES[f"{FAMILY} rollout: image bytes sent / referenced"] = (
        f"{summary.image_bytes_sent} B for {summary.referenced_images} image occurrences "
        f"({summary.unique_images} unique)")
    builder = SampleBuilder.for_renderer(renderer)
    for t in RunReader(tmp_path).trajectories():
        (sample,) = builder.build(t)
        assert sample.num_loss_tokens == sum(len(s.completion_ids) for s in t.steps)
