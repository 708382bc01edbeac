"""`rollwire serve`: the local engine over HTTP, speaking vLLM 0.32's token-in/token-out wire format.

Endpoints, as a vLLM client sees them: `GET /health`, `GET /v1/models`,
`POST /inference/v1/generate` (token ids + `features` with msgpack `kwargs_data`) and
`POST /v1/chat/completions/render`. Received images are kept by the client's `mm_hash` in an
in-memory feature store, so a later request may send a null `kwargs_data` item ("use your
copy"); a miss answers vLLM's opaque HTTP 500, as does a known hash re-sent with other pixels.
Stricter than vLLM on purpose: pixels must be uint8 patch rows, and placeholders are checked
against the token stream before anything runs (vLLM accepts a wrong count with HTTP 200).

Standard library HTTP (`ThreadingHTTPServer`, one thread per connection); the engine runs on
one asyncio loop in a background thread, so concurrent requests batch in the engine. A client
cannot hold a thread forever: a connection that idles, or takes longer than
`connection_timeout` to send one request (a slowloris trickle), is closed, and at most
`max_connections` are open at once.
Fault injection (`Faults`) exists for tests and is off by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from rollwire.engines.content_parts import expand
from rollwire.engines.httpd import JSONHTTPServer, ServedAddress, wait_for_signal
from rollwire.engines.local import LocalEngine
from rollwire.engines.pausing import GenerationPause
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, SamplingParams
from rollwire.engines.vllm_wire import (
    Choice,
    ContentPart,
    Features,
    GenerateBody,
    GenerateResponse,
    LogprobEntry,
    Logprobs,
    Range,
    Sampling,
)
from rollwire.engines.wire import BAN_BIAS, GENERATE_PATH, RENDER_PATH, WireError, decode_image_kwargs, features_payload
from rollwire.errors import (
    EngineError,
    EngineUnavailableError,
    FeatureError,
    ImageError,
    InvalidRequestError,
    MessageError,
    PlaceholderError,
    RenderError,
    RollwireError,
    UnknownImageError,
)
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.messages import parse_messages
from rollwire.render import ImageRef, ModelDir, Renderer, create_renderer, family_of, vision_config

__all__ = ["EngineServer", "Faults", "ServerStats", "serve_forever"]

logger = logging.getLogger("rollwire.server")

DEFAULT_MAX_MODEL_LEN_CAP = 32768
DEFAULT_CONNECTION_TIMEOUT = 30.0  # seconds a connection may idle, or take to send one request
DEFAULT_MAX_CONNECTIONS = 256  # open connections (one thread each); more are answered 503 and closed
MAX_N = 256  # completions per request; a larger n would be held in memory at once
# What vLLM answers for an exception inside the engine (e.g. a cached image it does not hold).
INTERNAL_ERROR_BODY = {"error": {"message": "Internal server error", "type": "InternalServerError",
                                 "param": None, "code": 500}}


@dataclass
class Faults:
    """Injected failures for tests (all off by default); change the fields at any time.

    `delay_s` delays every generate request; the next `fail_next` generate requests are answered
    with `status` (503 by default); the next `drop_next` have their connection closed unanswered.
    """

    delay_s: float = 0.0
    fail_next: int = 0
    status: int = 503
    drop_next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def take(self) -> tuple[float, str | None]:
        """This request's delay and its fault ("drop", "fail" or None); consumes one count."""
        with self._lock:
            if self.drop_next > 0:
                self.drop_next -= 1
                return self.delay_s, "drop"
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.delay_s, "fail"
            return self.delay_s, None


@dataclass(frozen=True)
class ServerStats:
    requests: int  # generate requests received (faulted and failed ones included)
    ok: int  # generate requests answered 200
    images_received: int  # kwargs_data items that carried pixel data
    cache_hits: int  # null kwargs_data items served from the image cache by id
    cache_misses: int  # null kwargs_data items whose hash the server did not hold (HTTP 500)


