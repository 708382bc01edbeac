"""Against the real vLLM server (CPU build 0.32, tiny random-weight models, loopback).

Runs when the vLLM venv exists (scripts/setup_vllm.sh); CI sets ROLLWIRE_REQUIRE_VLLM=1 so a
missing venv fails instead of skipping. One server per family per test session (~1 min start).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIGURES
from rollwire.bench.images import encoded, photo
from rollwire.bench.vllm_server import start_server, stop_server
from rollwire.engines import content_parts as cp
from rollwire.engines.local import LocalEngine
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import encode_image_kwargs, features_payload, generate_body
from rollwire.errors import PixelFormatError, PlaceholderError
from rollwire.render import ImageRef, create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.store import RunReader, RunWriter
from rollwire.training import SampleBuilder

from .conftest import Server, img, text, to_server

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm
PORT = int(os.environ.get("ROLLWIRE_VLLM_PORT", "18431"))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def server(request: pytest.FixtureRequest, tiny: Callable[[str], Path]) -> Iterator[Server]:
    family = request.param
    model_dir = tiny(family)
    pid = start_server(model_dir, family, PORT)
    srv = Server(family, model_dir, f"http://127.0.0.1:{PORT}", pid)
    yield srv
    stop_server(srv.pid)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CALL = 'Zoom.\n<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 8, 8]}}\n</tool_call>'
# Sizes that need no resize (multiples of 28 within min/max pixels), so PIL and the server's
# torchvision resizing cannot differ.
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": [img(56, 56, 1), text("What is this?")]}],
    [{"role": "user", "content": [text("Two: "), img(56, 56, 2), img(84, 56, 3), text("compare")]}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": [img(112, 84, 4), text("?")]}],
    [{"role": "user", "content": [img(56, 56, 5), text("a")]}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": [img(56, 112, 6), text("c")]}],
    [{"role": "user", "content": [img(56, 56, 7), text("crop it")]}, {"role": "assistant", "content": CALL},
     {"role": "tool", "content": [text("cropped:"), img(28, 28, 8)]}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": CALL}, {"role": "tool", "content": "done"}],
    [{"role": "user", "content": [img(140, 56, 9)]}],
    [{"role": "user", "content": [img(56, 56, 10), text("x")]}, {"role": "assistant", "content": "y"},
     {"role": "user", "content": [img(56, 56, 10), text("same picture?")]}],
    [{"role": "user", "content": [text("\n\nspaces  and\ttabs 🙂 "), img(84, 84, 11)]}],
    [{"role": "user", "content": [img(56, 56, 12), img(56, 56, 13), img(56, 56, 14), text("three")]}],
]


def test_rendered_ids_equal_the_servers_render(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    matched = 0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for conv in CONVERSATIONS:
            r = client.post("/v1/chat/completions/render", json={"model": server.family, "messages": to_server(conv)})
            assert r.status_code == 200, r.text[:300]
            ours = renderer.render(conv)
            assert list(ours.token_ids) == r.json()["token_ids"]
            placeholders = r.json()["features"]["mm_placeholders"]["image"] if ours.images else []
            assert [(p["offset"], p["length"]) for p in placeholders] == [(i.offset, i.length) for i in ours.images]
            matched += 1
    FIGURES[f"{server.family} render parity conversations"] = matched
    assert matched >= 10


async def test_greedy_completion_equals_chat_completions_and_local_engine(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    conv = CONVERSATIONS[4]
    prompt = renderer.render(conv)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images, sampling=sampling)
    async with VLLMEngine.for_renderer(server.url, renderer, banned_token_ids=()) as engine:
        ours = (await engine.generate(request)).completions[0]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={
            "model": server.family, "messages": to_server(conv), "max_tokens": 8, "temperature": 0,
            "logprobs": True, "return_token_ids": True})
    assert r.status_code == 200, r.text[:300]
    choice = r.json()["choices"][0]
    assert r.json()["prompt_token_ids"] == list(prompt.token_ids)
    assert ours.token_ids == choice["token_ids"]
    theirs = [e["logprob"] for e in choice["logprobs"]["content"]]
    assert ours.logprobs is not None
    np.testing.assert_allclose(ours.logprobs, theirs, atol=1e-6)
    local = LocalEngine(server.model_dir, feature_store=renderer.feature_store)  # type: ignore[attr-defined]
    try:
        mine = (await local.generate(request)).completions[0]
    finally:
        await local.close()
    assert mine.token_ids == ours.token_ids
    assert mine.logprobs is not None
    diff = float(np.max(np.abs(np.asarray(mine.logprobs) - np.asarray(ours.logprobs))))
    FIGURES[f"{server.family} max |logprob| local vs vLLM"] = diff
    assert diff < 1e-3


def raw_generate(url: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as client:
        return client.post("/inference/v1/generate", content=body, headers={"content-type": "application/json"})


async def test_wrong_pixels_and_placeholders_are_caught_before_the_server_accepts_them(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    store = renderer.feature_store  # type: ignore[attr-defined]
    prompt = renderer.render(CONVERSATIONS[1])
    sampling = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True)
    good = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images, sampling=sampling)
    ref = prompt.images[0]
    short = GenerateRequest(prompt_token_ids=prompt.token_ids, sampling=sampling,
                            images=(ImageRef(ref.id, ref.offset, ref.length - 1, ref.grid_thw),))

    def body(req: GenerateRequest, fmt: str, tag: str) -> bytes:
        features, _ = features_payload(req.images, store, pixel_format=fmt)  # type: ignore[arg-type]
        # Fresh hashes: other pixels, or another placeholder length, under a hash the server holds
        # is an error of its own (a too-short one even kills vLLM 0.32's engine core).
        features["mm_hashes"]["image"] = [f"{h}-{tag}" for h in features["mm_hashes"]["image"]]
        return generate_body(req, model=server.family, features=features)

    baseline = raw_generate(server.url, body(good, "uint8", "baseline"))
    as_float = raw_generate(server.url, body(good, "float32", "float"))
    shortened = raw_generate(server.url, body(short, "uint8", "short"))
    # The server takes all three with HTTP 200; the last two silently change the model's input.
    assert baseline.status_code == as_float.status_code == shortened.status_code == 200
    lp = [[e["logprob"] for e in r.json()["choices"][0]["logprobs"]["content"]]
          for r in (baseline, as_float, shortened)]
    assert lp[0] != lp[1] and lp[0] != lp[2]
    FIGURES[f"{server.family} server answered 200 to float pixels / short placeholder"] = True

    async with VLLMEngine.for_renderer(server.url, renderer, pixel_format="float32") as engine:
        with pytest.raises(PixelFormatError):
            await engine.generate(good)
        assert engine.stats.bytes_sent == 0
    async with VLLMEngine.for_renderer(server.url, renderer) as engine:
        with pytest.raises(PlaceholderError):
            await engine.generate(short)
        assert engine.stats.bytes_sent == 0
        assert engine.pixel_format == "uint8"
        out = await engine.generate(good)
    assert out.completions[0].logprobs == pytest.approx(lp[0], abs=1e-6)


async def test_multi_turn_sends_each_image_once_and_survives_a_restart(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    turns = 4
    figures = {}
    for by_id in (False, True):
        engine = VLLMEngine.for_renderer(server.url, renderer, images_by_id=by_id)
        messages: list[dict[str, Any]] = [{"role": "user", "content": [img(56, 56, 100), text("turn 0")]}]
        prompt = renderer.render(messages)
        per_turn = []
        for t in range(turns):
            if by_id and t == 2:  # the server restarts between turns and loses its image cache
                stop_server(server.pid)
                server.pid = start_server(server.model_dir, server.family, PORT)
            result = await engine.generate(GenerateRequest(
                prompt_token_ids=prompt.token_ids, images=prompt.images,
                sampling=SamplingParams(max_tokens=3, temperature=0.0)))
            per_turn.append(result.image_bytes_sent)
            new = [{"role": "user", "content": [img(56, 56, 101 + t), text(f"turn {t + 1}")]}]
            bridged = renderer.bridge(prompt, result.completions[0].token_ids, new)
            assert bridged.tokens is not None
            prompt = bridged.tokens
        figures[by_id] = (per_turn, engine.stats)
        await engine.close()
    full, ids = figures[False][0], figures[True][0]
    one_image = full[0]
    assert full == [one_image * (t + 1) for t in range(turns)]  # every image every turn
    assert ids[0] == ids[1] == one_image  # then only the new image...
    # ...until the restart: seen as a refused connection (a new epoch: all three at once) or, when the
    # restart fell between two requests, as a 500 on the id-only request (then all three again).
    stats = figures[True][1]
    assert ids[2] == one_image * (3 + stats.cache_misses) and stats.cache_misses <= 1
    assert ids[3] == one_image and stats.requests == turns
    FIGURES[f"{server.family} image bytes per turn, full"] = full
    FIGURES[f"{server.family} image bytes per turn, id-only"] = ids


def jpeg_url(w: int, h: int, seed: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encoded(photo(w, h, seed=seed), "JPEG")).decode()


async def test_a_jpeg_conversation_in_content_parts_mode_equals_features_mode_and_sends_the_jpegs_once(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    # 112x112 needs no resize: vLLM 0.32 decodes it to rollwire's pixels, so the JPEG goes as it is.
    # 100x80 is resized, and vLLM's default (torchvision) processor resizes to other pixels: the PNG.
    same, resized, later = jpeg_url(112, 112, 400), jpeg_url(100, 80, 401), jpeg_url(112, 112, 402)
    turns = [[same, resized], [later]]
    out: dict[str, Any] = {}
    for wire in ("content-parts", "features"):  # content_parts first: the server processes the JPEGs itself
        renderer = create_renderer(server.model_dir)
        engine = VLLMEngine.for_renderer(server.url, renderer, wire=wire)
        prompt, results = renderer.render([{"role": "user", "content": [
            *({"type": "image", "image": u} for u in turns[0]), text("two")]}]), []
        with caplog.at_level(logging.WARNING, logger="rollwire.engines"):
            for t in range(len(turns)):
                results.append(await engine.generate(GenerateRequest(
                    prompt_token_ids=prompt.token_ids, images=prompt.images,
                    sampling=SamplingParams(max_tokens=4, temperature=0.0, logprobs=1))))
                if t + 1 < len(turns):
                    new = [{"role": "user", "content": [*({"type": "image", "image": u} for u in turns[t + 1]),
                                                        text("again")]}]
                    bridged = renderer.bridge(prompt, results[-1].completions[0].token_ids, new)
                    assert bridged.tokens is not None
                    prompt = bridged.tokens
        await engine.close()
        out[wire] = ([(r.completions[0].token_ids, r.completions[0].logprobs) for r in results],
                     [r.image_bytes_sent for r in results], engine, renderer)
    assert out["content-parts"][0] == out["features"][0]  # token ids and logprobs identical
    _, sent, engine, renderer = out["content-parts"]
    assert engine.originals.verdicts() == {"JPEG": True, "JPEG resized": False}
    store = renderer.feature_store
    png = len(cp.image_url(store.get_or_process(resized), store.config))
    assert sent == [len(same) + png, len(later)]  # the JPEGs themselves, once; the resized one as its PNG
    warned = [r.getMessage() for r in caplog.records if "resizes differently" in r.getMessage()]
    assert len(warned) == 1 and '"use_fast": false' in warned[0]
    FIGURES[f"{server.family} content_parts image bytes per turn (JPEG, PNG fallback)"] = sent


async def test_concurrent_requests_sharing_a_new_image_send_its_pixels_once(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    prompt = renderer.render([{"role": "user", "content": [img(56, 56, 300), text("what is this?")]}])
    request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                              sampling=SamplingParams(max_tokens=4, temperature=0.0))
    async with VLLMEngine.for_renderer(server.url, renderer) as engine:
        results = await asyncio.gather(*(engine.generate(request) for _ in range(8)))
    async with VLLMEngine.for_renderer(server.url, renderer, images_by_id=False) as full:
        expected = await full.generate(request)  # the same prompt, with its pixels
    assert engine.stats.images_sent == 1 and engine.stats.images_by_id == 7 and engine.stats.cache_misses == 0
    assert sum(r.image_bytes_sent for r in results) == expected.image_bytes_sent > 0
    assert all(r.completions[0].token_ids == expected.completions[0].token_ids for r in results)
    FIGURES[f"{server.family} 8 concurrent requests, one new image: image bytes / one copy"] = (
        sum(r.image_bytes_sent for r in results) / expected.image_bytes_sent)


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
    FIGURES[f"{server.family} rollout: image bytes sent / referenced"] = (
        f"{summary.image_bytes_sent} B for {summary.referenced_images} image occurrences "
        f"({summary.unique_images} unique)")
    reader = RunReader(tmp_path)
    builder = SampleBuilder.for_renderer(renderer)
    for t in reader.trajectories():
        (sample,) = builder.build(t)
        assert sample.num_loss_tokens == sum(len(s.completion_ids) for s in t.steps)


async def test_a_weight_update_mid_run_through_a_pool_against_vllm(server: Server) -> None:
    """A pool (one replica: X-Session-ID on every request) under a PausableEngine: a pause (wait),
    /update_weight_version and /resume in the middle of a run; every step carries the version vLLM
    reports in weight_versions, no rollout fails, and images go again after the pause (vLLM wiped
    its multimodal cache)."""
    import asyncio

    from rollwire.engines.pool import EnginePool
    from rollwire.engines.weights import PausableEngine

    renderer = create_renderer(server.model_dir)
    pool = EnginePool.for_renderer([server.url], renderer)
    engine = PausableEngine(pool, version=3)
    config = RunConfig(env="shapes", n_prompts=2, group=2, concurrency=1, env_kwargs={"turns": 3},
                       rollout=RolloutConfig(max_turns=3, max_tokens=4))
    results: list[Any] = []

    async def update_mid_run() -> None:
        while pool.engines[0].stats.requests < 4:
            await asyncio.sleep(0.02)
        await engine.update_weights(4)

    async with engine:
        updater = asyncio.create_task(update_mid_run())
        summary = await run_rollouts(config, renderer, engine, on_result=results.append, progress=False)
        await updater
        sent = pool.engines[0].stats.images_sent
    assert summary.done == 4 and summary.failed == 0, summary.errors
    versions = [[s.policy_version for s in r.trajectory.steps] for r in results]
    assert {v for vs in versions for v in vs} == {3, 4} and all(vs == sorted(vs) for vs in versions)
    # One at a time, each unique image would go once; the pause wiped vLLM's cache, so some went again.
    assert sent > summary.unique_images == 6
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/weight_info")).json() == {"weight_version": "4"}
        assert (await http.get("/is_paused")).json() == {"is_paused": False}
    FIGURES[f"{server.family} weight update mid-run: step versions"] = str(versions)


def test_the_openai_front_over_vllm_samples_what_the_engine_samples(server: Server, tmp_path: Path) -> None:
    """A chat.completions call through `rollwire serve --upstream` gives the completion ids a direct
    `VLLMEngine.generate` gives for the same prompt and seed (and the front's prompt is rollwire's render)."""
    import asyncio

    import openai

    from rollwire.front import FrontServer

    messages = [{"role": "user", "content": [img(56, 56, 21), text("What is this?")]}]
    with FrontServer(server.model_dir, upstream=server.url, run_dir=tmp_path, port=0) as front:
        api = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
        answer = api.chat.completions.create(model=front.served_model_name, messages=to_server(messages),  # type: ignore[arg-type]
                                             max_tokens=12, temperature=1.0, seed=1234, logprobs=True)
    renderer = create_renderer(server.model_dir)
    rendered = renderer.render(messages)
    assert answer.model_extra is not None and answer.model_extra["prompt_token_ids"] == list(rendered.token_ids)

    async def direct() -> list[int]:
        async with VLLMEngine.for_renderer(server.url, renderer) as engine:
            result = await engine.generate(GenerateRequest(
                prompt_token_ids=rendered.token_ids, images=rendered.images,
                sampling=SamplingParams(max_tokens=12, temperature=1.0, seed=1234)))
        return result.completions[0].token_ids

    ids = answer.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert ids == asyncio.run(direct())
    assert [c.token for c in answer.choices[0].logprobs.content] == [renderer.decode([t]) for t in ids]  # type: ignore[union-attr]
    (trajectory,) = RunReader(tmp_path).trajectories()
    assert list(trajectory.steps[0].completion_ids) == ids


def test_the_docs_pages_run_against_vllm(server: Server, tmp_path: Path, cache_dir: Path) -> None:
    """docs/run-against-vllm.md as written, against this server: the write-an-environment page's
    environment from the CLI (`--server`), and the Python block in both wire modes."""
    if server.family != "qwen2_vl":
        pytest.skip("the pages are run once, on the qwen2_vl server")
    from test_doc_run_against_vllm import run_page

    namespace = run_page(server.url, server.model_dir, tmp_path, cache_dir)
    assert namespace["features"] == namespace["content_parts"] and len(namespace["features"]) >= 1
