"""Fetching a remote (http/https) image: at most `max_encoded_bytes`, under one total deadline.

Its own module because it is the one network path of image loading, with its own event-loop and
thread handling; `images.read_source` calls it only when `ImageLimits.allow_remote` is set.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from rollwire.errors import ImageNotFoundError, ImageSourceError, ImageTooLargeError, RemoteImageTimeoutError

if TYPE_CHECKING:
    from rollwire.images import ImageLimits

__all__ = ["fetch_remote"]


def fetch_remote(url: str, limits: ImageLimits) -> bytes:
    """The body at `url`, cut at `remote_timeout` for the whole fetch.

    httpx's timeouts bound each read, so a server trickling one byte a second would never trip
    them; the fetch therefore runs as a task under one `asyncio.timeout`, on a private event loop
    (in a short-lived thread when the caller is itself inside a running loop).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_fetch(url, limits)
    result: list[bytes] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(_run_fetch(url, limits))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="rollwire-image-fetch", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _run_fetch(url: str, limits: ImageLimits) -> bytes:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_fetch_within_deadline(url, limits))
    finally:
        loop.close()  # does not wait for a resolver thread still stuck in getaddrinfo


async def _fetch_within_deadline(url: str, limits: ImageLimits) -> bytes:
    try:
        async with asyncio.timeout(limits.remote_timeout):
            return await _fetch_body(url, limits)
    except TimeoutError:
        raise RemoteImageTimeoutError(
            f"{url[:100]}: fetch exceeded its total deadline of {limits.remote_timeout}s"
        ) from None


async def _fetch_body(url: str, limits: ImageLimits) -> bytes:
    import httpx

    cap = limits.max_encoded_bytes
    buf = bytearray()
    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout, follow_redirects=True,
                                     max_redirects=5) as client, client.stream("GET", url) as response:
            if response.status_code in (404, 410):
                raise ImageNotFoundError(f"remote image not found (HTTP {response.status_code}): {url[:100]}")
            if response.status_code >= 400:
                raise ImageSourceError(f"remote image request failed (HTTP {response.status_code}): "
                                       f"{url[:100]}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise ImageTooLargeError(f"{url[:100]}: declares {declared} bytes, over the limit of {cap}")
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > cap:
                    raise ImageTooLargeError(f"{url[:100]}: more than {cap} bytes")
    except httpx.TimeoutException:
        raise TimeoutError from None  # reported by the caller as the total deadline
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise ImageSourceError(f"cannot fetch {url[:100]}: {type(exc).__name__}: {exc}") from None
    return bytes(buf)
