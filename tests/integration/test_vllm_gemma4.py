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
import os
import shutil
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
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.store import RunReader, RunWriter
from rollwire.training import SampleBuilder

if not (VENV / "bin" / "python").exists() and not REQUIRED:
    pytest.skip("no vLLM venv", allow_module_level=True)

pytestmark = pytest.mark.vllm
PORT = int(os.environ.get("ROLLWIRE_VLLM_PORT_GEMMA4", "18471"))
FAMILY = "gemma4"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = tmp_path_factory.mktemp("gemma4") / "model"
    shutil.copytree(tiny(FAMILY), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    soft = json.loads((model_dir / "preprocessor_config.json").read_text())["max_soft_tokens"]
    # The tiny model carries the soft-token budget vLLM reads, equal to the processor's.
    assert config["vision_config"]["default_output_length"] == soft
    pid = start_server(model_dir, FAMILY, port=PORT, dtype="float32")
    srv = Server(FAMILY, model_dir, f"http://127.0.0.1:{PORT}", pid)
    yield srv
    stop_server(srv.pid)


CROP = {"type": "function", "function": {"name": "crop", "description": "Crop the image.", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}, "required": ["box"]}}}
CALL = {"role": "assistant", "content": "Zooming.", "tool_calls": [{"id": "c0", "type": "function", "function": {
    "name": "crop", "arguments": json.dumps({"box": [0, 0, 8, 8]})}}]}
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


def _render(client: httpx.Client, conv: list[dict[str, Any]], tools: Any, thinking: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": FAMILY, "messages": to_server(conv),
                            "chat_template_kwargs": {"enable_thinking": thinking}}
    if tools:
        body |= {"tools": tools, "tool_choice": "none"}  # no tool parser on this server
    r = client.post("/v1/chat/completions/render", json=body)
    assert r.status_code == 200, r.text[:300]
    return dict(r.json())


def test_rendered_ids_and_image_items_equal_the_servers(server: Server) -> None:
    renderers = {on: create_renderer(server.model_dir, enable_thinking=on) for on in (True, False)}
    matched = items = 0
    worst = 0.0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for conv, tools, thinking in CONVERSATIONS:
            answer = _render(client, conv, tools, thinking)
            renderer = renderers[thinking]
            ours = renderer.render(conv, tools=tools)
            assert ours.token_ids == answer["token_ids"]
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
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={
            "model": FAMILY, "messages": to_server(conv), "max_tokens": 8, "temperature": 0,
            "logprobs": True, "return_token_ids": True, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text[:300]
    choice = r.json()["choices"][0]
    assert r.json()["prompt_token_ids"] == prompt.token_ids
    assert ours.token_ids == choice["token_ids"] and ours.logprobs is not None
    served = float(np.max(np.abs(np.asarray(ours.logprobs) - [e["logprob"] for e in choice["logprobs"]["content"]])))
    FIGURES[f"{FAMILY} max |logprob| token-in vs chat/completions (vLLM float32)"] = served
    assert served < 1e-5
    local = LocalEngine(server.model_dir, feature_store=renderer.feature_store, dtype="float32")
    try:
        mine = (await local.generate(request)).completions[0]
    finally:
        await local.close()
    assert mine.token_ids == ours.token_ids and mine.logprobs is not None
    diff = float(np.max(np.abs(np.asarray(mine.logprobs) - np.asarray(ours.logprobs))))
    FIGURES[f"{FAMILY} max |logprob| local vs vLLM (both float32)"] = diff
    assert diff < 1e-5


async def test_a_short_rollout_run_against_vllm(server: Server, tmp_path: Path) -> None:
    """The rollout loop on the real server: multi-turn, each unique image's pixels sent once, the
    run directory read back into training samples."""
    renderer = create_renderer(server.model_dir)
    engine = VLLMEngine.for_renderer(server.url, renderer)
    config = RunConfig(env="shapes", n_prompts=2, group=2, concurrency=1, env_kwargs={"turns": 3},
                       rollout=RolloutConfig(max_turns=3, max_tokens=6))
    with RunWriter(tmp_path, renderer.feature_store) as writer:  # type: ignore[attr-defined]
        summary = await run_rollouts(config, renderer, engine, progress=False,
                                     on_result=lambda r: writer.write(r.trajectory, r.originals))
    await engine.close()
    assert summary.done == 4 and summary.failed == 0, summary.errors
    per_image = len(encode_image_kwargs(renderer.feature_store.get(  # type: ignore[attr-defined]
        next(iter(RunReader(tmp_path).rows()))["image_ids"][0]), renderer.feature_store, "float32"))
    assert summary.unique_images == 6 and summary.referenced_images == 4 * (1 + 2 + 3)
    assert summary.image_bytes_sent == summary.unique_images * per_image  # each picture once
    FIGURES[f"{FAMILY} rollout: image bytes sent / referenced"] = (
        f"{summary.image_bytes_sent} B for {summary.referenced_images} image occurrences "
        f"({summary.unique_images} unique), bridged {summary.bridge_successes}/{summary.bridge_attempts}")
    builder = SampleBuilder.for_renderer(renderer)
    for t in RunReader(tmp_path).trajectories():
        (sample,) = builder.build(t)
        assert sample.num_loss_tokens == sum(len(s.completion_ids) for s in t.steps)