class _HTTPFailure(Exception):
    """Ends a request with `status` and a JSON `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _bad_request(message: str) -> _HTTPFailure:
    return _HTTPFailure(400, {"error": {"message": message, "type": "BadRequestError", "param": None,
                                        "code": 400}})


def _internal_error(log_reason: str) -> _HTTPFailure:
    """vLLM's opaque 500: the reason goes to the log only, as vLLM does."""
    logger.warning("answering 500: %s", log_reason)
    return _HTTPFailure(500, INTERNAL_ERROR_BODY)


# --- the request body: the client's structs (vllm_wire), plus the render endpoint's ---------------


class _RenderBody(msgspec.Struct):
    messages: list[Any]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


_UNSUPPORTED_DEFAULTS = {
    "min_tokens": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repetition_penalty": 1.0, "ignore_eos": False, "prompt_logprobs": None,
}


def _sampling_params(sp: Sampling, *, prompt_len: int, max_model_len: int) -> SamplingParams:
    """`SamplingParams` from vLLM `sampling_params`; raises `_HTTPFailure` 400."""
    for name, neutral in _UNSUPPORTED_DEFAULTS.items():
        if getattr(sp, name) != neutral:
            raise _bad_request(f"sampling_params.{name}={getattr(sp, name)!r} is not supported by rollwire serve")
    if sp.stop:
        raise _bad_request("sampling_params.stop (stop strings) is not supported: this server does not "
                           "detokenize; use stop_token_ids")
    if sp.logprobs is not None and sp.logprobs != 0:
        raise _bad_request(f"sampling_params.logprobs={sp.logprobs} is not supported: only 0 (the sampled "
                           "token's logprob) is")
    if not 1 <= sp.n <= MAX_N:
        raise _bad_request(f"sampling_params.n={sp.n} is out of range: rollwire serve samples 1 to {MAX_N} "
                           "completions per request")
    if any(t < 0 for t in sp.stop_token_ids or ()):
        raise _bad_request(f"sampling_params.stop_token_ids {sp.stop_token_ids!r:.100} holds a negative id")
    banned: list[int] = []
    for key, bias in (sp.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):  # int() would take " 1_0 " as 10
            raise _bad_request(f"logit_bias key {key!r:.40} is not a token id")
        token = int(key)
        if bias <= BAN_BIAS:
            banned.append(token)
        elif bias != 0:
            raise _bad_request(f"logit_bias {bias} for token {token}: only bans are supported "
                               f"(a bias <= {BAN_BIAS:g})")
    if prompt_len >= max_model_len:
        raise _bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your "
                           f"request has {prompt_len} input tokens. Please reduce the length of the input.")
    max_tokens = sp.max_tokens if sp.max_tokens is not None else max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise _bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                           f"{max_tokens} in the completion). Please reduce the length of the prompt or "
                           "max_tokens.")
    if sp.top_k < -1:
        raise _bad_request(f"top_k must be -1 (off), 0 (off) or positive, got {sp.top_k}")
    return SamplingParams(
        max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0),
        seed=sp.seed, stop_token_ids=tuple(sp.stop_token_ids or ()), banned_token_ids=tuple(banned),
        logprobs=sp.logprobs is not None, n=sp.n)


def _choice(index: int, completion: Completion) -> Choice:
    logprobs = None
    if completion.logprobs is not None:
        # rank is not known to the local engine (it keeps only the sampled token's logprob).
        logprobs = Logprobs(content=[LogprobEntry(token_id=t, logprob=lp)
                                     for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)])
    return Choice(index=index, finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                  token_ids=completion.token_ids, logprobs=logprobs)


# --- the server -----------------------------------------------------------------------------------


