"""The vLLM client: rollwire's token ids + images to `POST /inference/v1/generate`.

Before a request leaves: placeholders are valid (DESIGN invariant 3; a too long one kills a vLLM 0.32 server,
a wrong one silently changes the output), the prompt fits `max_model_len`, and images go in a form the server
reads exactly as rollwire does: `features` (uint8 patches in the format the server expects, pixel_format.py)
or `content_parts` (the original where the server was found to process it as rollwire does, originals.py, else
a PNG; the server's expansion checked against rollwire's render, content_parts.py); `auto` takes features where
the server can render a probe, content_parts where it cannot (the Rust frontend). The body: vllm_wire.py.

Images the server holds go by id only; which ones it holds (per server epoch) and the deduplication of new
images in flight are held.py's. A miss (eviction, restart, a /pause) is a bare 500 in features mode, a 400
naming the image in content_parts mode; either way the request's images are re-sent in full once before the
retry policy (retry.py) applies. hints.py reads refusals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import msgspec

from rollwire.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineTimeoutError,
    InvalidRequestError,
    PixelFormatError,
    ServerError,
    UnsupportedServerError,
    WireError,
)
from rollwire.features import FeatureStore
from rollwire.render.types import Renderer

from . import content_parts as cp
from .checks import check_request
from .held import DEFAULT_SERVER_CACHE_BYTES, HeldImages, data_parallel_engines, held_sizes, weight_versions
from .hints import RUST_FRONTEND, give_up_error, is_content_cache_miss, is_engine_dead, server_hint
from .http import ServerConnection
from .originals import ServerOriginals
from .pixel_format import settle_pixel_format
from .retry import RetryPolicy
from .types import GenerateRequest, GenerateResult, Timings
from .vllm_wire import GenerateResponse, WireMode, completions, parse_choices, parse_logprobs, wire_mode
from .wire import GENERATE_PATH, PixelFormat, generate_body, image_features


@dataclass
class VLLMStats:
    requests: int = 0
    bytes_sent: int = 0
    image_bytes_sent: int = 0
    images_sent: int = 0  # image occurrences sent with their pixels
    images_by_id: int = 0  # image occurrences sent as id only
    cache_misses: int = 0  # id-only requests the server could not serve (re-sent in full)
    retries: int = 0


class VLLMEngine:
    """An `Engine` over a vLLM (or `rollwire serve`) server's token-in/token-out endpoint."""

    def __init__(self, base_url: str, *, feature_store: FeatureStore | None, image_pad_id: int | None = None,
                 merge_size: int = 2, model: str | None = None, wire: WireMode | str = "features",
                 pixel_format: PixelFormat | Literal["auto"] = "auto", verify_pixel_format: bool = True,
                 images_by_id: bool | Literal["auto"] = "auto", stop_token_ids: Sequence[int] = (),
                 banned_token_ids: Sequence[int] = (), max_in_flight: int = 32, timeout: float = 600.0,
                 connect_timeout: float = 10.0, retry: RetryPolicy | None = None,
                 server_cache_bytes: int = DEFAULT_SERVER_CACHE_BYTES,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.store, self.image_pad_id, self.merge_size, self.model = feature_store, image_pad_id, merge_size, model
        self.wire: WireMode = wire_mode(wire)
        self._auto = self.wire == "auto"
        self.pixel_format: PixelFormat | None = None if pixel_format == "auto" else pixel_format
        self.verify_pixel_format, self.images_by_id = verify_pixel_format, images_by_id
        self.stop_token_ids, self.banned_token_ids = tuple(stop_token_ids), tuple(banned_token_ids)
        self.timeout, self.retry = timeout, retry or RetryPolicy()
        self.max_model_len: int | None = None
        self.stats = VLLMStats()
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._ready_lock, self._ready, self._closed = asyncio.Lock(), False, False
        self._features_checked = False  # one features request has been checked for being honoured
        # Images the server holds, per epoch ("auto": by id unless the server has no image cache).
        self.held = HeldImages(enabled=images_by_id is not False, max_bytes=server_cache_bytes)
        self._http = ServerConnection(self.base_url, retry=self.retry, timeout=timeout,
                                      connect_timeout=connect_timeout, max_in_flight=max_in_flight, transport=transport,
                                      on_retry=self._count_retry)
        self.originals = ServerOriginals(self._http.post_json, base_url=self.base_url, held=self.held)
        if self.wire == "content_parts" and feature_store is not None:
            self._use_content_parts(feature_store)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    @classmethod
    def for_renderer(cls, base_url: str, renderer: Renderer, **kwargs: Any) -> VLLMEngine:
        """An engine that sends the renderer's stop ids and bans its vision ids in sampling."""
        kwargs.setdefault("stop_token_ids", renderer.stop_token_ids)
        kwargs.setdefault("banned_token_ids", renderer.vision_token_ids)
        return cls(base_url, feature_store=renderer.feature_store, image_pad_id=renderer.image_pad_id,
                   merge_size=renderer.merge_size, **kwargs)

    async def close(self) -> None:
        self._closed = True
        await self._http.close()

    async def __aenter__(self) -> VLLMEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Read the served model and max_model_len, and settle the wire mode and pixel format (once)."""
        async with self._ready_lock:
            if self._ready:
                return
            models = await self._http.get_json("/v1/models")
            try:
                entry = models["data"][0] if self.model is None else next(
                    m for m in models["data"] if m.get("id") == self.model)
            except (KeyError, IndexError, TypeError, StopIteration, AttributeError):
                raise ServerError(f"/v1/models does not list {self.model or 'a model'}: {models!r:.200}") from None
            self.model = str(entry["id"])
            self.max_model_len = limit if isinstance(limit := entry.get("max_model_len"), int) else None
            if self.store is not None:
                await self._settle_wire(self.store)
            if self.images_by_id == "auto" and self.held.enabled:
                await self._check_image_cache()
            self._ready = True

    async def _check_image_cache(self) -> None:
        """Id-only sending needs vLLM's image cache, absent with internal-LB data parallelism (/metrics: engines)."""
        metrics = await self._http.text("/metrics")
        engines = data_parallel_engines(metrics) if metrics is not None else 1
        if engines > 1:
            self.held.disable(f"{self.base_url} serves {engines} data-parallel engines behind its own load "
                              "balancer: vLLM keeps no image cache there, every image goes with its pixels")

    def new_epoch(self, reason: str) -> None:
        """The server holds no image any more (paused for a weight update, slept, restarted): images go in full."""
        self.held.new_epoch(reason)

    def _use_content_parts(self, store: FeatureStore) -> None:
        """Send encoded images: the store keeps each one's original bytes from now on (originals.py)."""
        cp.check_processor(store.config)
        self.wire, store.keep_encoded = "content_parts", True

    async def _settle_wire(self, store: FeatureStore) -> None:
        if self.wire == "content_parts":
            return
        if self.pixel_format is not None and not self.verify_pixel_format:
            self.wire = "features"
            return
        try:
            self.pixel_format = await settle_pixel_format(self._http.post_json, store, model=self.model,
                                                          base_url=self.base_url, given=self.pixel_format)
            self.wire = "features"
        except PixelFormatError as exc:
            if self.wire != "auto" or exc.status != 404:
                raise
            self._use_content_parts(store)  # no render endpoint, so no features support either

    async def server_version(self) -> str | None:
        """The server's `/version` (vLLM has one), for a run manifest; None when it has none."""
        return await self._http.version()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise EngineClosedError(f"the client for {self.base_url} is closed")
        await self.connect()
        request = self._with_defaults(request)
        check_request(request, store=self.store, image_pad_id=self.image_pad_id, merge_size=self.merge_size,
                      max_model_len=self.max_model_len)
        try:
            async with asyncio.timeout(self.timeout), self._semaphore:
                try:
                    return await self._generate(request)
                except UnsupportedServerError as exc:  # auto: a server that refuses or ignores `features`
                    if not (self._auto and self.wire == "features" and RUST_FRONTEND in str(exc) and self.store):
                        raise
                    self._use_content_parts(self.store)
                    return await self._generate(request)
        except TimeoutError:
            raise EngineTimeoutError(f"no answer from {self.base_url} within {self.timeout} s (a server paused with "
                                     "/pause?mode=keep holds requests until /resume)") from None

    def _with_defaults(self, request: GenerateRequest) -> GenerateRequest:
        s = request.sampling
        stop = tuple(dict.fromkeys((*s.stop_token_ids, *self.stop_token_ids)))
        banned = tuple(dict.fromkeys((*s.banned_token_ids, *self.banned_token_ids)))
        if stop == s.stop_token_ids and banned == s.banned_token_ids:
            return request
        sampling = msgspec.structs.replace(s, stop_token_ids=stop, banned_token_ids=banned)
        return msgspec.structs.replace(request, sampling=sampling)

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        plan = await self.held.plan(ref.id for ref in request.images)
        ok, versions, aborted, by_id = False, list[str](), False, set(plan.by_id)
        try:
            if self.wire == "content_parts" and self.store is not None:  # may the new ones go as they are?
                await self.originals.check([r for r in request.images if r.id not in by_id], self.store, self.model)
            result, versions = await self._exchange(request, by_id)  # by_id: what the last attempt sent by id
            ok, aborted = True, any(c.finish_reason == "abort" for c in result.completions)
        finally:
            self.held.settle(plan, ok=ok, sizes=held_sizes(request.images, self.store, self.pixel_format),
                             weight_versions=versions, aborted=aborted,
                             carried={ref.id for ref in request.images} - by_id)
        return result

    async def _exchange(self, request: GenerateRequest, by_id: set[str]) -> tuple[GenerateResult, list[str]]:
        """Send (and re-send) until a parsed 200: the result and the weight versions it names. `by_id`
        is emptied in place when the images must go in full (a cache miss; the server unreachable, so
        perhaps restarted). Bytes count only for attempts the server answered."""
        start = time.perf_counter()
        sent = image_bytes = misses = attempt = 0
        first_failure: float | None = None
        headers = {"X-Session-ID": request.session_id} if request.session_id else None
        while True:
            body, nbytes, check = (await asyncio.to_thread(self._body, request, by_id) if request.images
                                   else self._body(request, by_id))  # image encoding runs off the event loop
            status, response, error = await self._http.generate(body, headers)
            if status is None:
                self.held.unreachable()
                by_id.clear()  # it may have restarted without its cache: the retry carries every image
            else:
                sent, image_bytes = sent + len(body), image_bytes + nbytes
                self.stats.bytes_sent += len(body)
                self.stats.image_bytes_sent += nbytes
            if response is not None:
                try:
                    self._check_answer(response, request, check)
                    done = completions(response, n=request.sampling.n, logprobs=request.sampling.logprobs)
                    break
                except WireError as exc:  # a malformed 200 (a proxy, a dying server): try again
                    error = f"answered 200 with a malformed body: {exc}"
            if by_id and ((status == 500 and self.wire == "features") or is_content_cache_miss(status, error)):
                # The server no longer holds an image sent by id: forget what we assumed, re-send.
                self.stats.cache_misses += 1
                misses += 1
                self.held.evicted(by_id)
                by_id.clear()
                continue
            if is_engine_dead(status, error):
                raise EngineDeadError(f"{self.base_url}'s engine core died ({status}: {error}); it does not recover "
                                      "by itself: restart the server (its log has the cause)", status=status)
            if status is not None and 400 <= status < 500 and status != 429:
                kind = UnsupportedServerError if server_hint(status, error) else InvalidRequestError
                raise kind(f"{self.base_url} refused the request ({status}): {error}{server_hint(status, error)}")
            first_failure = first_failure if first_failure is not None else time.monotonic()
            wait = self.retry.next_delay(attempt, first_failure)
            if wait is None:
                raise give_up_error(self.base_url, status, error, attempts=attempt + 1,
                                    elapsed=time.monotonic() - first_failure, deadline_s=self.retry.deadline_s)
            await asyncio.sleep(wait)
            attempt += 1
            self.stats.retries += 1
        self.stats.requests += 1
        held = sum(1 for ref in request.images if ref.id in by_id)
        self.stats.images_by_id += held
        self.stats.images_sent += len(request.images) - held
        return GenerateResult(completions=done, timings=Timings(total_s=time.perf_counter() - start),
                              bytes_sent=sent, image_bytes_sent=image_bytes,
                              cache_misses=misses), weight_versions(response)

    def _body(self, request: GenerateRequest, by_id: set[str]) -> tuple[bytes, int, bool]:
        """(body, image bytes in it, whether to check the server's returned prompt against ours); runs in a thread."""
        assert self.model is not None
        if not request.images:
            return generate_body(request, model=self.model, features=None), 0, False
        assert self.store is not None and self.image_pad_id is not None
        if self.wire == "content_parts":
            return (*cp.request_body(request, self.store, model=self.model, pad_id=self.image_pad_id, by_id_only=by_id,
                                     accepts=self.originals.accepts), True)
        assert self.pixel_format is not None
        features, nbytes = image_features(request.images, self.store, pixel_format=self.pixel_format,
                                          by_id_only=by_id)
        check = not self._features_checked  # once per engine: did the server honour `features`?
        return generate_body(request, model=self.model, features=features,
                             return_token_ids=check or None), nbytes, check

    def _check_answer(self, response: GenerateResponse, request: GenerateRequest, check: bool) -> None:
        """The server's expansion of the images equals rollwire's render (features: once per engine)."""
        if check:
            cp.check_expansion(response, request.prompt_token_ids, request.images, base_url=self.base_url,
                               required=self.wire == "content_parts")
            self._features_checked = self.wire == "features"

    def forget_server_cache(self) -> None:
        """Assume the server holds no image (e.g. after it was restarted): `new_epoch`."""
        self.new_epoch("forget_server_cache() was called")


__all__ = ["GENERATE_PATH", "RetryPolicy", "VLLMEngine", "VLLMStats", "WireMode", "parse_choices", "parse_logprobs",
           "server_hint"]
