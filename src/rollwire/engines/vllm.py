"""The vLLM client: rollwire's token ids + image features to `POST /inference/v1/generate`.

What it guarantees before a request leaves: placeholders are valid (DESIGN invariant 3; a too
long placeholder kills a vLLM 0.32 server, a wrong one silently changes the output), the prompt
fits `max_model_len`, and pixels are in the format the server was found to expect (a float
tensor where uint8 is expected is accepted with HTTP 200 and gives different tokens).

Images the server already holds go by id only (a null `kwargs_data` item). vLLM answers a
cache miss (eviction, restart) with a bare HTTP 500 that does not name the hash, so a 500 on
a request that relied on the server's cache is answered by re-sending every image in full once,
before the ordinary retry policy applies.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import msgspec
import numpy as np
from PIL import Image

from rollwire.errors import (
    EngineClosedError,
    EngineTimeoutError,
    InvalidRequestError,
    MalformedResponseError,
    PixelFormatError,
    PromptTooLongError,
    ServerError,
    WireError,
)
from rollwire.features import FeatureStore, compute_features
from rollwire.render.placeholders import validate_placeholders
from rollwire.render.types import Renderer

from .pausing import policy_version_of
from .types import Completion, FinishReason, GenerateRequest, GenerateResult, Timings
from .wire import GENERATE_PATH, RENDER_PATH, PixelFormat, decode_image_kwargs, features_payload, generate_body

OLD_LOGPROB_CLAMP = -9999.0  # older servers clamp -inf to this


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, for refused connections, 429, 5xx (vLLM answers 503
    while paused for a weight update) and a truncated or malformed 200 body.

    Retries go on until `deadline_s` seconds have passed since the first failure (a vLLM restart
    takes about 40 s), or `attempts` tries when that is set.
    """

    deadline_s: float = 60.0
    attempts: int | None = None
    base_s: float = 0.25
    cap_s: float = 4.0
    jitter: float = 0.5  # the delay is multiplied by a factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int) -> float:
        raw = min(self.cap_s, self.base_s * 2**attempt)
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)

    def next_delay(self, attempt: int, first_failure: float) -> float | None:
        """The wait before try `attempt + 2`, or None when the policy gives up (never past the deadline)."""
        if self.attempts is not None and attempt + 1 >= self.attempts:
            return None
        remaining = self.deadline_s - (time.monotonic() - first_failure)
        if remaining <= 0:
            return None
        return min(self.delay(attempt), remaining)


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

    def __init__(
        self,
        base_url: str,
        *,
        feature_store: FeatureStore | None,
        image_pad_id: int | None = None,
        merge_size: int = 2,
        model: str | None = None,
        pixel_format: PixelFormat | Literal["auto"] = "auto",
        verify_pixel_format: bool = True,
        images_by_id: bool = True,
        stop_token_ids: Sequence[int] = (),
        banned_token_ids: Sequence[int] = (),
        max_in_flight: int = 32,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        known_images: int = 65536,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.store = feature_store
        self.image_pad_id = image_pad_id
        self.merge_size = merge_size
        self.model = model
        self.pixel_format: PixelFormat | None = None if pixel_format == "auto" else pixel_format
        self.verify_pixel_format = verify_pixel_format
        self.images_by_id = images_by_id
        self.stop_token_ids = tuple(stop_token_ids)
        self.banned_token_ids = tuple(banned_token_ids)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_model_len: int | None = None
        self.stats = VLLMStats()
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._ready_lock = asyncio.Lock()
        self._ready = False
        self._server_has: OrderedDict[str, None] = OrderedDict()  # ids the server was sent, LRU
        self._known_images = known_images
        self._closed = False
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            transport=transport,
        )

    @classmethod
    def for_renderer(cls, base_url: str, renderer: Renderer, **kwargs: Any) -> VLLMEngine:
        """An engine that sends the renderer's stop ids and bans its vision ids in sampling."""
        kwargs.setdefault("stop_token_ids", renderer.stop_token_ids)
        kwargs.setdefault("banned_token_ids", renderer.vision_token_ids)
        return cls(
            base_url,
            feature_store=renderer.feature_store,
            image_pad_id=renderer.image_pad_id,
            merge_size=renderer.merge_size,
            **kwargs,
        )

    async def close(self) -> None:
        self._closed = True
        await self._client.aclose()

    async def __aenter__(self) -> VLLMEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- setup, once per server -----------------------------------------------------------

    async def connect(self) -> None:
        """Read the served model and max_model_len, and detect the pixel format (once)."""
        async with self._ready_lock:
            if self._ready:
                return
            models = await self._get_json("/v1/models")
            try:
                entry = models["data"][0] if self.model is None else next(
                    m for m in models["data"] if m.get("id") == self.model)
            except (KeyError, IndexError, TypeError, StopIteration):
                raise ServerError(f"/v1/models does not list {self.model or 'a model'}: {models!r:.200}") from None
            self.model = str(entry["id"])
            limit = entry.get("max_model_len")
            self.max_model_len = int(limit) if isinstance(limit, int) else None
            if self.store is not None and (self.pixel_format is None or self.verify_pixel_format):
                await self._settle_pixel_format()
            self._ready = True

    async def server_version(self) -> str | None:
        """The server's `/version` (vLLM has one), for a run manifest; None when it has none."""
        try:
            response = await self._client.get("/version")
            answer = msgspec.json.decode(response.content) if response.status_code == 200 else None
        except (httpx.RequestError, msgspec.DecodeError):
            return None
        version = answer.get("version") if isinstance(answer, dict) else None
        return str(version)[:100] if version is not None else None

    async def _settle_pixel_format(self) -> None:
        """Detect the server's pixel format; an explicit one must agree with it when it can be read."""
        try:
            detected = await self._detect_pixel_format()
        except PixelFormatError as exc:
            if self.pixel_format is None or exc.probe_answered:
                raise
            return  # no render endpoint to ask: the explicit format stands
        if self.pixel_format is not None and self.pixel_format != detected:
            raise PixelFormatError(f"pixel_format={self.pixel_format!r} was given, but {self.base_url} expects "
                                   f"{detected!r} (it would accept the request and compute something else)")
        self.pixel_format = detected

    async def _detect_pixel_format(self) -> PixelFormat:
        """Ask the server to render a probe image and read the dtype (and values) it wants.

        The probe needs no resize, so its pixels must equal rollwire's exactly (uint8) or to
        float tolerance (normalised floats); anything else is an error, not a guess.
        """
        assert self.store is not None
        config = self.store.config
        side = config.unresized_side()
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        buf = io.BytesIO()
        probe.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "probe"}]}]
        try:
            answer = await self._post_json(RENDER_PATH, {"model": self.model, "messages": messages})
        except ServerError as exc:  # no render endpoint to ask (or it is down)
            raise PixelFormatError(
                f"cannot ask {self.base_url} which pixel format it expects ({exc}){server_hint(exc.status)}; "
                "pass pixel_format='uint8' (vLLM >= 0.2x default) or 'float32' (--no-mm-device-do-normalize)",
                probe_answered=not (exc.status is None or 400 <= exc.status < 500)) from None
        try:
            pixels, grid, dtype_name = decode_image_kwargs(answer["features"]["kwargs_data"]["image"][0], config)
        except (KeyError, IndexError, TypeError, WireError) as exc:
            raise PixelFormatError(f"{self.base_url}'s render answer carries no readable pixels ({exc})") from None
        ours = compute_features(probe, config)
        if grid != ours.grid_thw:
            raise PixelFormatError(f"server grid {grid} != rollwire grid {ours.grid_thw} for the probe image: "
                                   "the server's processor settings differ from the model directory's")
        if dtype_name == "uint8":
            if not np.array_equal(pixels, ours.pixel_values):
                raise PixelFormatError("server uint8 pixels differ from rollwire's for the probe image")
            return "uint8"
        for name in ("float32", "bfloat16"):
            if dtype_name != name:
                continue
            expected = ours.normalized(config, np.float32)
            tol = 1e-2 if name == "bfloat16" else 1e-5
            if not np.allclose(pixels.astype(np.float32), expected, atol=tol):
                raise PixelFormatError(f"server {dtype_name} pixels are not rollwire's normalised pixels")
            return name
        raise PixelFormatError(f"server expects pixel dtype {dtype_name!r}, which rollwire does not send")

    # --- generate -------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise EngineClosedError(f"the client for {self.base_url} is closed")
        await self.connect()
        request = self._with_defaults(request)
        self._check(request)
        try:
            async with asyncio.timeout(self.timeout), self._semaphore:
                return await self._generate(request)
        except TimeoutError:
            raise EngineTimeoutError(f"no answer from {self.base_url} within {self.timeout} s") from None

    def _with_defaults(self, request: GenerateRequest) -> GenerateRequest:
        s = request.sampling
        stop = tuple(dict.fromkeys((*s.stop_token_ids, *self.stop_token_ids)))
        banned = tuple(dict.fromkeys((*s.banned_token_ids, *self.banned_token_ids)))
        if stop == s.stop_token_ids and banned == s.banned_token_ids:
            return request
        sampling = msgspec.structs.replace(s, stop_token_ids=stop, banned_token_ids=banned)
        return msgspec.structs.replace(request, sampling=sampling)

    def _check(self, request: GenerateRequest) -> None:
        if request.sampling.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1")
        if request.images:
            if self.store is None or self.image_pad_id is None:
                raise InvalidRequestError("this engine was built without a feature store / image pad id")
            validate_placeholders(request.prompt_token_ids, request.images, pad_id=self.image_pad_id,
                                  merge_size=self.merge_size, known_ids=self.store)
        elif self.image_pad_id is not None and self.image_pad_id in request.prompt_token_ids:
            validate_placeholders(request.prompt_token_ids, (), pad_id=self.image_pad_id, merge_size=self.merge_size)
        n = len(request.prompt_token_ids)
        if self.max_model_len is not None and n + request.sampling.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt of {n} tokens + max_tokens {request.sampling.max_tokens} exceeds the server's "
                f"max_model_len {self.max_model_len}")

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        assert self.model is not None
        start = time.perf_counter()
        by_id = self._held_ids(request)
        sent = image_bytes = misses = 0
        attempt = 0
        first_failure: float | None = None
        while True:
            features = None
            nbytes = 0
            if request.images:
                assert self.store is not None and self.pixel_format is not None
                features, nbytes = features_payload(request.images, self.store, pixel_format=self.pixel_format,
                                                    by_id_only=by_id)
            body = generate_body(request, model=self.model, features=features)
            sent += len(body)
            image_bytes += nbytes
            self.stats.bytes_sent += len(body)
            self.stats.image_bytes_sent += nbytes
            status, payload, error = await self._send(body, request.session_id)
            if status == 200 and payload is not None:
                try:
                    completions = parse_choices(payload, n=request.sampling.n, logprobs=request.sampling.logprobs)
                    break
                except WireError as exc:  # a malformed 200 (a proxy, a dying server): try again
                    error = f"answered 200 with a malformed body: {exc}"
            if status == 500 and by_id:
                # vLLM's answer to an id-only image it no longer holds: forget what we assumed, re-send.
                self.stats.cache_misses += 1
                misses += 1
                for image_id in by_id:
                    self._server_has.pop(image_id, None)
                by_id = set()
                continue
            if status is not None and 400 <= status < 500 and status != 429:
                raise InvalidRequestError(f"{self.base_url} refused the request ({status}): {error}"
                                          f"{server_hint(status)}")
            first_failure = first_failure if first_failure is not None else time.monotonic()
            wait = self.retry.next_delay(attempt, first_failure)
            if wait is None:
                raise ServerError(f"{self.base_url} failed after {attempt + 1} attempts in "
                                  f"{time.monotonic() - first_failure:.1f} s: {error}", status=status)
            await asyncio.sleep(wait)
            attempt += 1
            self.stats.retries += 1
        self.stats.requests += 1
        occurrences = len(request.images)
        held = sum(1 for ref in request.images if ref.id in by_id)
        self.stats.images_by_id += held
        self.stats.images_sent += occurrences - held
        for ref in request.images:
            self._remember(ref.id)
        return GenerateResult(completions=completions, timings=Timings(total_s=time.perf_counter() - start),
                              bytes_sent=sent, image_bytes_sent=image_bytes,
                              cache_misses=misses)

    def _held_ids(self, request: GenerateRequest) -> set[str]:
        if not self.images_by_id:
            return set()
        return {ref.id for ref in request.images if ref.id in self._server_has}

    def _remember(self, image_id: str) -> None:
        self._server_has[image_id] = None
        self._server_has.move_to_end(image_id)
        while len(self._server_has) > self._known_images:
            self._server_has.popitem(last=False)

    def forget_server_cache(self) -> None:
        """Assume the server holds no image (e.g. after it was restarted)."""
        self._server_has.clear()

    async def _send(self, body: bytes, session_id: str | None = None) -> tuple[int | None, Any, str]:
        """(status, JSON body, error text); status None for a connection-level failure. The session id
        goes as `X-Session-ID`, which routers with session affinity (vllm-router) pin on."""
        headers = {"content-type": "application/json"}
        if session_id is not None:
            headers["x-session-id"] = session_id
        try:
            response = await self._client.post(GENERATE_PATH, content=body, headers=headers)
        except httpx.RequestError as exc:
            return None, None, f"{type(exc).__name__}: {exc}"
        try:
            payload = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError):
            payload = None
        if response.status_code == 200 and payload is None:
            return 200, None, "answered 200 with a body that is not JSON (truncated?)"
        error = _error_text(payload) if response.status_code != 200 else ""
        return response.status_code, payload, error or response.text[:200]

    async def _get_json(self, path: str) -> Any:
        return self._json(await self._request("GET", path, None), path)

    async def _post_json(self, path: str, body: Any) -> Any:
        return self._json(await self._request("POST", path, msgspec.json.encode(body)), path)

    async def _request(self, method: str, path: str, content: bytes | None) -> httpx.Response:
        """A setup request, retried like generate on refused connections, 429 and 5xx."""
        attempt = 0
        first_failure: float | None = None
        while True:
            try:
                response = await self._client.request(method, path, content=content,
                                                      headers={"content-type": "application/json"})
                if response.status_code < 500 and response.status_code != 429:
                    return response
                error = f"answered {response.status_code}: {response.text[:200]}"
                status: int | None = response.status_code
            except httpx.RequestError as exc:
                error, status = f"cannot reach {self.base_url}{path}: {type(exc).__name__}: {exc}", None
            first_failure = first_failure if first_failure is not None else time.monotonic()
            wait = self.retry.next_delay(attempt, first_failure)
            if wait is None:
                raise ServerError(f"{self.base_url}{path}: {error} (gave up after {attempt + 1} attempts in "
                                  f"{time.monotonic() - first_failure:.1f} s)", status=status)
            await asyncio.sleep(wait)
            attempt += 1
            self.stats.retries += 1

    def _json(self, response: httpx.Response, path: str) -> Any:
        if response.status_code != 200:
            raise ServerError(f"{self.base_url}{path} answered {response.status_code}: {response.text[:200]}",
                              status=response.status_code)
        try:
            return msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError):
            raise ServerError(f"{self.base_url}{path} answered a body that is not JSON") from None


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload))
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return ""


