"""The content_parts wire mode against `rollwire serve` (which expands content_parts as vLLM does),
and the client's reading of servers that cannot take a mode, against a small fake server: a wrong
expansion, vLLM 0.33's pause and logprob shapes, a dead engine, the Rust frontend, --tokens-only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from conftest import make_image
from rollwire.engines import content_parts as cp
from rollwire.engines.server import EngineServer
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import RetryPolicy, VLLMEngine
from rollwire.engines.vllm_wire import GenerateBody, decode_response
from rollwire.errors import (
    EngineDeadError,
    ExpansionMismatchError,
    PixelFormatError,
    ServerPausedError,
    UnsupportedServerError,
)
from rollwire.render import create_renderer
from rollwire.render.types import Renderer

FAST = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02)


@pytest.fixture(scope="module")
def served(tiny: Callable[[str], Path]) -> Iterator[tuple[EngineServer, Renderer]]:
    model_dir = tiny("qwen2_vl")
    with EngineServer(model_dir, served_model_name="tiny") as server:
        yield server, create_renderer(model_dir)


def user(*sizes: tuple[int, int, int], say: str = "hi") -> dict[str, Any]:
    images = [{"type": "image", "image": make_image(w, h, seed=s)} for w, h, s in sizes]
    return {"role": "user", "content": [*images, {"type": "text", "text": say}]}


async def three_turns(server: EngineServer, renderer: Renderer, wire: str) -> tuple[list[Any], VLLMEngine]:
    engine = VLLMEngine.for_renderer(server.url, renderer, wire=wire, retry=FAST)
    prompt = renderer.render([user((56, 56, 1), (100, 80, 2))])
    out = []
    for t in range(3):
        if wire == "content-parts" and t == 2:
            server.forget_cache()  # as a restart or a /pause would
        result = await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                                       sampling=SamplingParams(max_tokens=3, temperature=0.0)))
        out.append(result)
        bridged = renderer.bridge(prompt, result.completions[0].token_ids, [user((84, 56, 10 + t), say=str(t))])
        assert bridged.tokens is not None
        prompt = bridged.tokens
    await engine.close()
    return out, engine


async def test_content_parts_gives_the_features_tokens_and_sends_images_once(
        served: tuple[EngineServer, Renderer]) -> None:
    server, renderer = served
    feats, _ = await three_turns(server, renderer, "features")
    parts, engine = await three_turns(server, renderer, "content-parts")
    for a, b in zip(feats, parts, strict=True):
        assert (a.completions[0].token_ids, a.completions[0].logprobs) == (
            b.completions[0].token_ids, b.completions[0].logprobs)
    store = renderer.feature_store
    assert store is not None
    png = {s: len(cp.image_url(store.get_or_process(make_image(w, h, seed=s)), store.config))
           for w, h, s in [(56, 56, 1), (100, 80, 2), (84, 56, 10), (84, 56, 11)]}
    assert parts[0].image_bytes_sent == png[1] + png[2]
    assert parts[1].image_bytes_sent == png[10]  # the first two by uuid only
    assert parts[2].cache_misses == 1 and parts[2].image_bytes_sent == png[1] + png[2] + png[10] + 2 * png[11]
    assert engine.stats.cache_misses == 1 and engine.stats.images_by_id == 2


def test_collapse_and_expand_are_inverse(served: tuple[EngineServer, Renderer]) -> None:
    _, renderer = served
    prompt = renderer.render([user((56, 56, 1), (100, 80, 2))])
    pad = renderer.image_pad_id
    assert pad is not None and renderer.feature_store is not None
    short = cp.collapse(prompt.token_ids, prompt.images, pad)
    assert short.count(pad) == 2 and len(short) == len(prompt.token_ids) - sum(r.length - 1 for r in prompt.images)
    feats = [renderer.feature_store.get(r.id) for r in prompt.images]
    ids, refs = cp.expand(short, feats, pad_id=pad)
    assert ids == list(prompt.token_ids) and refs == prompt.images
    image = cp.resized_image(feats[1], renderer.feature_store.config)
    assert image.size == (feats[1].grid_thw[2] * 14, feats[1].grid_thw[1] * 14)  # resized from 100x80


# --- a small fake server ------------------------------------------------------------------------


def fake(answer: Callable[[GenerateBody], tuple[int, Any]], *, render: bool = True,
         seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 4096}]})
        if request.url.path == "/inference/v1/generate":
            status, body = answer(msgspec.json.decode(request.content, type=GenerateBody))
            return httpx.Response(status, json=body)
        return httpx.Response(404 if not render else 500, json={"detail": "Not Found"})
    return httpx.MockTransport(handler)


def vllm_answer(body: GenerateBody, renderer: Renderer, *, shift: int = 0, drop_pad: bool = False,
                top: int = 1) -> tuple[int, Any]:
    """What vLLM answers: the prompt expanded as rollwire's render does (or deliberately not)."""
    pad = renderer.image_pad_id
    store = renderer.feature_store
    assert pad is not None and store is not None and body.content_parts is not None
    ids, refs = cp.expand(body.token_ids, [store.get(p.uuid or "") for p in body.content_parts], pad_id=pad)
    if drop_pad:
        ids.remove(pad)
    entry = {"token_id": 198, "logprob": -1.5, "rank": 3,
             "top_logprobs": [{"token_id": 198, "logprob": -1.5, "rank": 3}] + [
                 {"token_id": 7 + k, "logprob": -0.5, "rank": 1 + k} for k in range(top - 1)]}
    return 200, {"request_id": "r", "output_mode": "derender",
                 "choices": [{"index": 0, "token_ids": [198], "finish_reason": "length",
                              "logprobs": {"content": [entry]}, "weight_versions": [
                                  {"version": "v1", "start": 0, "end": 1}]}],
                 "prompt_token_ids": ids,
                 "mm_placeholders": {"image": [{"offset": r.offset + shift, "length": r.length} for r in refs]}}


