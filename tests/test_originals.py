"""content_parts sends the user's original image bytes where the server processes that kind of image
exactly as rollwire does, and the resized PNG elsewhere, against `rollwire serve`: one that processes
as rollwire does, one whose processor resizes differently (bilinear: a real server, its preprocessor
config changed), and one without the render endpoint the check asks."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import make_image
from rollwire.bench.images import encoded, photo
from rollwire.engines import content_parts as cp
from rollwire.engines.server import EngineServer
from rollwire.engines.types import GenerateRequest, GenerateResult, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import RENDER_PATH
from rollwire.features import FeatureStore
from rollwire.render import create_renderer
from rollwire.render.types import RenderedTokens, Renderer

# 112x112 needs no resize (a multiple of 28); 100x80 is resized to 112x84.
SAME, RESIZED = (112, 112), (100, 80)


def jpeg_url(size: tuple[int, int], seed: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encoded(photo(*size, seed=seed), "JPEG")).decode()


def user(*urls: str, say: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image", "image": u} for u in urls), {"type": "text", "text": say}]}


@pytest.fixture(scope="module")
def served(tiny: Callable[[str], Path]) -> Iterator[EngineServer]:
    with EngineServer(tiny("qwen2_vl"), served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def bilinear(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineServer]:
    """A server whose processor resizes with another filter: same grids, other pixels when it resizes."""
    model_dir = tmp_path_factory.mktemp("bilinear") / "model"
    shutil.copytree(tiny("qwen2_vl"), model_dir)
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    (model_dir / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
    with EngineServer(model_dir, served_model_name="tiny") as server:
        yield server


async def generate(engine: VLLMEngine, prompt: RenderedTokens) -> GenerateResult:
    return await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                                 sampling=SamplingParams(max_tokens=3, temperature=0.0, logprobs=1)))


async def two_turns(url: str, renderer: Renderer, wire: str, urls: list[str], **kw: Any,
                    ) -> tuple[list[GenerateResult], VLLMEngine]:
    engine = VLLMEngine.for_renderer(url, renderer, wire=wire, **kw)
    prompt = renderer.render([user(*urls[:2])])
    first = await generate(engine, prompt)
    bridged = renderer.bridge(prompt, first.completions[0].token_ids, [user(*urls[2:], say="again")])
    assert bridged.tokens is not None
    second = await generate(engine, bridged.tokens)
    await engine.close()
    return [first, second], engine


def outputs(results: list[GenerateResult]) -> list[Any]:
    return [(r.completions[0].token_ids, r.completions[0].logprobs) for r in results]


URLS = [jpeg_url(SAME, 1), jpeg_url(RESIZED, 2), jpeg_url(SAME, 3), jpeg_url(RESIZED, 4)]


async def test_originals_go_as_they_are_to_a_server_that_processes_them_as_rollwire(
        served: EngineServer, tiny: Callable[[str], Path]) -> None:
    feats, _ = await two_turns(served.url, create_renderer(tiny("qwen2_vl")), "features", URLS)
    parts, engine = await two_turns(served.url, create_renderer(tiny("qwen2_vl")), "content-parts", URLS)
    assert outputs(parts) == outputs(feats)
    assert parts[0].image_bytes_sent == len(URLS[0]) + len(URLS[1])  # the JPEGs themselves
    assert parts[1].image_bytes_sent == len(URLS[2]) + len(URLS[3])  # the first two by uuid
    assert engine.originals.checks == 2  # one render check per kind, none for the second turn's
    assert engine.originals.verdicts() == {"JPEG": True, "JPEG resized": True}


async def test_a_server_that_resizes_differently_gets_the_png_and_the_reason_once(
        bilinear: EngineServer, tiny: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    feats, _ = await two_turns(bilinear.url, create_renderer(tiny("qwen2_vl")), "features", URLS)
    renderer = create_renderer(tiny("qwen2_vl"))
    with caplog.at_level(logging.WARNING, logger="rollwire.engines"):
        parts, engine = await two_turns(bilinear.url, renderer, "content-parts", URLS)
    assert outputs(parts) == outputs(feats)  # the server saw rollwire's pixels, not its own resize
    store = renderer.feature_store
    assert store is not None
    png = [len(cp.image_url(store.get_or_process(u), store.config)) for u in URLS]
    assert parts[0].image_bytes_sent == len(URLS[0]) + png[1]
    assert parts[1].image_bytes_sent == len(URLS[2]) + png[3]
    assert png[1] > len(URLS[1])  # the fallback costs bytes
    assert engine.originals.verdicts() == {"JPEG": True, "JPEG resized": False}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "JPEG images that need resize" in warnings[0] and "resizes differently" in warnings[0]
    assert '"use_fast": false' in warnings[0] and "of its pixel values differ" in warnings[0]


class NoRender(httpx.AsyncBaseTransport):
    """The real server, but its render endpoint answers 404 (a server without it)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == RENDER_PATH:
            return httpx.Response(404, json={"detail": "Not Found"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_server_that_cannot_be_asked_gets_the_png(
        served: EngineServer, tiny: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    renderer = create_renderer(tiny("qwen2_vl"))
    with caplog.at_level(logging.WARNING, logger="rollwire.engines"):
        parts, engine = await two_turns(served.url, renderer, "content-parts", URLS, transport=NoRender())
    store = renderer.feature_store
    assert store is not None
    png = [len(cp.image_url(store.get_or_process(u), store.config)) for u in URLS]
    assert [r.image_bytes_sent for r in parts] == [png[0] + png[1], png[2] + png[3]]
    assert engine.originals.checks == 1 and engine.originals.refused is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be asked" in warnings[0] and "404" in warnings[0], warnings


def jpeg_bytes(image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_only_plain_rgb_originals_go_as_they_are(tiny: Callable[[str], Path]) -> None:
    store = FeatureStore(create_renderer(tiny("qwen2_vl")).feature_store.config, keep_encoded=True)  # type: ignore[union-attr]
    rgb = photo(*RESIZED, seed=5)
    plain = jpeg_bytes(rgb)
    found = cp.original(store.get_or_process(plain), store)
    assert found is not None and found.data == plain and found.kind == ("JPEG", True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the server may not apply it as rollwire does
    rgba = io.BytesIO()
    make_image(56, 56, "RGBA", 1).save(rgba, format="PNG")
    for data in (jpeg_bytes(rgb, exif=exif), jpeg_bytes(rgb.convert("L")), rgba.getvalue()):
        assert cp.original(store.get_or_process(data), store) is None
    assert cp.original(store.get_or_process(photo(*SAME, seed=6)), store) is None  # a PIL image has no bytes
    unkept = FeatureStore(store.config)
    assert cp.original(unkept.get_or_process(plain), unkept) is None  # the store was not asked to keep them


def test_kept_bytes_count_in_the_bound_and_leave_with_their_features(tiny: Callable[[str], Path]) -> None:
    config = create_renderer(tiny("qwen2_vl")).feature_store.config  # type: ignore[union-attr]
    one, two = jpeg_bytes(photo(*SAME, seed=7)), jpeg_bytes(photo(*SAME, seed=8))
    rows = FeatureStore(config).get_or_process(one).nbytes
    store = FeatureStore(config, max_bytes=rows + len(one) + len(two) // 2, keep_encoded=True)
    first = store.get_or_process(one)
    assert store.encoded(first.id) == one and store.stats().bytes == rows + len(one)
    second = store.get_or_process(two)  # both do not fit: the first leaves, with its bytes
    assert first.id not in store and store.encoded(first.id) is None
    assert store.encoded(second.id) == two and store.stats().bytes == second.nbytes + len(two)


def test_bench_wire_sends_the_originals_once() -> None:
    from rollwire.bench.wire import rollout_bytes

    r = rollout_bytes("photo", 3, 112)
    assert r["image_bytes"]["content_parts_once"] == r["data_urls_once"]  # each JPEG's data URL, once
    assert r["image_bytes"]["content_parts_png"] > r["data_urls_once"]


def render_answer(pixels: Any, grid: tuple[int, int, int]) -> dict[str, Any]:
    """A render answer in vLLM 0.32's layout carrying these pixel rows (dtype as given)."""
    import msgspec
    import numpy as np

    def array(a: Any) -> list[Any]:
        return [a.dtype.name, list(a.shape), msgspec.msgpack.Ext(3, np.ascontiguousarray(a).tobytes())]

    item = {"pixel_values": {"data": array(pixels), "field": ["flat", {"keep_on_cpu": False,
                                                                      "slices": [[[0, len(pixels), None]]], "dim": 0}]},
            "image_grid_thw": {"data": array(np.array(grid, np.int64)), "field": ["batched", {"keep_on_cpu": True}]}}
    return {"features": {"kwargs_data": {"image": [base64.b64encode(msgspec.msgpack.encode(item)).decode()]}}}


async def test_a_pil_backend_server_renders_unrescaled_floats_and_takes_uint8(tiny: Callable[[str], Path]) -> None:
    """vLLM with `use_fast: false` renders float32 0..255 values (measured on 0.32) and normalises
    uint8 rows on its side: pixel-format detection says uint8, the originals check says equal."""
    import numpy as np

    from rollwire.engines.originals import compare
    from rollwire.engines.pixel_format import detect_pixel_format
    from rollwire.errors import PixelFormatError

    store = create_renderer(tiny("qwen2_vl")).feature_store
    assert store is not None

    def server(transform: Callable[[Any], Any]) -> Callable[[str, Any], Any]:
        async def post(path: str, body: Any) -> Any:
            url = body["messages"][0]["content"][0]["image_url"]["url"]
            features = store.get_or_process(url)
            return render_answer(transform(features.pixel_values), features.grid_thw)
        return post

    raw = server(lambda rows: rows.astype(np.float32))
    assert await detect_pixel_format(raw, store, model="tiny", base_url="x") == "uint8"
    features = store.get_or_process(URLS[1])
    assert compare(render_answer(features.pixel_values.astype(np.float32), features.grid_thw), features, store) is None
    bumped = features.pixel_values.copy()
    bumped.flat[::97] ^= 1  # one level off, on ~1% of the values
    off = bumped.astype(np.float32)
    assert compare(render_answer(off, features.grid_thw), features, store) == (
        "its float32 pixels are neither rollwire's values nor their normalised form")
    assert compare(render_answer(bumped, features.grid_thw), features, store) == (
        "1.03% of its pixel values differ from rollwire's, by up to 1")
    with pytest.raises(PixelFormatError, match="not rollwire's normalised"):
        await detect_pixel_format(server(lambda rows: rows.astype(np.float32) + 1), store, model="tiny", base_url="x")


async def test_a_restarted_server_is_asked_again(served: EngineServer, tiny: Callable[[str], Path]) -> None:
    """Verdicts hold for the server's software: a weight update keeps them, a restart (it may run with
    other flags now) forgets them, and the next image of each kind is checked again."""
    renderer = create_renderer(tiny("qwen2_vl"))
    engine = VLLMEngine.for_renderer(served.url, renderer, wire="content-parts")
    await generate(engine, renderer.render([user(*URLS[:2])]))
    assert engine.originals.checks == 2
    engine.held.unreachable()  # as a refused connection marks it: the next answer comes from a restarted server
    await generate(engine, renderer.render([user(URLS[2])]))  # its verdict was taken before the answer
    assert engine.held.restarts == 1 and engine.originals.checks == 2
    await generate(engine, renderer.render([user(URLS[3])]))
    assert engine.originals.checks == 3 and engine.originals.verdicts() == {"JPEG resized": True}
    await engine.close()
