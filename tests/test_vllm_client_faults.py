"""The vLLM client against `rollwire serve` with injected faults: retries, drops, cache misses,
deadlines and cancellation (the real vLLM is in tests/integration; this server injects faults)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image
from rollwire.engines.server import EngineServer, Faults
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import RetryPolicy, VLLMEngine
from rollwire.errors import EngineTimeoutError, InvalidRequestError, ServerError
from rollwire.render import create_renderer

FAST = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05)


@pytest.fixture(scope="module")
def served(tiny: Callable[[str], Path]) -> Iterator[tuple[EngineServer, Any]]:
    model_dir = tiny("qwen2_vl")
    faults = Faults()
    with EngineServer(model_dir, served_model_name="tiny", faults=faults) as server:
        yield server, create_renderer(model_dir)


@pytest.fixture(autouse=True)
def reset(served: tuple[EngineServer, Any]) -> Iterator[None]:
    yield
    f = served[0].faults  # type: ignore[attr-defined]
    f.delay_s, f.fail_next, f.drop_next, f.status = 0.0, 0, 0, 503


def request(renderer: Any, seed: int, n_images: int = 1) -> GenerateRequest:
    content: list[dict[str, Any]] = [{"type": "image", "image": make_image(56, 56, seed=seed + k)}
                                     for k in range(n_images)]
    prompt = renderer.render([{"role": "user", "content": [*content, {"type": "text", "text": "hi"}]}])
    return GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                           sampling=SamplingParams(max_tokens=3, temperature=0.0))


def engine(served: tuple[EngineServer, Any], **kw: Any) -> VLLMEngine:
    server, renderer = served
    return VLLMEngine.for_renderer(server.url, renderer, retry=kw.pop("retry", FAST), **kw)


async def test_5xx_and_dropped_connections_are_retried(served: tuple[EngineServer, Any]) -> None:
    server, renderer = served
    async with engine(served) as e:
        ok = await e.generate(request(renderer, 1))
        server.faults.fail_next = 2  # type: ignore[attr-defined]
        again = await e.generate(request(renderer, 1))
        assert e.stats.retries == 2 and again.completions[0].token_ids == ok.completions[0].token_ids
        server.faults.drop_next = 1  # type: ignore[attr-defined]
        await e.generate(request(renderer, 1))
        assert e.stats.retries == 3


async def test_4xx_is_not_retried_and_exhaustion_is_a_typed_error(served: tuple[EngineServer, Any]) -> None:
    server, renderer = served
    async with engine(served) as e:
        server.faults.status, server.faults.fail_next = 400, 1  # type: ignore[attr-defined]
        with pytest.raises(InvalidRequestError):
            await e.generate(request(renderer, 2))
        assert e.stats.retries == 0
        server.faults.status, server.faults.fail_next = 503, 10  # type: ignore[attr-defined]
        with pytest.raises(ServerError) as info:
            await e.generate(request(renderer, 2))
        assert info.value.status == 503 and e.stats.retries == 2
        server.faults.fail_next = 0  # type: ignore[attr-defined]
        assert (await e.generate(request(renderer, 2))).completions[0].finish_reason == "length"


async def test_images_go_by_id_and_a_lost_cache_is_recovered(served: tuple[EngineServer, Any]) -> None:
    server, renderer = served
    async with engine(served) as e:
        first = await e.generate(request(renderer, 3, n_images=2))
        assert first.image_bytes_sent > 0 and e.stats.images_sent == 2
        second = await e.generate(request(renderer, 3, n_images=2))
        assert second.image_bytes_sent == 0 and e.stats.images_by_id == 2
        server.forget_cache()  # as a restart would
        third = await e.generate(request(renderer, 3, n_images=2))
        assert e.stats.cache_misses == third.cache_misses == 1 and third.image_bytes_sent == first.image_bytes_sent
        fourth = await e.generate(request(renderer, 3, n_images=2))  # the re-sent images are held again
        assert fourth.cache_misses == 0 and fourth.image_bytes_sent == 0
        e.forget_server_cache()  # e.g. the caller knows the server restarted: no id-only attempt
        again = await e.generate(request(renderer, 3, n_images=2))
        assert again.cache_misses == 0 and again.image_bytes_sent == first.image_bytes_sent
        assert third.completions[0].token_ids == first.completions[0].token_ids
    async with engine(served, images_by_id=False) as e:
        a = await e.generate(request(renderer, 3, n_images=2))
        b = await e.generate(request(renderer, 3, n_images=2))
        assert a.image_bytes_sent == b.image_bytes_sent > 0


async def test_deadline_and_cancellation(served: tuple[EngineServer, Any]) -> None:
    server, renderer = served
    server.faults.delay_s = 1.0  # type: ignore[attr-defined]
    async with engine(served, timeout=0.3) as e:
        with pytest.raises(EngineTimeoutError):
            await e.generate(request(renderer, 4))
    async with engine(served) as e:
        task = asyncio.create_task(e.generate(request(renderer, 4)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.faults.delay_s = 0.0  # type: ignore[attr-defined]
        assert (await e.generate(request(renderer, 4))).completions[0].token_ids  # still usable


async def test_banned_and_stop_ids_come_from_the_renderer(served: tuple[EngineServer, Any]) -> None:
    _, renderer = served
    e = engine(served)
    req = e._with_defaults(request(renderer, 5))
    assert set(renderer.vision_token_ids) <= set(req.sampling.banned_token_ids)
    assert set(renderer.stop_token_ids) <= set(req.sampling.stop_token_ids)
    await e.close()
