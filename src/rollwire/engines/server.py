"""`rollwire serve`: the local engine over HTTP, speaking vLLM 0.32's token-in/token-out wire format.

Endpoints, as a vLLM client sees them: `GET /health`, `GET /v1/models`,
`POST /inference/v1/generate` (token ids + `features` with msgpack `kwargs_data`, or
`content_parts`), `POST /v1/chat/completions/render`, and vLLM's RL endpoints (pause, resume,
weight version). Received images are kept by the client's `mm_hash`, so a later request may send
a null `kwargs_data` item ("use your copy"). Stricter than vLLM on purpose: pixels must be uint8
patch rows, and placeholders are checked against the token stream before anything runs (vLLM
accepts a wrong count with HTTP 200).

Standard library HTTP (`ThreadingHTTPServer`, one thread per connection); the engine runs on
one asyncio loop in a background thread, so concurrent requests batch in the engine. A client
cannot hold a thread forever: a connection that idles, or takes longer than
`connection_timeout` to send one request (a slowloris trickle), is closed, and at most
`max_connections` are open at once.
Fault injection (`Faults`) exists for tests and is off by default.

This module is the server's lifecycle, its routes and the generate endpoint; the rest is one job
a module: `server_requests.py` (request decoding, vLLM's error bodies), `server_images.py` (the
image cache), `server_render.py` (the render endpoint), `server_pausing.py` (pause, resume,
weight versions) and `server_loop.py` (the engine's event-loop thread).
"""

from __future__ import annotations

import asyncio
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

from rollwire.engines.httpd import JSONHTTPServer, ServedAddress, error_body, wait_for_signal
from rollwire.engines.local import LocalEngine
from rollwire.engines.pausing import GenerationPause
from rollwire.engines.server_images import ServedImages
from rollwire.engines.server_loop import EngineLoop
from rollwire.engines.server_pausing import Answer, Handler, generate_unless_paused, pausing_routes
from rollwire.engines.server_render import render
from rollwire.engines.server_requests import (
    HTTPFailure,
    bad_request,
    check_model,
    choice,
    decode_body,
    internal_error,
    sampling_params,
)
from rollwire.engines.types import GenerateRequest, GenerateResult
from rollwire.engines.vllm_wire import GenerateBody, GenerateResponse, Range
from rollwire.engines.wire import GENERATE_PATH, RENDER_PATH, WireError
from rollwire.errors import (
    EngineError,
    EngineUnavailableError,
    FeatureError,
    InvalidRequestError,
    PlaceholderError,
    RollwireError,
)
from rollwire.features import FeatureStore
from rollwire.render import ModelDir, family_of, vision_config

__all__ = ["EngineServer", "Faults", "ServerStats", "serve_forever"]

logger = logging.getLogger("rollwire.server")

