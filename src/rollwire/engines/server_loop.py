"""`rollwire serve`'s engine thread: the `LocalEngine` on its own asyncio loop, called from HTTP threads.

The HTTP server runs one thread per connection; the engine batches only the requests that
reach it on one event loop. So the engine lives on a loop in a daemon thread, each connection
thread submits its request there and blocks on the answer, and `close()` closes the engine and
cancels whatever still runs, so no connection thread waits forever when the server stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from rollwire.engines.local import LocalEngine
from rollwire.engines.server_requests import internal_error
from rollwire.engines.types import GenerateRequest, GenerateResult

__all__ = ["EngineLoop"]


class EngineLoop:
    """`engine` served on a new event loop in a daemon thread (started here)."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollwire-serve-loop", daemon=True)
        self._thread.start()

    def generate(self, request: GenerateRequest) -> GenerateResult:
        """The engine's answer, on the calling thread; vLLM's 500 if the loop closes or the request
        is cancelled by a stop; the engine's own errors as they are."""
        try:
            future = asyncio.run_coroutine_threadsafe(self.engine.generate(request), self._loop)
        except RuntimeError as exc:  # the loop closed under us (stop() in progress)
            raise internal_error(f"engine loop closed: {exc}") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise internal_error("request cancelled: the server is stopping") from None

    def close(self) -> None:
        """Close the engine (running requests end "abort"), cancel what is left, end the thread."""
        loop = self._loop
        asyncio.run_coroutine_threadsafe(self.engine.close(), loop).result()
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join()
        loop.close()


async def _cancel_other_tasks() -> None:
    """Cancel what still runs on the engine loop (so no HTTP thread waits forever at stop)."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