_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


_MAX_TOKEN_ID = 2**31 - 1  # no vocabulary comes near; whether an id is in *this* vocabulary is checked later


def _is_token_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_TOKEN_ID


def _entry_token_id(entry: dict[str, Any], k: int) -> int:
    """The token id a logprob entry names: `token_id` (an int), or the old `token: "token_id:123"`."""
    token_id = entry.get("token_id")
    if token_id is None:
        token = entry.get("token")
        if not (isinstance(token, str) and token.startswith("token_id:")):
            raise MalformedResponseError(f"logprob entry {k} names no token id: {entry!r:.100}")
        token_id = token.removeprefix("token_id:")
        if token_id.isascii() and token_id.isdigit() and len(token_id) <= 10:
            token_id = int(token_id)
    if not _is_token_id(token_id):
        raise MalformedResponseError(f"logprob entry {k} has token id {token_id!r:.40}")
    return int(token_id)


def parse_logprobs(entries: Any, token_ids: Sequence[int]) -> list[float]:
    """One logprob per completion token, from either logprob shape vLLM has used.

    New: `{"token_id": 123, "logprob": x}`; old: `{"token": "token_id:123", "logprob": x}` with
    -inf clamped to -9999.0 (restored to -inf here). The ids must match the completion's; any other
    shape or type is a `MalformedResponseError`.
    """
    if not isinstance(entries, list) or len(entries) != len(token_ids):
        raise MalformedResponseError(f"{len(entries) if isinstance(entries, list) else 'no'} logprob entries for "
                                     f"{len(token_ids)} completion tokens")
    out: list[float] = []
    for k, (entry, expected) in enumerate(zip(entries, token_ids, strict=True)):
        value = entry.get("logprob") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedResponseError(f"logprob entry {k} is malformed: {entry!r:.100}")
        token_id = _entry_token_id(entry, k)
        if token_id != expected:
            raise MalformedResponseError(f"logprob entry {k} is for token {token_id}, the completion has {expected}")
        out.append(-math.inf if value <= OLD_LOGPROB_CLAMP else float(value))
    return out


