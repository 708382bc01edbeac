"""The OpenAI front's images over a real `rollwire serve` upstream: in content_parts mode a client's
JPEG reaches the upstream as its own bytes (tokens and logprobs as in features mode), images stay
pinned in the feature store while their request is in flight and are released after, an evicted one
is reloaded from the run's archived original (still the client's bytes), and a corrupt one is a 400."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest

from rollwire.bench.images import encoded, photo
from rollwire.engines.server import EngineServer
from rollwire.engines.vllm import VLLMEngine
from rollwire.engines.wire import GENERATE_PATH, RENDER_PATH
from rollwire.features import FeatureStore, StoreStats
from rollwire.front import FrontServer
from rollwire.store import RunReader

# 56x56 needs no resize (a multiple of 28); 60x44 is resized.
JPEGS = [encoded(photo(56, 56, seed=1)), encoded(photo(60, 44, seed=2)), encoded(photo(56, 56, seed=3))]


class RecordingServer(EngineServer):
    """`rollwire serve` that keeps each request it gets and can look at the front while one is in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, bytes]] = []
        self.on_generate: Callable[[], None] | None = None

    def handle(self, method: str, path: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
        self.requests.append((path, body))
        if path == GENERATE_PATH and self.on_generate is not None:
            self.on_generate()
        return super().handle(method, path, body, headers)

    def generate_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for path, body in self.requests if path == GENERATE_PATH]


@pytest.fixture(scope="module")
def upstream(tiny: Callable[[str], Path]) -> Iterator[RecordingServer]:
    with RecordingServer(tiny("qwen2_vl"), served_model_name="tiny") as server:
        yield server


def jpeg_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def user(*images: bytes, say: str) -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": jpeg_url(d)}} for d in images),
                                        {"type": "text", "text": say}]}


def sent_images(body: dict[str, Any]) -> list[bytes | None]:
    """Each content part's image as the upstream got it: the decoded data URL (JPEG only), None by uuid."""
    out: list[bytes | None] = []
    for part in body["content_parts"]:
        url = part.get("url")
        if url is not None:
            assert url.startswith("data:image/jpeg;base64,"), url[:40]  # not a re-encoded PNG
        out.append(None if url is None else base64.b64decode(url.split(",", 1)[1]))
    return out


def call(front: FrontServer, messages: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    api = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0,
                        default_headers={"X-Session-ID": "s"})
    answer = api.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=seed,  # type: ignore[arg-type]
                                         temperature=1.0)
    messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    info = dict(answer.model_extra or {})
    return {"ids": list(answer.choices[0].model_extra["token_ids"]),  # type: ignore[index]
            "logprobs": info["rollwire"]["completion_logprobs"], "bridged": info["rollwire"]["bridged"],
            "images": [r["id"] for r in info["rollwire"]["images"]]}


def store_of(front: FrontServer) -> FeatureStore:
    assert front.renderer is not None and front.renderer.feature_store is not None
    return front.renderer.feature_store


