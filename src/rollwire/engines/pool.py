"""Many servers as one `Engine`: session affinity, least-loaded placement, failover.

Each replica is a `VLLMEngine` with its own set of images the server holds. A request's
`session_id` (a trajectory, or a GRPO group whose members share a prompt image) pins it to one
replica, so images go by id after the first turn and prefix caches hit; a new session goes to
the replica with the fewest requests in flight. A replica that refuses connections or keeps
failing past a short deadline (`failover_s`, the replicas' own retry deadline) is marked down,
its sessions move to the others on their next request (the new replica's held set lacks their
images, so they are sent in full), and it is probed every `probe_s` until `/health` answers
again. While no replica is up, requests wait up to `deadline_s` for one to come back.

One URL that is a router (vllm-router with session affinity) works too: every request carries
`X-Session-ID`, and the router keeps a session on one engine behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from rollwire.errors import (
    EngineClosedError,
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    ServerError,
)
from rollwire.render.types import Renderer

from .types import GenerateRequest, GenerateResult
from .vllm import RetryPolicy, VLLMEngine


@dataclass
class ReplicaStats:
    url: str
    up: bool
    in_flight: int
    sessions: int  # sessions pinned to it now
    requests: int  # requests it answered
    failures: int  # times it was marked down
    images_sent: int  # image occurrences sent to it with their pixels
    images_by_id: int


@dataclass
class PoolStats:
    failovers: int = 0  # requests moved to another replica after theirs failed
    sessions_moved: int = 0  # sessions re-pinned away from a replica that went down
    revived: int = 0  # replicas brought back by a probe


class _Replica:
    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self.up = True
        self.in_flight = 0
        self.sessions = 0  # sessions pinned to it
        self.failures = 0
        self.probe: asyncio.Task[None] | None = None


class EnginePool:
    """An `Engine` over several `VLLMEngine` replicas (see the module docstring)."""

    def __init__(
        self,
        engines: Sequence[VLLMEngine],
        *,
        deadline_s: float = 60.0,
        probe_s: float = 2.0,
        max_sessions: int = 65536,
    ) -> None:
        if not engines:
            raise EngineUnavailableError("an engine pool needs at least one server URL")
        urls = [e.base_url for e in engines]
        if len(set(urls)) != len(urls):
            raise EngineUnavailableError(f"server URLs repeat: {urls}")
        self.replicas = [_Replica(e) for e in engines]
        self.deadline_s = deadline_s
        self.probe_s = probe_s
        self.stats = PoolStats()
        self._sessions: OrderedDict[str, _Replica] = OrderedDict()  # LRU, bounded
        self._max_sessions = max_sessions
        self._changed = asyncio.Event()  # set when a replica comes back
        self._closed = False
        self._probe_client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    @classmethod
    def for_renderer(cls, urls: Sequence[str], renderer: Renderer, *, failover_s: float = 5.0,
                     deadline_s: float = 60.0, probe_s: float = 2.0, **kwargs: Any) -> EnginePool:
        """One `VLLMEngine.for_renderer` per URL, each giving up after `failover_s` of failures."""
        retry = kwargs.pop("retry", None) or RetryPolicy(deadline_s=failover_s)
        engines = [VLLMEngine.for_renderer(url, renderer, retry=retry, **kwargs) for url in urls]
        return cls(engines, deadline_s=deadline_s, probe_s=probe_s)

    @property
    def engines(self) -> list[VLLMEngine]:
        return [r.engine for r in self.replicas]

    @property
    def model(self) -> str | None:
        return next((r.engine.model for r in self.replicas if r.engine.model is not None), None)

    def replica_of(self, session_id: str) -> str | None:
        """The URL a session is pinned to now (None when it is not pinned)."""
        replica = self._sessions.get(session_id)
        return None if replica is None else replica.engine.base_url

    def replica_stats(self) -> list[ReplicaStats]:
        return [ReplicaStats(url=r.engine.base_url, up=r.up, in_flight=r.in_flight, sessions=r.sessions,
                             requests=r.engine.stats.requests, failures=r.failures,
                             images_sent=r.engine.stats.images_sent, images_by_id=r.engine.stats.images_by_id)
                for r in self.replicas]

    # --- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Reach every replica; those that cannot be reached are marked down (and probed). At
        least one must answer, and all that answer must serve the same model."""
        results = await asyncio.gather(*(r.engine.connect() for r in self.replicas), return_exceptions=True)
        errors = []
        for replica, result in zip(self.replicas, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, ServerError):
                    raise result
                errors.append(f"{replica.engine.base_url}: {result}")
                self._mark_down(replica)
        if all(not r.up for r in self.replicas):
            raise ServerError("no server of the pool can be reached: " + "; ".join(errors))
        models = {r.engine.model for r in self.replicas if r.up}
        if len(models) > 1:
            raise EngineUnavailableError(f"the pool's servers serve different models: {sorted(map(str, models))}")

    async def server_version(self) -> str | None:
        for replica in self.replicas:
            if replica.up:
                return await replica.engine.server_version()
        return None

    async def close(self) -> None:
        self._closed = True
        for replica in self.replicas:
            if replica.probe is not None:
                replica.probe.cancel()
        await asyncio.gather(*(r.probe for r in self.replicas if r.probe is not None), return_exceptions=True)
        await asyncio.gather(*(r.engine.close() for r in self.replicas))
        await self._probe_client.aclose()

    async def __aenter__(self) -> EnginePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def forget_server_cache(self) -> None:
        """Assume no server holds any image (every replica starts a new epoch)."""
        for replica in self.replicas:
            start_new_epoch(replica.engine, "pool: forget server caches")

    def new_epoch(self, reason: str) -> None:
        for replica in self.replicas:
            start_new_epoch(replica.engine, reason)

    # --- generate ---------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise EngineClosedError("the engine pool is closed")
        start = time.monotonic()
        while True:
            replica = await self._place(request.session_id, start)
            failure = await self._attempt(replica, request)
            if isinstance(failure, GenerateResult):
                return failure
            if self._closed:
                raise failure
            self._mark_down(replica)
            if time.monotonic() - start > self.deadline_s:
                raise ServerError(f"no replica answered within {self.deadline_s:.0f} s; last: {failure}",
                                  status=getattr(failure, "status", None)) from None
            self.stats.failovers += 1

    async def _attempt(self, replica: _Replica, request: GenerateRequest) -> GenerateResult | EngineError:
        """The result, or the failure that moves the request to another replica."""
        replica.in_flight += 1
        try:
            result = await replica.engine.generate(request)
        except (ServerError, EngineTimeoutError) as exc:
            return exc
        finally:
            replica.in_flight -= 1
        if any(c.finish_reason == "abort" for c in result.completions):
            # A server that stops (or is paused with mode=abort) aborts what it runs: the request
            # was not served, so it goes again, elsewhere while this replica is checked.
            return ServerError(f"{replica.engine.base_url} aborted the request")
        return result

    async def _place(self, session: str | None, start: float) -> _Replica:
        """The session's replica if it is up, else the least loaded one (and pin the session)."""
        while True:
            pinned = self._sessions.get(session) if session is not None else None
            if pinned is not None and pinned.up:
                self._sessions.move_to_end(session)  # type: ignore[arg-type]
                return pinned
            up = [r for r in self.replicas if r.up]
            if up:
                best = min(up, key=lambda r: (r.in_flight, r.sessions))
                if session is not None:
                    if pinned is not None:
                        self.stats.sessions_moved += 1
                    self._pin(session, best)
                return best
            remaining = self.deadline_s - (time.monotonic() - start)
            if remaining <= 0:
                raise ServerError(f"no replica of the pool is up (waited {self.deadline_s:.0f} s): "
                                  + ", ".join(r.engine.base_url for r in self.replicas))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, self.probe_s))

    def _pin(self, session: str, replica: _Replica) -> None:
        old = self._sessions.pop(session, None)
        if old is not None:
            old.sessions -= 1
        self._sessions[session] = replica
        replica.sessions += 1
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)[1].sessions -= 1

    # --- failure and recovery ---------------------------------------------------------------

    def _mark_down(self, replica: _Replica) -> None:
        if not replica.up:
            return
        replica.up = False
        replica.failures += 1
        # What it held is gone if it restarts; its sessions re-pin (and re-send) on their next request.
        start_new_epoch(replica.engine, "replica marked down")
        if not self._closed and (replica.probe is None or replica.probe.done()):
            replica.probe = asyncio.get_running_loop().create_task(self._probe(replica))

    async def _probe(self, replica: _Replica) -> None:
        url = replica.engine.base_url + "/health"
        while not self._closed:
            await asyncio.sleep(self.probe_s)
            try:
                response = await self._probe_client.get(url)
            except httpx.RequestError:
                continue
            if response.status_code == 200:
                start_new_epoch(replica.engine, "replica came back")
                replica.up = True
                self.stats.revived += 1
                self._changed.set()
                return


def start_new_epoch(engine: VLLMEngine, reason: str) -> None:
    """Forget what the server held: its image cache is gone (a restart, a pause for new weights).
    `new_epoch` where the client has it, else `forget_server_cache`."""
    new_epoch = getattr(engine, "new_epoch", None)
    if new_epoch is not None:
        new_epoch(reason)
    else:
        engine.forget_server_cache()


def read_servers_file(text: str) -> list[str]:
    """Server URLs, one a line; blank lines and `#` comments are skipped."""
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


__all__ = ["EnginePool", "PoolStats", "ReplicaStats", "read_servers_file", "start_new_epoch"]
