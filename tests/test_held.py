"""Which images a server holds: epochs, deduplication of images in flight, a failed carrier; and the
vLLM client against a small fake server (in-process, httpx.MockTransport) that keeps an image cache
the way vLLM does: wiped on a weight update, absent behind a data-parallel load balancer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_image
from rollwire.engines.held import HeldImages, data_parallel_engines, weight_versions
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import RetryPolicy, VLLMEngine
from rollwire.render import create_renderer

# --- HeldImages on its own -----------------------------------------------------------------------


async def test_only_a_200_in_the_same_epoch_makes_an_image_held() -> None:
    held = HeldImages()
    plan = await held.plan(["a", "b"])
    assert plan.carry == {"a", "b"} and plan.by_id == set()
    held.settle(plan, ok=False)
    assert "a" not in held  # a failed request proves nothing
    plan = await held.plan(["a", "b"])
    held.new_epoch("test: the server paused")
    held.settle(plan, ok=True)
    assert "a" not in held  # sent before the wipe
    plan = await held.plan(["a"])
    held.settle(plan, ok=True)
    again = await held.plan(["a", "b"])
    assert again.by_id == {"a"} and again.carry == {"b"}
    held.settle(again, ok=True)


async def test_concurrent_requests_for_a_new_image_send_it_once() -> None:
    held = HeldImages()
    carried: list[frozenset[str]] = []
    release = asyncio.Event()

    async def request() -> None:
        plan = await held.plan(["img", "img"])
        carried.append(plan.carry)
        try:
            if plan.carry:
                await release.wait()  # the carrier's request is in flight
        finally:
            held.settle(plan, ok=True)

    tasks = [asyncio.create_task(request()) for _ in range(16)]
    await asyncio.sleep(0.01)
    assert carried == [frozenset({"img"})]  # one carrier; 15 wait (and hold no claim while waiting)
    release.set()
    await asyncio.gather(*tasks)
    assert carried.count(frozenset()) == 15 and held.stats.waits == 15


async def test_a_failed_carrier_leaves_the_image_to_a_waiter() -> None:
    held = HeldImages()
    first = await held.plan(["img"])
    waiter = asyncio.create_task(held.plan(["img"]))
    await asyncio.sleep(0)
    assert not waiter.done()
    held.settle(first, ok=False)  # the carrier's request failed
    second = await waiter
    assert second.carry == {"img"}  # the waiter carries the pixels itself
    held.settle(second, ok=True)
    assert "img" in held


async def test_requests_sharing_images_in_opposite_orders_do_not_deadlock() -> None:
    held = HeldImages()
    a = await held.plan(["x", "y"])
    b = asyncio.create_task(held.plan(["y", "x", "z"]))
    await asyncio.sleep(0)
    held.settle(a, ok=True)
    plan_b = await asyncio.wait_for(b, 1.0)
    assert plan_b.by_id == {"x", "y"} and plan_b.carry == {"z"}
    held.settle(plan_b, ok=True)


async def test_weight_versions_start_epochs_and_late_answers_do_not_count() -> None:
    held = HeldImages()
    plan = await held.plan(["a"])
    held.settle(plan, ok=True, weight_versions=["v1"])
    assert "a" in held and held.weight_version == "v1" and held.epoch == 0
    plan = await held.plan(["b"])
    held.settle(plan, ok=True, weight_versions=["v1", "v2"])  # the update happened mid-request
    assert held.epoch == 1 and "a" not in held and "b" not in held and held.weight_version == "v2"
    late = await held.plan(["c"])
    held.settle(late, ok=True, weight_versions=["v1"])  # an answer from the old weights, arriving late
    assert held.epoch == 1 and held.weight_version == "v2" and "c" not in held
    plan = await held.plan(["c"])
    held.settle(plan, ok=True, weight_versions=["v2"])
    assert "c" in held


async def test_abort_restart_eviction_and_the_bytes_bound() -> None:
    held = HeldImages(max_bytes=250)
    for name in ("a", "b", "c"):
        plan = await held.plan([name])
        held.settle(plan, ok=True, sizes={name: 100})
    assert "a" not in held and "b" in held and "c" in held  # LRU under the bound
    plan = await held.plan(["d"])
    held.settle(plan, ok=True, aborted=True)
    assert held.epoch == 1 and len(held) == 0  # vLLM aborts in-flight requests when it pauses
    held.unreachable()
    plan = await held.plan(["e"])
    held.settle(plan, ok=True, sizes={"e": 1})
    assert held.epoch == 2 and "e" in held  # reached the server as it is after the restart
    held.evicted(["e"])
    assert "e" not in held and held.stats.evicted == 1


def test_reading_what_the_server_reports() -> None:
    assert weight_versions({"choices": [{"weight_versions": [{"version": "a", "start": 0, "end": 2},
                                                             {"version": "b", "start": 2, "end": 3}]},
                                        {"weight_versions": [{"version": "b", "start": 0, "end": 1}]}]}) == ["a", "b"]
    assert weight_versions({"choices": [{"token_ids": [1]}]}) == [] and weight_versions("junk") == []
    one = 'vllm:num_requests_running{engine="0",model_name="m"} 0.0\nvllm:cache_config_info{engine=""} 1\n'
    two = one + 'vllm:num_requests_running{engine="1",model_name="m"} 0.0\n'
    assert data_parallel_engines(one) == 1 and data_parallel_engines(two) == 2 and data_parallel_engines("") == 1


# --- the client against a fake server ------------------------------------------------------------


class FakeVLLM:
    """Answers /v1/models, /metrics and the generate endpoint; keeps an image cache by hash (wiped
    by `update_weights`), answers an id-only item it does not hold with a bare 500, as vLLM does."""

    def __init__(self, engines: int = 1) -> None:
        self.cache: set[str] = set()
        self.version = "v0"
        self.engines = engines
        self.down = False
        self.delay_s = 0.0
        self.pixels_received: list[str] = []
        self.requests: list[int] = []  # n of each generate request answered

    def update_weights(self, version: str) -> None:
        self.cache.clear()  # pause (clear_cache=True) ... resume
        self.version = version

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text="".join(
                f'vllm:num_requests_running{{engine="{k}",model_name="m"}} 0.0\n' for k in range(self.engines)))
        body = json.loads(request.content)
        await asyncio.sleep(self.delay_s)
        features = body.get("features") or {"mm_hashes": {"image": []}, "kwargs_data": {"image": []}}
        for mm_hash, item in zip(features["mm_hashes"]["image"], features["kwargs_data"]["image"], strict=True):
            if item is None and (self.engines > 1 or mm_hash not in self.cache):
                return httpx.Response(500, json={"error": {"message": "internal error"}})
            if item is not None:
                self.pixels_received.append(mm_hash)
                if self.engines == 1:
                    self.cache.add(mm_hash)
        n = body["sampling_params"].get("n", 1)
        self.requests.append(n)
        return httpx.Response(200, json={"choices": [  # choice k samples [11, 12 + k]
            {"index": k, "token_ids": [11, 12 + k], "finish_reason": "length",
             "logprobs": {"content": [{"token_id": 11, "logprob": -1.0}, {"token_id": 12 + k, "logprob": -2.0}]},
             "weight_versions": [{"version": self.version, "start": 0, "end": 2}]} for k in range(n)]})


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


def client(renderer: Any, server: FakeVLLM, **kw: Any) -> VLLMEngine:
    return VLLMEngine.for_renderer("http://fake", renderer, pixel_format="uint8", verify_pixel_format=False,
                                   transport=httpx.MockTransport(server),
                                   retry=RetryPolicy(attempts=4, base_s=0.01, cap_s=0.02), **kw)


def group_request(renderer: Any, seed: int) -> GenerateRequest:
    prompt = renderer.render([{"role": "user", "content": [{"type": "image", "image": make_image(112, 112, seed=seed)},
                                                           {"type": "text", "text": "what is it?"}]}])
    return GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                           sampling=SamplingParams(max_tokens=2))


async def test_a_group_of_16_sharing_a_new_image_sends_it_once(renderer: Any) -> None:
    server = FakeVLLM()
    server.delay_s = 0.02  # the carrier is still in flight when the others arrive
    request = group_request(renderer, 1)
    async with client(renderer, FakeVLLM()) as alone:
        one = (await alone.generate(request)).image_bytes_sent  # one copy, to another server
    async with client(renderer, server) as engine:
        results = await asyncio.gather(*(engine.generate(request) for _ in range(16)))
    sent = sum(r.image_bytes_sent for r in results)
    assert all(r.completions[0].token_ids == [11, 12] for r in results)
    assert sent <= 1.05 * one and server.pixels_received == [request.images[0].id]
    assert engine.stats.images_by_id == 15 and engine.stats.cache_misses == 0


async def test_a_weight_update_starts_a_new_epoch_without_a_miss(renderer: Any) -> None:
    server = FakeVLLM()
    request = group_request(renderer, 2)
    async with client(renderer, server) as engine:
        first = await engine.generate(request)
        assert (await engine.generate(request)).image_bytes_sent == 0
        server.update_weights("v1")
        # The first answer after the update names v1: what it relied on may be gone (one miss, re-sent)...
        after = await engine.generate(request)
        assert after.image_bytes_sent == first.image_bytes_sent and engine.held.weight_version == "v1"
        engine.new_epoch("test: the weight-update hook says the cache was wiped")
        server.update_weights("v2")
        # ...but a hook that calls new_epoch first costs no miss at all.
        again = await engine.generate(request)
        assert again.cache_misses == 0 and again.image_bytes_sent == first.image_bytes_sent
        assert (await engine.generate(request)).image_bytes_sent == 0


async def test_a_restart_seen_as_a_refused_connection_is_a_new_epoch(renderer: Any) -> None:
    server = FakeVLLM()
    request = group_request(renderer, 3)
    async with client(renderer, server) as engine:
        first = await engine.generate(request)
        server.down, server.cache = True, set()  # the server dies and comes back with nothing

        async def back() -> None:
            await asyncio.sleep(0.015)
            server.down = False

        revive = asyncio.create_task(back())
        other = group_request(renderer, 4)
        await engine.generate(other)  # retried until the server is back: a new epoch starts
        await revive
        after = await engine.generate(request)
        assert after.cache_misses == 0 and after.image_bytes_sent == first.image_bytes_sent
        assert engine.held.stats.epochs == 1


async def test_no_id_only_sending_behind_a_data_parallel_load_balancer(renderer: Any) -> None:
    server = FakeVLLM(engines=2)
    request = group_request(renderer, 5)
    async with client(renderer, server) as engine:
        a = await engine.generate(request)
        b = await engine.generate(request)
        assert a.image_bytes_sent == b.image_bytes_sent > 0 and b.cache_misses == 0
        assert not engine.held.enabled and "data-parallel" in engine.held.disabled_reason
    async with client(renderer, FakeVLLM(), images_by_id=False) as engine:
        a = await engine.generate(request)
        b = await engine.generate(request)
        assert a.image_bytes_sent == b.image_bytes_sent > 0