def test_content_parts_sends_the_clients_jpeg_and_samples_as_features_mode(
        upstream: RecordingServer, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    results = {}
    for wire in ("features", "content-parts"):
        with FrontServer(tiny("qwen2_vl"), upstream=upstream.url, wire=wire, run_dir=tmp_path / wire,
                         port=0) as front:
            upstream.requests.clear()
            messages = [user(JPEGS[0], JPEGS[1], say="Describe.")]
            first = call(front, messages, seed=1)
            messages.append(user(JPEGS[2], say="And this?"))
            second = call(front, messages, seed=2)
            assert second["bridged"] is True
            results[wire] = (first, second, upstream.generate_bodies(), [p for p, _ in upstream.requests])
    (f1, f2, _, _), (c1, c2, bodies, paths) = results["features"], results["content-parts"]
    assert [(r["ids"], r["logprobs"], r["images"]) for r in (c1, c2)] == [
        (r["ids"], r["logprobs"], r["images"]) for r in (f1, f2)]
    assert [sent_images(b) for b in bodies] == [JPEGS[:2], [None, None, JPEGS[2]]]  # the client's own bytes
    assert paths.count(RENDER_PATH) == 2  # the upstream was asked once per kind (JPEG, JPEG resized)
    reader = RunReader(tmp_path / "content-parts")
    assert [reader.original_path(i).read_bytes() for i in c2["images"]] == JPEGS  # archived as sent


def snapshot(store: FeatureStore, into: list[StoreStats]) -> Callable[[], None]:
    return lambda: into.append(store.stats())


def test_images_are_pinned_while_their_request_is_in_flight(
        upstream: RecordingServer, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    with FrontServer(tiny("qwen2_vl"), upstream=upstream.url, wire="content-parts", run_dir=tmp_path,
                     port=0) as front:
        store = store_of(front)
        store.max_bytes = 30_000  # one 56x56 image's features and JPEG fit, two do not
        in_flight: list[StoreStats] = []
        upstream.on_generate = snapshot(store, in_flight)
        upstream.requests.clear()
        try:
            messages = [user(JPEGS[0], JPEGS[2], say="Describe.")]
            call(front, messages, seed=1)
            after_first = store.stats()
            messages.append(user(JPEGS[1], say="And this?"))
            call(front, messages, seed=2)
            after_second = store.stats()
            assert front.engine is not None and isinstance(front.engine, VLLMEngine)
            front.engine.new_epoch("the test: the upstream holds no image")  # all go in full: reloaded
            messages.append({"role": "user", "content": "Once more."})
            third = call(front, messages, seed=3)
        finally:
            upstream.on_generate = None
    pinned = [(s.pinned, s.leases, s.bytes > s.max_bytes) for s in in_flight]
    assert pinned == [(2, 1, True), (1, 1, False), (0, 1, False)]  # only the images the call rendered
    for after in (after_first, after_second, store.stats()):
        assert (after.pinned, after.leases) == (0, 0) and after.bytes <= after.max_bytes
    assert (after_first.misses, after_second.misses) == (2, 3)  # each image processed once
    final = store.stats()
    assert final.reloaded >= 2 and final.misses == 3 + final.reloaded  # evicted: recomputed from the archive
    bodies = upstream.generate_bodies()
    assert [sent_images(b) for b in bodies] == [[JPEGS[0], JPEGS[2]], [None, None, JPEGS[1]],
                                                [JPEGS[0], JPEGS[2], JPEGS[1]]]
    assert len(third["images"]) == 3


def test_a_corrupt_image_is_a_400_and_the_session_goes_on(
        upstream: RecordingServer, tiny: Callable[[str], Path], tmp_path: Path) -> None:
    with FrontServer(tiny("qwen2_vl"), upstream=upstream.url, wire="content-parts", run_dir=tmp_path,
                     port=0) as front:
        messages = [user(JPEGS[0], say="Describe.")]
        call(front, messages, seed=1)
        upstream.requests.clear()
        bad = [*messages, user(JPEGS[2][: len(JPEGS[2]) // 2], say="And this?")]  # a truncated JPEG
        with pytest.raises(openai.BadRequestError) as caught:
            call(front, bad, seed=2)
        message = caught.value.body["message"]  # type: ignore[index]
        assert message.startswith("data URL: cannot decode image") and caught.value.status_code == 400
        assert upstream.generate_bodies() == []  # nothing was sent
        stats = store_of(front).stats()
        assert (stats.pinned, stats.leases) == (0, 0)
        messages.append(user(JPEGS[2], say="And this?"))
        assert call(front, messages, seed=3)["bridged"] is True
    (trajectory,) = RunReader(tmp_path).trajectories()
    assert len(trajectory.steps) == 2


def test_the_cli_front_refuses_an_unknown_wire(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rollwire.cli import app

    result = CliRunner().invoke(app, ["serve", "--upstream", "embedded", "--run-dir", str(tmp_path),
                                      "--wire", "pixels"])
    assert result.exit_code != 0 and "choose features, content-parts or auto" in result.output
