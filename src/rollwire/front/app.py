"""The OpenAI-compatible front: `/v1/chat/completions` with rollwire's exact tokens underneath.

A harness that speaks chat.completions (verifiers, SkyRL step-wise, agent SDKs) sends whole
conversations; the front renders the first call of a session and bridges later ones
(`rollwire.front.sessions`), sends token ids + image refs to its engine (a vLLM or
`rollwire serve` server through `VLLMEngine`, or the embedded `LocalEngine`), and answers an
OpenAI chat.completion with the token ids, logprobs and image refs beside the message.

Each session is one trajectory in the run directory, written through on every call: the row
is committed (fsync'd) before the answer is sent, so a crash loses no answered step; the
newer row of a session supersedes the older (`RunReader.rows` returns the newest). A session
that ends (`DELETE /v1/sessions/{id}`), is evicted (`max_sessions`) or was recorded by an
earlier server on the same run directory continues under a new trajectory id `<id>~<k>`.

This module is the server (lifecycle, routes, engine calls); a call becomes a step in
`rollwire.front.turns`, open sessions live in `rollwire.front.table`. HTTP is the standard
library's, as `rollwire serve` (`rollwire.engines.httpd`); the engine runs on one asyncio loop
in a background thread, so concurrent sessions batch in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rollwire import __version__
from rollwire.engines.httpd import JSONHTTPServer, ServedAddress, error_body
from rollwire.engines.types import Engine, GenerateRequest, GenerateResult
from rollwire.engines.vllm_wire import wire_mode
from rollwire.errors import (
    EngineError,
    EngineTimeoutError,
    FrontRequestError,
    ImageError,
    InvalidRequestError,
    MessageError,
    PlaceholderError,
    RenderError,
    RollwireError,
)
from rollwire.features import FeatureStore
from rollwire.front.protocol import Failure, Sampling, decode_request, read_completion, sampling_of, session_id_of
from rollwire.front.sessions import ENV_NAME, Session, answer_message, next_prompt, reload_from, turn_lease
from rollwire.front.table import SessionTable
from rollwire.front.turns import check_result, completion_json, engine_request, step_of
from rollwire.images import ImageLimits
from rollwire.messages import Message, parse_messages, parse_tools
from rollwire.render import ModelDir, Renderer, create_renderer
from rollwire.render.types import RenderedTokens
from rollwire.store import RunWriter

__all__ = ["FrontServer"]

logger = logging.getLogger("rollwire.front")
T = TypeVar("T")

CHAT_PATH = "/v1/chat/completions"
SESSIONS_PATH = "/v1/sessions/"


class FrontServer(ServedAddress):
    """Serves `/v1/chat/completions` and `/v1/models` over an engine, recording sessions to `run_dir`.

    `upstream`: a vLLM (or `rollwire serve`) base URL, or None / "embedded" for the in-process
    engine on `model_dir`. `model_dir` is the model the upstream serves (its tokenizer renders).
    `make_engine` builds any other `Engine` from the front's renderer instead (a pool, a scripted
    engine in tests); the front closes it on stop. `wire` is how images reach a vLLM upstream
    (`VLLMEngine`'s: features, content-parts or auto). Image paths are read only under `image_roots`;
    http(s) images only with `allow_remote_images`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        run_dir: str | Path,
        upstream: str | None = None,
        make_engine: Callable[[Renderer], Engine] | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        served_model_name: str | None = None,
        upstream_model: str | None = None,
        wire: str = "features",
        image_roots: Sequence[str | Path] = (),
        allow_remote_images: bool = False,
        max_sessions: int = 4096,
        connection_timeout: float = 30.0,
        max_connections: int = 256,
        retry_deadline: float = 60.0,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.run_dir = Path(run_dir)
        self.upstream = None if upstream in (None, "", "embedded") else upstream
        self.host, self._requested_port = host, port
        self.connection_timeout, self.max_connections = connection_timeout, max_connections
        self.limits = ImageLimits(allowed_roots=tuple(str(r) for r in image_roots),
                                  allow_remote=allow_remote_images)
        self._served_name, self._upstream_model = served_model_name, upstream_model
        self.wire = wire_mode(wire)
        self._retry_deadline, self._device, self._dtype = retry_deadline, device, dtype
        self._make_custom = make_engine
        self._sessions = SessionTable(max_sessions)
        self._httpd: JSONHTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self.renderer: Renderer | None = None
        self.engine: Engine | None = None
        self.writer: RunWriter | None = None
        self.served_model_name = served_model_name or self.model_dir.name
        self.max_model_len: int | None = None

    @property
    def max_sessions(self) -> int:
        """Open sessions kept before the least recently used is ended (its calls continue in a new one)."""
        return self._sessions.max_sessions

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FrontServer:
        """Open the run directory, reach (or load) the engine, listen; returns once calls are accepted."""
        if self._httpd is not None:
            return self
        from rollwire.rollout.runner import model_fingerprint

        model = ModelDir.load(self.model_dir)
        renderer = create_renderer(model, limits=self.limits)
        # A text-only model has none, and the writer wants one (an empty store is falsy: it has a length).
        store = renderer.feature_store if renderer.feature_store is not None else FeatureStore()
        manifest = {"settings": {"model": {"fingerprint": model_fingerprint(self.model_dir),
                                           "family": renderer.family}, "env": ENV_NAME},
                    "about": {"rollwire_version": __version__, "model_dir": str(self.model_dir),
                              "server_url": self.upstream, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        self.writer = RunWriter(self.run_dir, store, manifest=manifest)
        self._sessions.used_ids = set(self.writer.done_ids)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="rollwire-front-loop", daemon=True)
        thread.start()
        self._loop, self._threads, self.renderer = loop, [thread], renderer
        try:
            self.engine = self._make_engine(renderer, model)
            self._httpd = JSONHTTPServer((self.host, self._requested_port), self)
        except BaseException:
            self.stop()
            raise
        http = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                name="rollwire-front-http", daemon=True)
        http.start()
        self._threads.append(http)
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("the rollwire front listens on %s: it has no authentication", self.host)
        return self

    def _make_engine(self, renderer: Renderer, model: ModelDir) -> Engine:
        if self._make_custom is not None:
            custom = self._make_custom(renderer)
            limit = getattr(custom, "max_model_len", None)
            self.max_model_len = limit if isinstance(limit, int) else None
            return custom
        if self.upstream is None:
            from rollwire.engines.local import LocalEngine

            local = LocalEngine(model, feature_store=renderer.feature_store, device=self._device, dtype=self._dtype)
            self.max_model_len = local.max_model_len
            return local
        from rollwire.engines.vllm import RetryPolicy, VLLMEngine

        remote = VLLMEngine.for_renderer(self.upstream, renderer, model=self._upstream_model, wire=self.wire,
                                         retry=RetryPolicy(deadline_s=self._retry_deadline))
        try:
            self._call(remote.connect())
        except BaseException:
            self._call(remote.close())
            raise
        self.max_model_len = remote.max_model_len
        if self._served_name is None and remote.model:
            self.served_model_name = remote.model
        return remote

    def stop(self) -> None:
        """Stop listening, close the engine and the run directory (every answered call is on disk)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.close_connections()
            httpd.server_close()
        engine, self.engine = self.engine, None
        loop, self._loop = self._loop, None
        if loop is not None:
            if engine is not None:
                asyncio.run_coroutine_threadsafe(engine.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        for thread in self._threads:
            thread.join()
        self._threads = []
        if loop is not None:
            loop.close()
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def __enter__(self) -> FrontServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise Failure(503, "the front is stopping", "ServiceUnavailableError")
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()
        except concurrent.futures.CancelledError:
            raise Failure(503, "the request was cancelled: the front is stopping", "ServiceUnavailableError") from None

    # --- endpoints (on the connection's thread) --------------------------------------------------

    def handle(self, method: str, path: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """(status, JSON body) of one request; every failure is OpenAI error JSON, never a traceback."""
        route = path.split("?", 1)[0]
        try:
            if route == "/health" and method == "GET":
                return 200, None
            if route == "/v1/models" and method == "GET":
                return 200, self._models()
            if route == CHAT_PATH and method == "POST":
                return 200, self._chat(body, headers or {})
            if route.startswith(SESSIONS_PATH) and method == "DELETE":
                return 200, self._end_session(route[len(SESSIONS_PATH):])
            if route in ("/health", "/v1/models", CHAT_PATH) or route.startswith(SESSIONS_PATH):
                raise Failure(405, f"{method} is not allowed on {route}", "MethodNotAllowed")
            raise Failure(404, f"no route {route[:100]!r} (the front serves {CHAT_PATH} and /v1/models)",
                          "NotFoundError")
        except Failure as failure:
            return failure.status, failure.body
        except Exception as exc:  # a bug must not kill the connection thread; the log has the details
            logger.exception("unexpected error on %s", route)
            return 500, error_body(f"internal error: {type(exc).__name__}", 500, "InternalServerError")

    def _models(self) -> dict[str, Any]:
        card = {"id": self.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "rollwire", "root": str(self.model_dir), "parent": None,
                "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}

    def _end_session(self, key: str) -> dict[str, Any]:
        session = self._sessions.end(key)
        if session is None:
            raise Failure(404, f"no open session {key[:100]!r}", "NotFoundError", "session_id")
        return {"id": key, "object": "session", "deleted": True, "trajectory_id": session.trajectory_id,
                "steps": len(session.steps)}

    def _chat(self, raw: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        renderer, writer = self.renderer, self.writer
        if renderer is None or writer is None:
            raise Failure(503, "the front is not started", "ServiceUnavailableError")
        try:
            body = decode_request(raw)
            if body.model is not None and body.model != self.served_model_name:
                raise Failure(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model")
            sampling = sampling_of(body)
            tools = parse_tools(body.tools)
            messages = parse_messages(body.messages)
            if not messages:
                raise FrontRequestError("messages is empty", param="messages")
            if messages[-1].role == "assistant":
                raise FrontRequestError("the last message is an assistant message: continuing it is not "
                                        "supported (the front adds the generation prompt)", param="messages")
            key = session_id_of(body, headers)
        except (FrontRequestError, MessageError) as exc:
            raise Failure(400, str(exc), "BadRequestError", getattr(exc, "param", None)) from None
        while True:
            session = self._sessions.open(key)
            with session.lock:
                if session.ended:  # ended or evicted while this call waited: continue in a fresh one
                    continue
                if not session.steps and body.seed is not None:
                    session.seed = body.seed
                return self._turn(renderer, writer, session, messages, tools, sampling)

    def _turn(self, renderer: Renderer, writer: RunWriter, session: Session, messages: list[Message],
              tools: list[dict[str, Any]] | None, sampling: Sampling) -> dict[str, Any]:
        """Prompt (bridged when the call extends the session), sample, record, answer (`rollwire.front.turns`).
        The images the render is handed stay pinned in the feature store until the step is written."""
        step_index = len(session.steps)
        with turn_lease(renderer.feature_store) as lease:
            try:
                prompt, bridged, reason = next_prompt(renderer, session, messages, tools, self.limits, lease)
            except (ImageError, MessageError, RenderError, PlaceholderError) as exc:
                raise Failure(400, str(exc), "BadRequestError", "messages") from None
            request = engine_request(renderer, session, prompt, sampling, self.max_model_len)
            t0 = time.perf_counter()
            result = self._generate(renderer, session, prompt, request)
            generate_s = time.perf_counter() - t0
            answer = read_completion(renderer, result.completions[0], sampling.stop)
            step = step_of(prompt, answer, bridged, reason, generate_s)
            session.record(messages, tools, prompt, step, answer_message(answer.record))
            self._write(writer, session)
        return completion_json(renderer, session, step_index, step, answer, sampling, self.served_model_name)

    def _generate(self, renderer: Renderer, session: Session, prompt: RenderedTokens,
                  request: GenerateRequest) -> GenerateResult:
        """The engine's answer, checked; engine failures become 400 (a bad request) or 502/504 (upstream).
        An image the store evicted (an earlier call's, sent by id until the upstream asks for it again)
        is recomputed from the session's original when the engine needs it."""
        assert self.engine is not None
        store = renderer.feature_store
        try:
            with (store.reloadable(prompt.image_ids, reload_from(session, self.run_dir)) if store is not None
                  else contextlib.nullcontext()):
                result = self._call(self.engine.generate(request))
        except InvalidRequestError as exc:
            raise Failure(400, str(exc), "BadRequestError") from None
        except EngineTimeoutError as exc:
            raise Failure(504, f"the upstream engine timed out: {exc}", "UpstreamTimeoutError") from None
        except (EngineError, PlaceholderError) as exc:
            raise Failure(502, f"the upstream engine failed: {type(exc).__name__}: {exc}", "UpstreamError") from None
        check_result(renderer, result)
        return result

    def _write(self, writer: RunWriter, session: Session) -> None:
        """Commit the session's trajectory (the newest row supersedes the session's older ones)."""
        trajectory = session.trajectory()
        writer.done_ids.discard(trajectory.id)  # written again on purpose: one row per call
        try:
            writer.write(trajectory, session.originals)
        except RollwireError as exc:
            raise Failure(500, f"the answer was sampled but the run directory refused it: {exc}",
                          "StoreError") from None
        session.written()