def ask(renderer: Renderer, **kw: Any) -> GenerateRequest:
    prompt = renderer.render([user((56, 56, 1), (100, 80, 2))])
    return GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                           sampling=SamplingParams(max_tokens=1), **kw)


@pytest.mark.parametrize(("change", "needle"), [({"drop_pad": True}, "first difference at token"),
                                                ({"shift": 1}, "placed the images at")])
async def test_a_different_expansion_is_an_error(served: tuple[EngineServer, Renderer], change: dict[str, Any],
                                                 needle: str) -> None:
    _, renderer = served
    engine = VLLMEngine.for_renderer("http://fake", renderer, wire="content-parts", retry=FAST,
                                     transport=fake(lambda b: vllm_answer(b, renderer, **change)))
    with pytest.raises(ExpansionMismatchError, match=needle):
        await engine.generate(ask(renderer))
    await engine.close()


async def test_0_33_shapes_and_the_session_header(served: tuple[EngineServer, Renderer]) -> None:
    _, renderer = served
    seen: list[httpx.Request] = []
    for top in (1, 2):  # k or k + 1 top_logprobs entries, the sampled one first
        engine = VLLMEngine.for_renderer("http://fake", renderer, wire="content-parts", transport=fake(
            lambda b, t=top: vllm_answer(b, renderer, top=t), seen=seen))
        result = await engine.generate(ask(renderer, session_id="s-1"))
        assert result.completions[0].logprobs == [-1.5]
        await engine.close()
    sent = [r for r in seen if r.url.path.endswith("/generate")]
    assert all(r.headers["x-session-id"] == "s-1" for r in sent)
    body = json.loads(sent[0].content)
    assert body["return_token_ids"] is True and "features" not in body
    assert [p.get("url") is not None for p in body["content_parts"]] == [True, True]
    assert [p["type"] for p in body["content_parts"]] == ["image_url"] * 2  # vLLM skips a part without it
    answer = decode_response(json.dumps(vllm_answer(msgspec.json.decode(sent[0].content, type=GenerateBody),
                                                    renderer)[1]).encode())
    assert answer.output_mode == "derender" and answer.choices[0].weight_versions is not None


def failing(status: int, message: str, *, times: int = 10**9) -> Callable[[GenerateBody], tuple[int, Any]]:
    left = [times]

    def answer(body: GenerateBody) -> tuple[int, Any]:
        if left[0] > 0:
            left[0] -= 1
            return status, {"error": {"message": message, "type": "Error", "code": status}}
        return 200, {"choices": [{"index": 0, "token_ids": [5], "finish_reason": "length", "logprobs": None}]}
    return answer