class EngineServer(ServedAddress):
    """A `LocalEngine` served over HTTP in vLLM 0.32's wire format (see the module docstring).

    `start()` loads the model and returns once the socket listens (port 0 picks a free one);
    `stop()` closes the engine and every open connection. Binds 127.0.0.1 unless told otherwise.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str | None = None,
        max_model_len: int | None = None,
        faults: Faults | None = None,
        max_batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        image_cache_bytes: int = 4 << 30,
        connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not connection_timeout > 0 or max_connections < 1:
            raise EngineUnavailableError(f"connection_timeout must be > 0 and max_connections >= 1, got "
                                         f"{connection_timeout} and {max_connections}")
        self.connection_timeout, self.max_connections = float(connection_timeout), int(max_connections)
        try:
            self.model = ModelDir.load(model_dir)
        except RollwireError as exc:
            raise EngineUnavailableError(str(exc)) from None
        self.model_dir = self.model.path
        self._image_cache_bytes = image_cache_bytes
        if max_model_len is not None and max_model_len < 1:
            raise EngineUnavailableError(f"max_model_len must be >= 1, got {max_model_len}")
        self.host = host
        self.served_model_name = served_model_name or str(model_dir)
        self.faults = faults if faults is not None else Faults()
        self._requested_port = port
        self._requested_max_len = max_model_len
        self._max_batch_size, self._device, self._dtype = max_batch_size, device, dtype
        family = family_of(self.model)
        self._vision_config = vision_config(self.model, family.vision) if family and family.vision else None
        self._lock = threading.Lock()  # the image cache, hash equality checks, counters
        self._store = self._new_store()
        self._renderer: Renderer | None = None
        self._engine: LocalEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._httpd: JSONHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._max_model_len = 0
        self._requests = self._ok = self._received = self._hits = self._misses = 0
        self.pausing = GenerationPause()  # /pause, /resume and the weight version (engines/pausing.py)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> EngineServer:
        """Load the model, start the engine loop and listen; returns once requests are accepted."""
        if self._httpd is not None:
            return self
        engine = LocalEngine(self.model, feature_store=self._store, device=self._device, dtype=self._dtype,
                             max_batch_size=self._max_batch_size)
        try:
            self._max_model_len = self._resolve_max_len(engine.max_model_len)
        except EngineUnavailableError:
            asyncio.run(engine.close())
            raise
        loop = asyncio.new_event_loop()
        loop_thread = threading.Thread(target=loop.run_forever, name="rollwire-serve-loop", daemon=True)
        loop_thread.start()
        self._engine, self._loop, self._loop_thread = engine, loop, loop_thread
        try:
            httpd = JSONHTTPServer((self.host, self._requested_port), self)
        except OSError:
            self._close_engine()
            raise
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("rollwire serve listens on %s: it has no authentication", self.host)
        self._httpd = httpd
        self._http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                             name="rollwire-serve-http", daemon=True)
        self._http_thread.start()
        logger.info("serving %s as %r on %s", self.model_dir, self.served_model_name, self.url)
        return self

    def stop(self) -> None:
        """Stop listening, close the engine (running requests end) and every open connection."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        self._close_engine()
        httpd.close_connections()
        httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join()
        with self._lock:  # the cache lives in memory: a restarted server starts empty, as vLLM does
            self._engine, self._renderer, self._store = None, None, self._new_store()

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def max_model_len(self) -> int:
        """Prompt + completion limit (known once started)."""
        return self._max_model_len

    @property
    def engine(self) -> LocalEngine:
        if self._engine is None:
            raise EngineError("the server is not started")
        return self._engine

    @property
    def feature_store(self) -> FeatureStore | None:
        """The server's image cache (None for a text model)."""
        return self._store

    @property
    def open_connections(self) -> int:
        """Connections being served now (each holds a thread; at most `max_connections`)."""
        return self._httpd.open_connections if self._httpd is not None else 0

    def forget_cache(self) -> None:
        """Drop every cached image, as a restart would (later null kwargs_data items miss)."""
        with self._lock:
            if self._store is not None:
                self._store.clear()

    def stats(self) -> ServerStats:
        with self._lock:
            return ServerStats(self._requests, self._ok, self._received, self._hits, self._misses)

    def _new_store(self) -> FeatureStore | None:
        if self._vision_config is None:
            return None
        return FeatureStore(self._vision_config, max_bytes=self._image_cache_bytes)

    def _resolve_max_len(self, model_positions: int) -> int:
        if self._requested_max_len is None:
            return min(model_positions, DEFAULT_MAX_MODEL_LEN_CAP)
        if self._requested_max_len > model_positions:
            raise EngineUnavailableError(f"max_model_len {self._requested_max_len} exceeds the model's "
                                         f"{model_positions} positions")
        return self._requested_max_len

    def _close_engine(self) -> None:
        loop, engine = self._loop, self._engine
        if loop is None:
            return
        if engine is not None:
            asyncio.run_coroutine_threadsafe(engine.close(), loop).result()
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join()
        loop.close()
        self._loop = self._loop_thread = None
        self._engine = None

    # --- endpoints (run on the connection's thread) -------------------------------------------

    def handle(self, method: str, path: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
        """(status, JSON body) of one request; `None` body with status 0 means drop the connection."""
        route = path.split("?", 1)[0]
        routes: dict[str, tuple[str, Callable[[bytes], tuple[int, dict[str, Any] | None]]]] = {
            "/health": ("GET", lambda _: (200, None)),
            "/v1/models": ("GET", lambda _: (200, self._models())),
            GENERATE_PATH: ("POST", self._generate_unless_paused),
            RENDER_PATH: ("POST", self._render),
            "/pause": ("POST", lambda _: self._pause(path)),
            "/resume": ("POST", lambda _: self._resume()),
            "/is_paused": ("GET", lambda _: (200, {"is_paused": self.pausing.paused})),
            "/update_weight_version": ("POST", self._update_weight_version),
            "/weight_info": ("GET", lambda _: (200, {"weight_version": self.pausing.version})),
        }
        if route not in routes:
            return 404, {"detail": "Not Found"}
        want, fn = routes[route]
        if method != want:
            return 405, {"detail": "Method Not Allowed"}
        try:
            return fn(body)
        except _HTTPFailure as failure:
            return failure.status, failure.body
        except Exception as exc:  # never kill the connection thread; say what failed in the log
            logger.exception("unexpected error on %s", route)
            error = _internal_error(repr(exc))
            return error.status, error.body

    def _models(self) -> dict[str, Any]:
        card = {"id": self.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "rollwire", "root": str(self.model_dir), "parent": None,
                "max_model_len": self._max_model_len}
        return {"object": "list", "data": [card]}

    def _generate_unless_paused(self, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        """503 while paused; choices carry `weight_versions`, or end "abort" if /pause?mode=abort came."""
        ticket = self.pausing.enter()
        if ticket is None:
            return 503, {"error": {"message": "Generation is paused", "type": "ServiceUnavailableError",
                                   "param": None, "code": 503}}
        try:
            status, payload = self._generate(raw)
        finally:
            aborted = self.pausing.leave(ticket)
        for choice in (payload or {}).get("choices", []) if status == 200 else []:
            if aborted:
                choice.update(finish_reason="abort", stop_reason=None, token_ids=[],
                              logprobs=None if choice["logprobs"] is None else {"content": []})
            else:
                choice["weight_versions"] = [{"version": ticket.version, "start": 0, "end": len(choice["token_ids"])}]
        return status, payload

    def _pause(self, path: str) -> tuple[int, dict[str, Any] | None]:
        query = dict(part.partition("=")[::2] for part in path.partition("?")[2].split("&") if part)
        mode = query.get("mode", "abort")
        if mode not in ("abort", "wait"):
            raise _bad_request(f"pause mode {mode!r} is not supported by rollwire serve (abort or wait)")
        if not self.pausing.pause(mode):
            return 500, {"error": f"requests still running after the wait timeout: failed to pause ({mode})"}
        if query.get("clear_cache", "true").lower() != "false":
            self.forget_cache()  # vLLM clears its multimodal cache on pause
        return 200, {"status": "paused"}

    def _resume(self) -> tuple[int, dict[str, Any] | None]:
        self.pausing.resume()
        return 200, {"status": "resumed"}

    def _update_weight_version(self, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        try:
            version = msgspec.json.decode(raw).get("new_version")
        except (msgspec.DecodeError, AttributeError):
            version = None
        if not isinstance(version, str) or not version:
            raise _bad_request("update_weight_version needs {\"new_version\": \"...\"}")
        self.pausing.set_version(version)
        return 200, {"success": True, "new_version": version}

    def _generate(self, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        with self._lock:
            self._requests += 1
        delay, fault = self.faults.take()
        if delay > 0:
            time.sleep(delay)
        if fault == "drop":
            return 0, None
        if fault == "fail":
            status = self.faults.status
            return status, {"error": {"message": f"injected fault: HTTP {status}", "type": "ServiceUnavailableError",
                                      "param": None, "code": status}}
        body = self._decode(raw, GenerateBody)
        self._check_model(body.model)
        if body.stream:
            raise _bad_request("stream=true is not supported by rollwire serve")
        if body.output_mode != "tokens":
            raise _bad_request(f"output_mode={body.output_mode!r} is not supported by rollwire serve: it returns "
                               "tokens only")
        if body.content_parts and body.features:
            raise _bad_request("content_parts and features are mutually exclusive")
        token_ids, refs = (self._expand(body.token_ids, body.content_parts) if body.content_parts
                           else (body.token_ids, self._image_refs(body.features)))
        sampling = _sampling_params(body.sampling_params, prompt_len=len(token_ids),
                                    max_model_len=self._max_model_len)
        request_id = body.request_id or f"gen-{uuid.uuid4().hex}"
        request = GenerateRequest(prompt_token_ids=token_ids, images=refs, sampling=sampling,
                                  request_id=request_id)
        result = self._run(request)
        with self._lock:
            self._ok += 1
        completions = result.completions
        n_out = sum(len(c.token_ids) for c in completions)
        echo = bool(body.return_token_ids)
        response = GenerateResponse(
            request_id=request_id, choices=[_choice(i, c) for i, c in enumerate(completions)],
            prompt_token_ids=token_ids if echo else None,
            mm_placeholders={"image": [Range(r.offset, r.length) for r in refs]} if echo and refs else None,
            usage={"prompt_tokens": len(token_ids), "completion_tokens": n_out, "total_tokens": len(token_ids) + n_out})
        return 200, msgspec.to_builtins(response)

    def _expand(self, token_ids: list[int], parts: list[ContentPart]) -> tuple[list[int], tuple[ImageRef, ...]]:
        """content_parts: each image processed here (or taken from the cache by uuid), and each of
        the prompt's single pad tokens expanded to the image's run, as vLLM does."""
        if self._store is None:
            raise _bad_request(f"{self.model_dir.name} is a text-only model; the request has images")
        with self._lock:
            if self._renderer is None:
                self._renderer = create_renderer(self.model, feature_store=self._store)
            pad_id, store = self._renderer.image_pad_id, self._store
        feats: list[ImageFeatures] = []
        for k, part in enumerate(parts):
            if part.type != "image_url":
                raise _bad_request(f"content_parts[{k}]: type {part.type!r} is not supported (image_url only)")
            if part.url is None:
                with self._lock:
                    found = store.get(part.uuid) if part.uuid is not None and part.uuid in store else None
                    self._hits, self._misses = self._hits + (found is not None), self._misses + (found is None)
                if found is None:
                    raise _bad_request(f"Cache miss for image at index {k} but data is not provided.")
                feats.append(found)
                continue
            if part.url[:5].lower() != "data:":
                raise _bad_request(f"content_parts[{k}]: images must be data: URLs (this server fetches no URLs)")
            try:
                got = store.get_or_process(part.url)
            except (ImageError, FeatureError) as exc:
                raise _bad_request(f"content_parts[{k}]: {exc}") from None
            if part.uuid is not None:
                got = ImageFeatures(part.uuid, got.pixel_values, got.grid_thw, got.merge_size)
                with self._lock:
                    if part.uuid in store and store.get(part.uuid) != got:
                        raise _internal_error(f"image {k}: the client-provided multimodal UUID {part.uuid!r} may "
                                              "have been reused for different content")
                    store.put(got)
                    self._received += 1
            feats.append(got)
        try:
            return expand(token_ids, feats, pad_id=pad_id)  # type: ignore[arg-type]
        except WireError as exc:
            raise _bad_request(str(exc)) from None

    def _run(self, request: GenerateRequest) -> GenerateResult:
        loop, engine = self._loop, self._engine
        if loop is None or engine is None:
            raise _internal_error("the engine is stopped")
        try:
            future = asyncio.run_coroutine_threadsafe(engine.generate(request), loop)
        except RuntimeError as exc:  # the loop closed under us (stop() in progress)
            raise _internal_error(f"engine loop closed: {exc}") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _internal_error("request cancelled: the server is stopping") from None
        except PlaceholderError as exc:
            store = self._store
            if store is not None and any(ref.id not in store for ref in request.images):
                raise _internal_error(f"image cache emptied while the request was in flight: {exc}") from None
            raise _bad_request(str(exc)) from None
        except (InvalidRequestError, WireError, FeatureError) as exc:
            raise _bad_request(str(exc)) from None
        except RollwireError as exc:
            raise _internal_error(f"{type(exc).__name__}: {exc}") from None

    def _image_refs(self, features: Features | None) -> tuple[ImageRef, ...]:
        if features is None:
            return ()
        kwargs_data = features.kwargs_data or {}
        for name in (*features.mm_hashes, *features.mm_placeholders, *kwargs_data):
            if name != "image":
                raise _bad_request(f"features: modality {name!r} is not supported (images only)")
        hashes = features.mm_hashes.get("image", [])
        ranges = features.mm_placeholders.get("image", [])
        items = kwargs_data.get("image", [None] * len(hashes))
        if not len(hashes) == len(ranges) == len(items):
            raise _bad_request(f"features: {len(hashes)} mm_hashes, {len(ranges)} mm_placeholders and "
                               f"{len(items)} kwargs_data items for images; they must be equal")
        if hashes and self._store is None:
            raise _bad_request(f"{self.model_dir.name} is a text-only model; the request has images")
        refs = []
        for k, (mm_hash, rng, item) in enumerate(zip(hashes, ranges, items, strict=True)):
            if not mm_hash:
                raise _bad_request(f"features: mm_hashes[{k}] is empty")
            feats = self._image(k, mm_hash, item)
            refs.append(ImageRef(mm_hash, rng.offset, rng.length, feats.grid_thw))
        return tuple(refs)

    def _image(self, k: int, mm_hash: str, item: str | None) -> ImageFeatures:
        """The features of image `k`: decoded from `item` and cached, or (null item) from the cache."""
        if item is None:
            with self._lock:
                store = self._store
                assert store is not None
                try:
                    found = store.get(mm_hash)
                except UnknownImageError:
                    self._misses += 1
                else:
                    self._hits += 1
                    return found
            raise _internal_error(f"image {k}: null kwargs_data but hash {mm_hash!r} is not cached")
        assert self._store is not None
        try:
            pixels, grid, dtype = decode_image_kwargs(item, self._store.config)
        except WireError as exc:
            raise _bad_request(f"image {k}: {exc}") from None
        if dtype != "uint8":
            raise _bad_request(f"image {k}: pixel_values dtype {dtype!r} is not accepted: this server expects "
                               "uint8 patch rows (resized, not normalised), as vLLM 0.32 does by default")
        with self._lock:
            store = self._store
            assert store is not None
            if pixels.shape[1] != store.config.row_size:
                raise _bad_request(f"image {k}: pixel rows have {pixels.shape[1]} values; the model takes "
                                   f"{store.config.row_size}")
            try:
                feats = ImageFeatures(id=mm_hash, pixel_values=pixels, grid_thw=grid,
                                      merge_size=store.config.merge_size)
            except FeatureError as exc:
                raise _bad_request(f"image {k}: {exc}") from None
            if feats.nbytes > store.max_bytes:
                raise _bad_request(f"image {k}: {feats.nbytes} bytes of features exceed the server's image "
                                   f"cache ({store.max_bytes} bytes)")
            self._received += 1
            if mm_hash in store and store.get(mm_hash) != feats:
                raise _internal_error(f"image {k}: the client-provided multimodal UUID {mm_hash!r} may have "
                                      "been reused for different content")
            store.put(feats)
        return feats

    def _render(self, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        body = self._decode(raw, _RenderBody)
        self._check_model(body.model)
        try:
            messages = parse_messages(body.messages)
            for index, message in enumerate(messages):
                for part in message.images:
                    if not (isinstance(part.image, str) and part.image[:5].lower() == "data:"):
                        raise _bad_request(f"messages[{index}]: images must be data: URLs (this server reads "
                                           "no files and fetches no URLs)")
            with self._lock:
                if self._renderer is None:
                    self._renderer = create_renderer(self.model, feature_store=self._store)
                renderer, store = self._renderer, self._store
            rendered = renderer.render(messages, body.tools, add_generation_prompt=body.add_generation_prompt)
            features = None
            if rendered.images:
                assert store is not None
                features, _ = features_payload(rendered.images, store, pixel_format="uint8")
        except (MessageError, ImageError, RenderError, PlaceholderError) as exc:
            raise _bad_request(str(exc)) from None
        except RollwireError as exc:
            raise _internal_error(f"render failed: {type(exc).__name__}: {exc}") from None
        return 200, {"request_id": f"render-{uuid.uuid4().hex}", "model": self.served_model_name,
                     "token_ids": rendered.token_ids, "features": features}

    def _decode(self, raw: bytes, kind: type[Any]) -> Any:
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise _bad_request(f"invalid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _bad_request(f"request body is not JSON: {exc}") from None
        except RecursionError:  # msgspec's depth check on an `Any` field (content_parts, messages)
            raise _bad_request("request body is nested too deeply") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise _HTTPFailure(404, {"error": {"message": f"The model `{model}` does not exist.",
                                               "type": "NotFoundError", "param": "model", "code": 404}})


async def _cancel_other_tasks() -> None:
    """Cancel what still runs on the engine loop (so no HTTP thread waits forever at stop)."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the command line entry -----------------------------------------------------------------------


def serve_forever(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    max_batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    on_ready: Callable[[EngineServer], None] | None = None,
    connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT,
) -> None:
    """Serve until Ctrl-C (or SIGTERM), then stop cleanly. `on_ready` runs once it listens
    (default: print the URL to stderr)."""
    server = EngineServer(model_dir, host=host, port=port, served_model_name=served_model_name,
                          max_model_len=max_model_len, max_batch_size=max_batch_size, device=device, dtype=dtype,
                          connection_timeout=connection_timeout)
    def start() -> None:
        server.start()
        if on_ready is not None:
            on_ready(server)
        else:
            print(f"rollwire serve: {server.served_model_name!r} on {server.url} "
                  f"(max_model_len {server.max_model_len}); Ctrl-C stops", file=sys.stderr, flush=True)

    try:
        wait_for_signal(start)
    finally:
        server.stop()
