"""Standard-library HTTP for rollwire's servers (`rollwire serve`, the OpenAI front): JSON in, JSON out.

One thread per connection (`ThreadingHTTPServer`). A client cannot hold a thread forever: a
connection that idles, or takes longer than the app's `connection_timeout` to send one request
(a slowloris trickle), is closed, and at most `max_connections` are open at once (more are
answered 503). Bodies need a Content-Length and are bounded by `MAX_BODY_BYTES`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import msgspec

__all__ = ["MAX_BODY_BYTES", "HTTPApp", "JSONHTTPServer", "error_body", "wait_for_signal"]

logger = logging.getLogger("rollwire.server")

MAX_BODY_BYTES = 512 * 2**20


class HTTPApp(Protocol):
    """What the server calls: `handle` answers (status, JSON body); status 0 drops the connection.
    `headers` arrive with lower-case names."""

    connection_timeout: float
    max_connections: int

    def handle(self, method: str, path: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> tuple[int, Any]: ...


def error_body(message: str, status: int = 400, kind: str = "BadRequestError",
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's (and vLLM's) error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class JSONHTTPServer(ThreadingHTTPServer):
    """Tracks open connections and when each began waiting for (or reading) its current request;
    `service_actions` (run by `serve_forever` every poll) shuts down any past the deadline."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connects is not dropped (SYN retried after 1 s)

    def __init__(self, address: tuple[str, int], app: HTTPApp) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        self.connection_timeout = app.connection_timeout
        self.max_connections = app.max_connections
        self._connections: dict[socket.socket, float | None] = {}  # -> reading since (monotonic)
        self._connections_lock = threading.Lock()
        self._open = 0
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._connections_lock:
            if self._open >= self.max_connections:
                refused = True
            else:
                self._open += 1
                refused = False
        if refused:
            logger.warning("refusing a connection: %d already open (max_connections)", self.max_connections)
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return not refused

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            return self._open

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._open -= 1

    @contextlib.contextmanager
    def tracking(self, conn: socket.socket) -> Iterator[None]:
        with self._connections_lock:
            self._connections[conn] = None
        try:
            yield
        finally:
            with self._connections_lock:
                self._connections.pop(conn, None)

    def reading(self, conn: socket.socket, since: float | None) -> None:
        """Mark `conn` as waiting for / reading a request since `since` (None: being answered)."""
        with self._connections_lock:
            if conn in self._connections:
                self._connections[conn] = since

    def service_actions(self) -> None:
        deadline = time.monotonic() - self.connection_timeout
        with self._connections_lock:
            stale = [c for c, since in self._connections.items() if since is not None and since < deadline]
        for conn in stale:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close_connections(self) -> None:
        """Shut down kept-alive connections, so clients see the server go away."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ServedAddress:
    """`port` and `url` of an app a `JSONHTTPServer` serves: the bound port once started (port 0
    asks for a free one), else the one asked for."""

    host: str
    _requested_port: int
    _httpd: JSONHTTPServer | None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1]) if self._httpd is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rollwire"
    sys_version = ""
    server: JSONHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_timeout)  # bounds every read and write

    def handle(self) -> None:
        with self.server.tracking(self.connection):
            super().handle()

    def handle_one_request(self) -> None:
        self.server.reading(self.connection, time.monotonic())
        try:
            super().handle_one_request()
        finally:
            self.server.reading(self.connection, None)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _serve(self, method: str) -> None:
        length_header = self.headers.get("Content-Length")
        if length_header is None and self.headers.get("Transfer-Encoding"):
            self._send(411, error_body("send a Content-Length (chunked bodies are not supported)"), close=True)
            return
        try:
            length = int(length_header or 0)
        except ValueError:
            self._send(400, error_body(f"bad Content-Length {length_header!r}"), close=True)
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(413, error_body(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}"), close=True)
            return
        try:
            body = self.rfile.read(length)
        except OSError:  # timed out, or shut down by the deadline
            body = b""
        if len(body) != length:  # the client went away (or was cut off) mid-body
            self.close_connection = True
            return
        self.server.reading(self.connection, None)
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, payload = self.server.app.handle(method, self.path, body, headers)
        if status == 0:  # injected fault: close without answering
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, payload)

    def _send(self, status: int, payload: Any, *, close: bool = False) -> None:
        data = msgspec.json.encode(payload) if payload is not None else b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client hung up; nothing to answer
            self.close_connection = True


def wait_for_signal(on_ready: Callable[[], None]) -> None:
    """Call `on_ready`, then block until Ctrl-C, SIGINT or SIGTERM (the caller stops its server after).

    SIGINT too: a server started as a background job inherits SIGINT ignored, and Ctrl-C / kill -INT
    must still stop it.
    """
    stopping = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stopping.set())
    try:
        on_ready()
        with contextlib.suppress(KeyboardInterrupt):
            while not stopping.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