async def text_engine(tiny: Callable[[str], Path], answer: Callable[[GenerateBody], tuple[int, Any]],
                      retry: RetryPolicy = FAST) -> tuple[VLLMEngine, GenerateRequest]:
    renderer = create_renderer(tiny("qwen3"))
    engine = VLLMEngine.for_renderer("http://fake", renderer, retry=retry, transport=fake(answer))
    ids = renderer.render([{"role": "user", "content": "hi"}]).token_ids
    return engine, GenerateRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=1, logprobs=False))


async def test_a_pause_is_waited_out_and_a_long_one_named(tiny: Callable[[str], Path]) -> None:
    engine, req = await text_engine(tiny, failing(503, "Generation is paused", times=2),
                                    RetryPolicy(deadline_s=5, base_s=0.01, cap_s=0.02))
    assert (await engine.generate(req)).completions[0].token_ids == [5] and engine.stats.retries == 2
    engine, req = await text_engine(tiny, failing(503, "Generation is paused"),
                                    RetryPolicy(deadline_s=0.2, base_s=0.01, cap_s=0.02))
    with pytest.raises(ServerPausedError, match=r"Generation is paused.*POST /resume"):
        await engine.generate(req)


async def test_a_dead_engine_is_typed_and_not_retried(tiny: Callable[[str], Path]) -> None:
    engine, req = await text_engine(tiny, failing(500, "EngineCore encountered an issue. See stack trace (above) "
                                                       "for the root cause."))
    with pytest.raises(EngineDeadError, match="restart the server"):
        await engine.generate(req)
    assert engine.stats.retries == 0


async def test_tokens_only_says_what_to_change(tiny: Callable[[str], Path]) -> None:
    engine, req = await text_engine(tiny, failing(400, "this server does not load one (--tokens-only or "
                                                       "--skip-tokenizer-init)"))
    with pytest.raises(UnsupportedServerError, match="start it without that flag"):
        await engine.generate(req)


async def test_the_rust_frontend_is_detected(served: tuple[EngineServer, Renderer]) -> None:
    _, renderer = served
    no_render = fake(lambda b: vllm_answer(b, renderer), render=False)
    engine = VLLMEngine.for_renderer("http://fake", renderer, wire="auto", transport=no_render)
    assert (await engine.generate(ask(renderer))).completions[0].token_ids == [198]
    assert engine.wire == "content_parts"
    engine = VLLMEngine.for_renderer("http://fake", renderer, wire="features", transport=no_render)
    with pytest.raises(PixelFormatError, match="VLLM_USE_RUST_FRONTEND"):
        await engine.connect()

    def ignores_features(body: GenerateBody) -> tuple[int, Any]:  # answers as if there were no images
        return 200, {"choices": [{"index": 0, "token_ids": [5], "finish_reason": "length", "logprobs": None}],
                     "prompt_token_ids": body.token_ids, "mm_placeholders": None}
    engine = VLLMEngine.for_renderer("http://fake", renderer, pixel_format="uint8", verify_pixel_format=False,
                                     transport=fake(ignores_features))
    with pytest.raises(UnsupportedServerError, match="ignored the request's images"):
        await engine.generate(msgspec.structs.replace(ask(renderer), sampling=SamplingParams(max_tokens=1,
                                                                                              logprobs=False)))


async def test_auto_switches_to_content_parts_when_generate_refuses_features(
        served: tuple[EngineServer, Renderer]) -> None:
    """A server that renders the probe (so auto starts with features) but whose generate endpoint
    rejects `features` (a frontend without it): auto re-sends the request as content_parts."""
    server, renderer = served
    bodies: list[GenerateBody] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/inference/v1/generate":  # models and the render probe: the real server
            real = httpx.request(request.method, server.url + request.url.path, content=request.content)
            return httpx.Response(real.status_code, content=real.content)
        body = msgspec.json.decode(request.content, type=GenerateBody)
        bodies.append(body)
        if body.features is not None:
            return httpx.Response(422, json={"error": {"message": "unknown field `features`"}})
        status, answer = vllm_answer(body, renderer)
        return httpx.Response(status, json=answer)

    engine = VLLMEngine.for_renderer("http://fake", renderer, wire="auto", transport=httpx.MockTransport(handler))
    assert (await engine.generate(ask(renderer))).completions[0].token_ids == [198]
    assert engine.wire == "content_parts" and [b.features is not None for b in bodies] == [True, False]
    await engine.close()