DEFAULT_MAX_MODEL_LEN_CAP = 32768
DEFAULT_CONNECTION_TIMEOUT = 30.0  # seconds a connection may idle, or take to send one request
DEFAULT_MAX_CONNECTIONS = 256  # open connections (one thread each); more are answered 503 and closed


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
        if max_model_len is not None and max_model_len < 1:
            raise EngineUnavailableError(f"max_model_len must be >= 1, got {max_model_len}")
        self.host = host
        self.served_model_name = served_model_name or str(model_dir)
        self.faults = faults if faults is not None else Faults()
        self._requested_port = port
        self._requested_max_len = max_model_len
        self._max_batch_size, self._device, self._dtype = max_batch_size, device, dtype
        family = family_of(self.model)
        vision = vision_config(self.model, family.vision) if family and family.vision else None
        self._images = ServedImages(self.model, vision, image_cache_bytes)  # by the client's mm_hash
        self._lock = threading.Lock()  # the request counters
        self._engine: EngineLoop | None = None  # the engine on its own event loop, once started
        self._httpd: JSONHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._max_model_len = 0
        self._requests = self._ok = 0
        self.pausing = GenerationPause()  # /pause, /resume and the weight version (engines/pausing.py)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> EngineServer:
        """Load the model, start the engine loop and listen; returns once requests are accepted."""
        if self._httpd is not None:
            return self
        engine = LocalEngine(self.model, feature_store=self._images.store, device=self._device, dtype=self._dtype,
                             max_batch_size=self._max_batch_size)
        try:
            self._max_model_len = self._resolve_max_len(engine.max_model_len)
        except EngineUnavailableError:
            asyncio.run(engine.close())
            raise
        self._engine = EngineLoop(engine)
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
        self._images.reset()  # the cache lives in memory: a restarted server starts empty, as vLLM does

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
        return self._engine.engine

    @property
    def feature_store(self) -> FeatureStore | None:
        """The server's image cache (None for a text model)."""
        return self._images.store

    @property
    def open_connections(self) -> int:
        """Connections being served now (each holds a thread; at most `max_connections`)."""
        return self._httpd.open_connections if self._httpd is not None else 0

    def forget_cache(self) -> None:
        """Drop every cached image, as a restart would (later null kwargs_data items miss)."""
        self._images.clear()

    def stats(self) -> ServerStats:
        with self._lock:
            requests, ok = self._requests, self._ok
        return ServerStats(requests, ok, *self._images.counts())

    def _resolve_max_len(self, model_positions: int) -> int:
        if self._requested_max_len is None:
            return min(model_positions, DEFAULT_MAX_MODEL_LEN_CAP)
        if self._requested_max_len > model_positions:
            raise EngineUnavailableError(f"max_model_len {self._requested_max_len} exceeds the model's "
                                         f"{model_positions} positions")
        return self._requested_max_len

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # --- endpoints (run on the connection's thread) -------------------------------------------

    def handle(self, method: str, path: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> Answer:
        """(status, JSON body) of one request; `None` body with status 0 means drop the connection."""
        route = path.split("?", 1)[0]
        routes: dict[str, tuple[str, Handler]] = {
            "/health": ("GET", lambda _: (200, None)),
            "/v1/models": ("GET", lambda _: (200, self._models())),
            GENERATE_PATH: ("POST", lambda raw: generate_unless_paused(self.pausing, self._generate, raw)),
            RENDER_PATH: ("POST", lambda raw: render(raw, self._images, self.served_model_name)),
            **pausing_routes(self.pausing, path, self.forget_cache),
        }
        if route not in routes:
            return 404, {"detail": "Not Found"}
        want, fn = routes[route]
        if method != want:
            return 405, {"detail": "Method Not Allowed"}
        try:
            return fn(body)
        except HTTPFailure as failure:
            return failure.status, failure.body
        except Exception as exc:  # never kill the connection thread; say what failed in the log
            logger.exception("unexpected error on %s", route)
            error = internal_error(repr(exc))
            return error.status, error.body

    def _models(self) -> dict[str, Any]:
        card = {"id": self.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "rollwire", "root": str(self.model_dir), "parent": None,
                "max_model_len": self._max_model_len}
        return {"object": "list", "data": [card]}

    def _generate(self, raw: bytes) -> Answer:
        with self._lock:
            self._requests += 1
        delay, fault = self.faults.take()
        if delay > 0:
            time.sleep(delay)
        if fault == "drop":
            return 0, None
        if fault == "fail":
            status = self.faults.status
            return status, error_body(f"injected fault: HTTP {status}", status, "ServiceUnavailableError")
        body = decode_body(raw, GenerateBody)
        check_model(body.model, self.served_model_name)
        if body.stream:
            raise bad_request("stream=true is not supported by rollwire serve")
        if body.output_mode != "tokens":
            raise bad_request(f"output_mode={body.output_mode!r} is not supported by rollwire serve: it returns "
                              "tokens only")
        if body.content_parts and body.features:
            raise bad_request("content_parts and features are mutually exclusive")
        token_ids, refs = (self._images.expand(body.token_ids, body.content_parts) if body.content_parts
                           else (body.token_ids, self._images.refs(body.features)))
        sampling = sampling_params(body.sampling_params, prompt_len=len(token_ids),
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
            request_id=request_id, choices=[choice(i, c) for i, c in enumerate(completions)],
            prompt_token_ids=token_ids if echo else None,
            mm_placeholders={"image": [Range(r.offset, r.length) for r in refs]} if echo and refs else None,
            usage={"prompt_tokens": len(token_ids), "completion_tokens": n_out, "total_tokens": len(token_ids) + n_out})
        return 200, msgspec.to_builtins(response)

    def _run(self, request: GenerateRequest) -> GenerateResult:
        engine = self._engine
        if engine is None:
            raise internal_error("the engine is stopped")
        try:
            return engine.generate(request)
        except PlaceholderError as exc:
            if self._images.lost_any(request.images):
                raise internal_error(f"image cache emptied while the request was in flight: {exc}") from None
            raise bad_request(str(exc)) from None
        except (InvalidRequestError, WireError, FeatureError) as exc:
            raise bad_request(str(exc)) from None
        except RollwireError as exc:
            raise internal_error(f"{type(exc).__name__}: {exc}") from None


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
