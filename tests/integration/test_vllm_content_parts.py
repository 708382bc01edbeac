"""Both wire modes against the real vLLM (CPU 0.32, tiny Qwen2-VL, one server for the module).

`content_parts` (a PNG per image, by uuid afterwards, expanded by the server and checked against
rollwire's render) must give exactly the token ids and logprobs of `features`, send each image's
bytes once, and recover from a cache the server lost (/pause + /resume clears it; dev mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FIGURES
from rollwire.engines import content_parts as cp
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.render import create_renderer

from .conftest import Server, img, port, served, text

pytestmark = pytest.mark.vllm
PORT = port("CONTENT_PARTS", 18437)
FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[Server]:
    with served(tiny(FAMILY), FAMILY, PORT) as srv:  # in dev mode: /pause and /resume are mounted
        yield srv


def clear_server_cache(url: str) -> None:
    for path in ("/pause", "/resume"):
        assert httpx.post(url + path, timeout=30).status_code == 200


async def rollout(server: Server, wire: str, sampling: SamplingParams, *, miss_at: int | None = None,
                  ) -> tuple[list[Any], VLLMEngine]:
    """Four turns, a new image each turn (one of them resized by the processor), bridged prompts."""
    renderer = create_renderer(server.model_dir)
    engine = VLLMEngine.for_renderer(server.url, renderer, wire=wire)
    sizes = [(56, 56), (100, 80), (84, 56), (56, 112)]
    prompt = renderer.render([{"role": "user", "content": [img(*sizes[0], 300), text("turn 0")]}])
    turns = []
    for t in range(len(sizes)):
        if t == miss_at:
            clear_server_cache(server.url)
        result = await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                                       sampling=sampling))
        turns.append((prompt.images, result))
        if t + 1 < len(sizes):
            new = [{"role": "user", "content": [img(*sizes[t + 1], 301 + t), text(f"turn {t + 1}")]}]
            bridged = renderer.bridge(prompt, result.completions[0].token_ids, new)
            assert bridged.tokens is not None
            prompt = bridged.tokens
    await engine.close()
    return turns, engine


@pytest.mark.parametrize("sampling", [SamplingParams(max_tokens=4, temperature=0.0),
                                      SamplingParams(max_tokens=4, temperature=1.0, seed=7)],
                         ids=["greedy", "seeded"])
async def test_content_parts_equals_features_and_sends_each_image_once(server: Server,
                                                                       sampling: SamplingParams) -> None:
    features, fe = await rollout(server, "features", sampling)
    parts, pe = await rollout(server, "content-parts", sampling)
    assert fe.wire == "features" and pe.wire == "content_parts"
    for (_, a), (_, b) in zip(features, parts, strict=True):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == b.completions[0].logprobs  # exactly: the same pixels went in
    store = create_renderer(server.model_dir).feature_store
    assert store is not None
    png = [len(cp.image_url(store.get_or_process(img(w, h, s)["image"]), store.config))
           for (w, h), s in zip([(56, 56), (100, 80), (84, 56), (56, 112)], [300, 301, 302, 303], strict=True)]
    # Each turn carries only its new image's bytes; the earlier ones go by uuid.
    assert [r.image_bytes_sent for _, r in parts] == png
    assert pe.stats.images_by_id == 0 + 1 + 2 + 3 and pe.stats.cache_misses == 0
    total_parts = sum(r.bytes_sent for _, r in parts)
    total_features = sum(r.bytes_sent for _, r in features)
    FIGURES[f"{FAMILY} 4-turn request bytes, content_parts vs features ({sampling.temperature})"] = (
        f"{total_parts} B vs {total_features} B (PNGs once: {sum(png)} B)")


async def test_a_lost_cache_is_recovered_by_resending(server: Server) -> None:
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    clean, _ = await rollout(server, "content-parts", greedy)
    missed, engine = await rollout(server, "content-parts", greedy, miss_at=2)
    assert engine.stats.cache_misses == 1 and missed[2][1].cache_misses == 1
    assert [r.completions[0].token_ids for _, r in missed] == [r.completions[0].token_ids for _, r in clean]
    assert missed[2][1].image_bytes_sent > clean[2][1].image_bytes_sent  # all three images went again


async def test_auto_picks_features_on_the_python_frontend(server: Server) -> None:
    renderer = create_renderer(server.model_dir)
    async with VLLMEngine.for_renderer(server.url, renderer, wire="auto") as engine:
        await engine.connect()
        assert engine.wire == "features" and engine.pixel_format == "uint8"
