"""The real-vLLM tier's shared harness: the venv gate, a server per module, the conversation helpers.

Every test here runs only when the vLLM venv exists ($ROLLWIRE_VLLM_VENV, scripts/setup_vllm.sh):
without it, it skips; with ROLLWIRE_REQUIRE_VLLM=1 (CI sets it) it fails instead. A module starts
its server with `served(...)` in a module-scoped fixture (~1 min, ~5 GB), on a port of its own.

This directory is a package so that this conftest is `integration.conftest`: tests/conftest.py
keeps the module name `conftest` that the other tests import from.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIGURES, make_image
from rollwire.bench.vllm_server import start_server, stop_server
from rollwire.engines.local import LocalEngine
from rollwire.engines.types import Completion, GenerateRequest
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import encode_image_kwargs
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, RunSummary, run_rollouts
from rollwire.store import RunReader, RunWriter
from rollwire.training import SampleBuilder

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ROLLWIRE_VLLM_VENV", Path.home() / ".cache" / "rollwire" / "vllm-venv"))
REQUIRED = os.environ.get("ROLLWIRE_REQUIRE_VLLM") == "1"


@pytest.fixture(scope="session", autouse=True)
def vllm_venv() -> Path:
    """The vLLM venv; every test of the tier skips without it, or fails under ROLLWIRE_REQUIRE_VLLM=1."""
    if not (VENV / "bin" / "python").exists():
        if REQUIRED:
            pytest.fail(f"ROLLWIRE_REQUIRE_VLLM=1 but there is no vLLM venv at {VENV} (run scripts/setup_vllm.sh)")
        pytest.skip(f"no vLLM venv at {VENV} (run scripts/setup_vllm.sh)")
    return VENV


def port(name: str, default: int) -> int:
    """A module's server port: $ROLLWIRE_VLLM_PORT_<NAME>, else `default` (modules' servers never share one)."""
    return int(os.environ.get(f"ROLLWIRE_VLLM_PORT_{name}", str(default)))


@dataclass
class Server:
    family: str
    model_dir: Path
    url: str
    pid: int


@contextmanager
def served(model_dir: Path, family: str, port: int, **options: str) -> Iterator[Server]:
    """A vLLM server on `port` for the block (options: `dtype`, `extra_args`), stopped after it."""
    server = Server(family, model_dir, f"http://127.0.0.1:{port}", start_server(model_dir, family, port, **options))
    try:
        yield server
    finally:
        stop_server(server.pid)  # the pid a test that restarted the server left


# --- conversations ----------------------------------------------------------------------------


def img(w: int, h: int, seed: int) -> dict[str, Any]:
    return {"type": "image", "image": make_image(w, h, "RGB", seed)}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_server(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation with images as data URLs (what an OpenAI client sends)."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            parts = [{"type": "image_url", "image_url": {"url": data_url(p["image"])}} if p["type"] == "image" else p
                     for p in m["content"]]
            m = {**m, "content": parts}
        out.append(m)
    return out


# A tool and a structured call to it, for the families whose templates take `tool_calls`.
CROP = {"type": "function", "function": {"name": "crop", "description": "Crop the image.", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}, "required": ["box"]}}}
CALL = {"role": "assistant", "content": "Zooming.", "tool_calls": [{"id": "c0", "type": "function", "function": {
    "name": "crop", "arguments": json.dumps({"box": [0, 0, 8, 8]})}}]}


# --- what the server answers ------------------------------------------------------------------


def server_render(client: httpx.Client, family: str, conv: list[dict[str, Any]], tools: Any,
                  thinking: bool) -> dict[str, Any]:
    """The server's own `/v1/chat/completions/render` of `conv` (token ids, placeholders, image items)."""
    body: dict[str, Any] = {"model": family, "messages": to_server(conv),
                            "chat_template_kwargs": {"enable_thinking": thinking}}
    if tools:
        body |= {"tools": tools, "tool_choice": "none"}  # no tool parser on this server
    r = client.post("/v1/chat/completions/render", json=body)
    assert r.status_code == 200, r.text[:300]
    return dict(r.json())


def server_chat(server: Server, conv: list[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy `/v1/chat/completions` of `conv` with logprobs and token ids: the answer's JSON."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={
            "model": server.family, "messages": to_server(conv), "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text[:300]
    return dict(r.json())


async def local_completion(model_dir: Path, renderer: Any, request: GenerateRequest, **options: Any) -> Completion:
    """The in-process engine's first completion of `request` (sharing the renderer's feature store)."""
    local = LocalEngine(model_dir, feature_store=renderer.feature_store, **options)
    try:
        return (await local.generate(request)).completions[0]
    finally:
        await local.close()


def max_logprob_diff(a: Completion, b: Completion) -> float:
    assert a.logprobs is not None and b.logprobs is not None
    return float(np.max(np.abs(np.asarray(a.logprobs) - np.asarray(b.logprobs))))


async def short_rollout(server: Server, run_dir: Path, pixel_format: str) -> RunSummary:
    """The rollout loop on the real server (shapes, 2 prompts x 2, 3 turns): every rollout done, each
    unique image's pixels sent once, the run directory read back into training samples."""
    renderer = create_renderer(server.model_dir)
    store: Any = renderer.feature_store
    engine = VLLMEngine.for_renderer(server.url, renderer)
    config = RunConfig(env="shapes", n_prompts=2, group=2, concurrency=1, env_kwargs={"turns": 3},
                       rollout=RolloutConfig(max_turns=3, max_tokens=6))
    with RunWriter(run_dir, store) as writer:
        summary = await run_rollouts(config, renderer, engine, progress=False,
                                     on_result=lambda r: writer.write(r.trajectory, r.originals))
    await engine.close()
    assert summary.done == 4 and summary.failed == 0, summary.errors
    first = next(iter(RunReader(run_dir).rows()))["image_ids"][0]
    per_image = len(encode_image_kwargs(store.get(first), store, pixel_format))  # type: ignore[arg-type]
    assert summary.unique_images == 6 and summary.referenced_images == 4 * (1 + 2 + 3)
    assert summary.image_bytes_sent == summary.unique_images * per_image  # each picture once
    FIGURES[f"{server.family} rollout: image bytes sent / referenced"] = (
        f"{summary.image_bytes_sent} B for {summary.referenced_images} image occurrences "
        f"({summary.unique_images} unique), bridged {summary.bridge_successes}/{summary.bridge_attempts}")
    builder = SampleBuilder.for_renderer(renderer)
    for t in RunReader(run_dir).trajectories():
        (sample,) = builder.build(t)
        assert sample.num_loss_tokens == sum(len(s.completion_ids) for s in t.steps)
    return summary
