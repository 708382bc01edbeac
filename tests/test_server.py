"""`rollwire serve` over real HTTP on 127.0.0.1 with the tiny qwen2_vl model (no mocks).

The client side is built only from the vLLM wire encoders, so what passes here is what a vLLM
0.32 client sends; the answers are compared with the local engine called directly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from rollwire.engines.local import LocalEngine
from rollwire.engines.server import EngineServer
from rollwire.engines.types import GenerateRequest, GenerateResult, SamplingParams
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs, features_payload, generate_body
from rollwire.features import FeatureStore, VisionConfig
from rollwire.render import ImageRef, RenderedTokens, Renderer, create_renderer

pytest.importorskip("torch")


NAME = "tiny-qwen2-vl"
MAX_LEN = 4096
GENERATE = "/inference/v1/generate"
VLLM_500 = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}


@dataclass
class Env:
    model_dir: Path
    server: EngineServer
    http: httpx.Client
    store: FeatureStore  # the client's feature store
    renderer: Renderer  # the client's renderer
    direct: LocalEngine  # an independent engine on the client's store, for the reference answers


@pytest.fixture(scope="module")
def env(tiny: Callable[[str], Path]) -> Iterator[Env]:
    model_dir = tiny("qwen2_vl")
    store = FeatureStore(VisionConfig.from_pretrained(model_dir))
    renderer = create_renderer(model_dir, feature_store=store)
    direct = LocalEngine(model_dir, feature_store=store)
    with EngineServer(model_dir, served_model_name=NAME, max_model_len=MAX_LEN) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        yield Env(model_dir, server, http, store, renderer, direct)
    asyncio.run(direct.close())


@pytest.fixture(autouse=True)
def no_faults(env: Env) -> Iterator[None]:
    yield
    faults = env.server.faults
    faults.delay_s, faults.fail_next, faults.drop_next, faults.status = 0.0, 0, 0, 503


def conversation(*images: Image.Image, text: str = "Describe.") -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def prompt(env: Env, *images: Image.Image, text: str = "Describe.") -> RenderedTokens:
    return env.renderer.render(conversation(*images, text=text))


def request(env: Env, rendered: RenderedTokens, **sampling: Any) -> GenerateRequest:
    params = {"max_tokens": 5, "temperature": 0.0, "banned_token_ids": env.renderer.vision_token_ids, **sampling}
    return GenerateRequest(prompt_token_ids=rendered.token_ids, images=rendered.images,
                           sampling=SamplingParams(**params))


def post(env: Env, req: GenerateRequest, *, by_id: bool = False,
         features: dict[str, Any] | None = None) -> httpx.Response:
    if features is None:
        features, _ = features_payload(req.images, env.store, pixel_format="uint8",
                                       by_id_only=[ref.id for ref in req.images] if by_id else ())
    return env.http.post(GENERATE, content=generate_body(req, model=NAME, features=features))


def direct(env: Env, req: GenerateRequest) -> GenerateResult:
    return asyncio.run(env.direct.generate(req))


def assert_same(response: httpx.Response, want: GenerateResult) -> None:
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(want.completions)))
    for choice, completion in zip(choices, want.completions, strict=True):
        assert choice["token_ids"] == completion.token_ids
        assert [e["logprob"] for e in choice["logprobs"]["content"]] == completion.logprobs
        assert [e["token_id"] for e in choice["logprobs"]["content"]] == completion.token_ids
        assert (choice["finish_reason"], choice["stop_reason"]) == (completion.finish_reason, completion.stop_reason)


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status
    return str(body["message"])


# --- endpoints ------------------------------------------------------------------------------------


def test_health_and_models(env: Env) -> None:
    assert env.http.get("/health").status_code == 200
    models = env.http.get("/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert (card["id"], card["object"], card["root"], card["max_model_len"]) == (
        NAME, "model", str(env.model_dir), MAX_LEN)
    assert env.http.get("/nope").status_code == 404
    assert env.http.get(GENERATE).status_code == 405


def test_generate_with_images_equals_the_local_engine(env: Env) -> None:
    req = request(env, prompt(env, make_image(180, 120, seed=1), make_image(100, 140, seed=2)))
    before = env.server.stats()
    response = post(env, req)
    assert_same(response, direct(env, req))
    body = response.json()
    assert body["usage"] == {"prompt_tokens": len(req.prompt_token_ids), "completion_tokens": 5,
                             "total_tokens": len(req.prompt_token_ids) + 5}
    assert body["choices"][0]["finish_reason"] == "length"
    after = env.server.stats()
    assert (after.requests - before.requests, after.ok - before.ok) == (1, 1)
    assert after.images_received - before.images_received == 2


def test_n_completions_with_a_seed(env: Env) -> None:
    req = request(env, prompt(env, make_image(56, 56, seed=3)), n=2, temperature=1.0, seed=11)
    want = direct(env, req)
    first, second = post(env, req), post(env, req, by_id=True)
    assert_same(first, want)
    assert_same(second, want)
    a, b = (c["token_ids"] for c in first.json()["choices"])
    assert a != b  # completion i is seeded with seed + i


def test_stop_token_ends_the_completion(env: Env) -> None:
    rendered = prompt(env, make_image(56, 56, seed=4))
    first = post(env, request(env, rendered)).json()["choices"][0]["token_ids"][0]
    choice = post(env, request(env, rendered, stop_token_ids=(first,))).json()["choices"][0]
    assert (choice["token_ids"], choice["finish_reason"], choice["stop_reason"]) == ([first], "stop", first)


def test_logprobs_are_null_when_not_asked(env: Env) -> None:
    choice = post(env, request(env, prompt(env, text="Hi."), logprobs=False)).json()["choices"][0]
    assert choice["logprobs"] is None and len(choice["token_ids"]) == 5


# --- the image cache ------------------------------------------------------------------------------


def test_null_kwargs_data_uses_the_cached_image(env: Env) -> None:
    req = request(env, prompt(env, make_image(120, 90, seed=5)))
    assert post(env, req).status_code == 200
    before = env.server.stats()
    response = post(env, req, by_id=True)
    assert_same(response, direct(env, req))
    after = env.server.stats()
    assert (after.cache_hits - before.cache_hits, after.images_received - before.images_received) == (1, 0)


def test_unknown_hash_answers_vllms_opaque_500(env: Env) -> None:
    ref = prompt(env, make_image(56, 56, seed=6)).images[0]
    req = request(env, prompt(env, make_image(56, 56, seed=6)))
    features = {"mm_hashes": {"image": ["f" * 32]}, "mm_placeholders": {"image": [{"offset": ref.offset,
                                                                                  "length": ref.length}]},
                "kwargs_data": {"image": [None]}}
    before = env.server.stats().cache_misses
    response = post(env, req, features=features)
    assert response.status_code == 500 and response.json() == VLLM_500
    assert env.server.stats().cache_misses == before + 1


def test_forget_cache_then_null_item_is_a_500(env: Env) -> None:
    req = request(env, prompt(env, make_image(70, 70, seed=7)))
    assert post(env, req).status_code == 200
    assert post(env, req, by_id=True).status_code == 200
    env.server.forget_cache()
    response = post(env, req, by_id=True)
    assert response.status_code == 500 and response.json() == VLLM_500
    assert post(env, req).status_code == 200  # re-sending the pixels repairs it
    assert post(env, req, by_id=True).status_code == 200


def test_a_restarted_server_has_forgotten_every_image(env: Env) -> None:
    req = request(env, prompt(env, make_image(56, 56, seed=12)), max_tokens=1)
    full, _ = features_payload(req.images, env.store, pixel_format="uint8")
    by_id, _ = features_payload(req.images, env.store, pixel_format="uint8", by_id_only=[r.id for r in req.images])
    server = EngineServer(env.model_dir, served_model_name=NAME)

    def send(features: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return http.post(GENERATE, content=generate_body(req, model=NAME, features=features))

    with server:
        assert send(full).status_code == 200
        assert send(by_id).status_code == 200
    with server:  # restarted: a new engine, a new port, an empty cache
        answer = send(by_id)
        assert answer.status_code == 500 and answer.json() == VLLM_500


def test_known_hash_with_other_pixels_is_a_500_and_keeps_the_original(env: Env) -> None:
    req = request(env, prompt(env, make_image(84, 84, seed=8)))
    assert post(env, req).status_code == 200
    other = env.store.get_or_process(make_image(84, 84, seed=9))  # same size, other pixels
    assert other.grid_thw == req.images[0].grid_thw and other.id != req.images[0].id
    features, _ = features_payload(req.images, env.store, pixel_format="uint8")
    features["kwargs_data"]["image"] = [encode_image_kwargs(other, env.store, "uint8")]
    response = post(env, req, features=features)
    assert response.status_code == 500 and response.json() == VLLM_500
    assert_same(post(env, req, by_id=True), direct(env, req))


def test_float_pixels_are_refused_naming_the_dtype(env: Env) -> None:
    req = request(env, prompt(env, make_image(56, 84, seed=10)))
    features, _ = features_payload(req.images, env.store, pixel_format="float32")
    message = error(post(env, req, features=features), 400)
    assert "float32" in message and "uint8" in message
    assert req.images[0].id not in env.server.feature_store  # type: ignore[operator]


def test_an_image_larger_than_the_cache_is_refused(env: Env) -> None:
    """Stored features are what the engine reads: an image the cache cannot hold is a 400, not a
    500 the client would retry."""
    with EngineServer(env.model_dir, served_model_name=NAME, image_cache_bytes=10_000) as small, \
            httpx.Client(base_url=small.url, timeout=60) as http:
        req = request(env, prompt(env, make_image(56, 56, seed=40)))  # 16 rows x 1176 = 18,816 bytes
        features, _ = features_payload(req.images, env.store, pixel_format="uint8")
        body = generate_body(req, model=NAME, features=features)
        r = http.post("/inference/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "exceed the server's image cache" in r.json()["error"]["message"]


def test_corrupted_placeholder_is_refused_before_generation(env: Env) -> None:
    rendered = prompt(env, make_image(56, 56, seed=11))
    ref = rendered.images[0]
    runs = env.server.engine.stats().requests
    for bad in (ImageRef(ref.id, ref.offset + 1, ref.length, ref.grid_thw),
                ImageRef(ref.id, ref.offset, ref.length - 1, ref.grid_thw)):
        req = GenerateRequest(prompt_token_ids=rendered.token_ids, images=(bad,),
                              sampling=SamplingParams(max_tokens=3))
        message = error(post(env, req), 400)
        assert "image 0" in message
    assert env.server.engine.stats().requests == runs


def test_overlong_request_is_refused_like_vllm(env: Env) -> None:
    req = request(env, prompt(env, text="Hi."), max_tokens=MAX_LEN)
    message = error(post(env, req), 400)
    assert message.startswith(f"This model's maximum context length is {MAX_LEN} tokens")


@pytest.mark.parametrize("change, status, words", [
    (lambda b: b.pop("sampling_params"), 400, "sampling_params"),
    (lambda b: b["sampling_params"].update(logit_bias={"5": 2.0}), 400, "only bans"),
    (lambda b: b["sampling_params"].update(presence_penalty=0.5), 400, "presence_penalty"),
    (lambda b: b["sampling_params"].update(best_of=2), 400, "best_of"),
    (lambda b: b["sampling_params"].update(temperature=-1), 400, "temperature"),
    (lambda b: b.update(token_ids="abc"), 400, "token_ids"),
    (lambda b: b.update(model="other"), 404, "other"),
])
def test_malformed_requests_get_vllm_style_errors(env: Env, change: Callable[[dict[str, Any]], Any],
                                                  status: int, words: str) -> None:
    body: dict[str, Any] = {"model": NAME, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}}
    change(body)
    assert words in error(env.http.post(GENERATE, json=body), status)


def test_concurrent_requests_batch_and_match(env: Env) -> None:
    reqs = [request(env, prompt(env, make_image(56 + 28 * i, 56, seed=20 + i), text="x " * i))
            for i in range(4)]
    want = [direct(env, req) for req in reqs]
    for req in reqs:  # send the pixels once, so the concurrent requests are small
        assert post(env, req).status_code == 200
    barrier = threading.Barrier(len(reqs))
    before = env.server.engine.stats()
    responses: list[httpx.Response | None] = [None] * len(reqs)

    def send(i: int) -> None:
        barrier.wait()
        responses[i] = post(env, reqs[i], by_id=True)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for response, result in zip(responses, want, strict=True):
        assert response is not None and response.status_code == 200
        got = response.json()["choices"][0]
        assert got["token_ids"] == result.completions[0].token_ids
        lps = [e["logprob"] for e in got["logprobs"]["content"]]
        want_lps = result.completions[0].logprobs
        assert want_lps is not None
        np.testing.assert_allclose(lps, want_lps, atol=1e-4, rtol=0)
    after = env.server.engine.stats()
    assert after.requests - before.requests == len(reqs)
    assert after.batches - before.batches < len(reqs)  # some of them ran together


# --- faults ---------------------------------------------------------------------------------------


def test_fail_next_answers_one_503(env: Env) -> None:
    req = request(env, prompt(env, text="Hi."))
    env.server.faults.fail_next = 1
    assert post(env, req).status_code == 503
    assert post(env, req).status_code == 200


def test_drop_next_closes_the_connection_unanswered(env: Env) -> None:
    req = request(env, prompt(env, text="Hi."))
    env.server.faults.drop_next = 1
    with pytest.raises(httpx.RemoteProtocolError):
        post(env, req)
    assert post(env, req).status_code == 200


def test_delay_slows_each_generate_request(env: Env) -> None:
    req = request(env, prompt(env, text="Hi."), max_tokens=1)
    env.server.faults.delay_s = 0.4
    start = time.perf_counter()
    assert post(env, req).status_code == 200
    assert time.perf_counter() - start >= 0.4


# --- render ---------------------------------------------------------------------------------------


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_render_endpoint_equals_the_renderer_and_sends_uint8(env: Env) -> None:
    images = (make_image(180, 120, seed=30), make_image(56, 56, seed=31))
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                             *({"type": "image_url", "image_url": {"url": data_url(im)}}
                                               for im in images)]}]
    response = env.http.post("/v1/chat/completions/render", json={"model": NAME, "messages": messages})
    assert response.status_code == 200, response.text
    body = response.json()
    store = FeatureStore(VisionConfig.from_pretrained(env.model_dir))
    want = create_renderer(env.model_dir, feature_store=store).render(messages)
    assert body["token_ids"] == list(want.token_ids)
    features = body["features"]
    assert features["mm_hashes"]["image"] == list(want.image_ids)
    assert features["mm_placeholders"]["image"] == [{"offset": r.offset, "length": r.length} for r in want.images]
    for item, ref in zip(features["kwargs_data"]["image"], want.images, strict=True):
        pixels, grid, dtype = decode_image_kwargs(item)
        assert dtype == "uint8" and grid == ref.grid_thw
        np.testing.assert_array_equal(pixels, store.get(ref.id).pixel_values)


def test_render_refuses_local_paths(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    make_image(56, 56).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}]}]
    message = error(env.http.post("/v1/chat/completions/render", json={"messages": messages}), 400)
    assert "data: URLs" in message


# --- the command line entry -----------------------------------------------------------------------


def test_serve_forever_stops_cleanly_on_ctrl_c(env: Env) -> None:
    code = ("import sys; from rollwire.engines.server import serve_forever; "
            "serve_forever(sys.argv[1], port=0, served_model_name='cli')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(env.model_dir)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url is not None, "the server never said where it listens"
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "cli"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)  # drains stderr while waiting: a full pipe must not hold the server
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