def _choice_index(choice: Any, k: int) -> int:
    if not isinstance(choice, dict):
        raise MalformedResponseError(f"generate response choice {k} is a {type(choice).__name__}, not an object")
    index = choice.get("index", 0)
    if type(index) is not int:
        raise MalformedResponseError(f"generate response choice {k} has index {index!r:.40}")
    return index


def parse_choices(payload: Any, *, n: int, logprobs: bool) -> list[Completion]:
    """`n` completions from a generate response; anything else is a `MalformedResponseError` (a
    `WireError` and a `ServerError`), never a guess: token ids are ints in [0, 2**31), finish and stop
    reasons strings (stop: or an int), logprobs null or `{"content": [...]}` of numbers."""
    raw = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(raw, list):
        raise MalformedResponseError(f"generate response has no choices: {payload!r:.200}")
    choices = [c for _, _, c in sorted((_choice_index(c, k), k, c) for k, c in enumerate(raw))]
    if len(choices) != n:
        raise MalformedResponseError(f"generate response has {len(choices)} choices for n={n}")
    out = []
    for choice in choices:
        where = f"choice {choice.get('index', 0)}"
        ids = choice.get("token_ids")
        if not isinstance(ids, list) or not all(_is_token_id(t) for t in ids):
            raise MalformedResponseError(f"{where} has no token_ids (a list of ints in [0, 2**31)): {ids!r:.100}")
        lp = choice.get("logprobs")
        if lp is not None and not isinstance(lp, dict):
            raise MalformedResponseError(f"{where} has logprobs that are not an object: {lp!r:.100}")
        if logprobs and lp is None:
            raise MalformedResponseError(f"{where} has no logprobs although they were requested")
        values = parse_logprobs(lp.get("content"), ids) if lp is not None else None
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise MalformedResponseError(f"{where} has finish_reason {finish!r:.100} (a string or null)")
        stop_reason = choice.get("stop_reason")
        if stop_reason is not None and type(stop_reason) not in (int, str):
            raise MalformedResponseError(f"{where} has stop_reason {stop_reason!r:.100} (an int, string or null)")
        out.append(Completion(token_ids=ids, logprobs=values, finish_reason=_FINISH.get(finish, "error"),
                              stop_reason=stop_reason,
                              policy_version=policy_version_of(choice.get("weight_versions"), where)))
    return out


__all__ = [
    "GENERATE_PATH",
    "RetryPolicy",
    "VLLMEngine",
    "VLLMStats",
    "parse_choices",
    "parse_logprobs",
]


def server_hint(status: int | None) -> str:
    """What to change on the server for the statuses a misconfigured vLLM answers."""
    if status == 403:
        return (" - vLLM answers 403 on the token-in/token-out endpoints unless it is started with "
                "--enable-scale-out")
    if status == 404:
        return (" - the server has no such endpoint: rollwire needs vLLM >= 0.30 (POST /inference/v1/generate, "
                "not served by the opt-in Rust frontend: unset VLLM_USE_RUST_FRONTEND)")
    return ""
