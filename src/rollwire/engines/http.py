"""One vLLM server over HTTP (httpx): setup requests retried by the policy, and the generate POST
whose answer is decoded into the shared wire structs. No wire-mode or image logic here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from rollwire.errors import ServerError, WireError

from .hints import error_text
from .retry import RetryPolicy
from .vllm_wire import GenerateResponse, decode_response
from .wire import GENERATE_PATH


class ServerConnection:
    """Pooled keep-alive connections to one server; `on_retry` is called for each setup retry."""

    def __init__(self, base_url: str, *, retry: RetryPolicy, timeout: float, connect_timeout: float,
                 max_in_flight: int, transport: httpx.AsyncBaseTransport | None = None,
                 on_retry: Callable[[], None] = lambda: None) -> None:
        self.base_url = base_url
        self.retry = retry
        self._on_retry = on_retry
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            transport=transport, headers={"content-type": "application/json"})

    async def close(self) -> None:
        await self._client.aclose()

    async def generate(self, body: bytes, headers: dict[str, str] | None = None,
                       ) -> tuple[int | None, GenerateResponse | None, str]:
        """(status, decoded 200 answer or None, error text); status None for a connection-level failure."""
        try:
            response = await self._client.post(GENERATE_PATH, content=body, headers=headers)
        except httpx.RequestError as exc:
            return None, None, f"{type(exc).__name__}: {exc}"
        if response.status_code == 200:
            try:
                return 200, decode_response(response.content), ""
            except WireError as exc:
                return 200, None, f"answered 200 with a malformed body: {exc}"
        try:
            error = error_text(msgspec.json.decode(response.content))
        except (msgspec.DecodeError, RecursionError):
            error = ""
        return response.status_code, None, error or response.text[:200]

    async def version(self) -> str | None:
        """The server's `/version` (vLLM has one), for a run manifest; None when it has none."""
        try:
            response = await self._client.get("/version")
            answer = msgspec.json.decode(response.content) if response.status_code == 200 else None
        except (httpx.RequestError, msgspec.DecodeError):
            return None
        version = answer.get("version") if isinstance(answer, dict) else None
        return str(version)[:100] if version is not None else None

    async def text(self, path: str) -> str | None:
        """A GET's text body, or None when it fails or is not a 200 (best-effort reads: /metrics)."""
        try:
            response = await self._client.get(path)
        except httpx.RequestError:
            return None
        return response.text if response.status_code == 200 else None

    async def get_json(self, path: str) -> Any:
        return self._json(await self._request("GET", path, None), path)

    async def post_json(self, path: str, body: Any) -> Any:
        return self._json(await self._request("POST", path, msgspec.json.encode(body)), path)

    async def _request(self, method: str, path: str, content: bytes | None) -> httpx.Response:
        """A setup request, retried like generate on refused connections, 429 and 5xx."""
        attempt = 0
        first_failure: float | None = None
        while True:
            try:
                response = await self._client.request(method, path, content=content)
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
            self._on_retry()

    def _json(self, response: httpx.Response, path: str) -> Any:
        if response.status_code != 200:
            raise ServerError(f"{self.base_url}{path} answered {response.status_code}: {response.text[:200]}",
                              status=response.status_code)
        try:
            return msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError):
            raise ServerError(f"{self.base_url}{path} answered a body that is not JSON") from None
