"""Weight updates between rollout steps: pause generation, let the trainer update the servers,
resume with a new policy version.

`PausableEngine` wraps any `Engine` (a `VLLMEngine`, an `EnginePool`, the local engine).
`update_weights(version, apply)` closes the gate (new requests wait), lets the requests in flight
finish (`mode="wait"`) or aborts them (`mode="abort"`: they are sent again after the resume, so
the turn is sampled by the new weights and no rollout fails), pauses each server that has vLLM's
RL endpoints (`/pause`, `/update_weight_version`, `/resume`; `VLLM_SERVER_DEV_MODE=1`), awaits
the trainer's `apply()`, resumes, and starts a new server epoch on every client (vLLM wipes its
multimodal cache on pause, so images are sent in full again). Every completion carries the policy
version that sampled it: the server's `weight_versions` label where it reports one, else this
gate's version at the time of the request.

Across processes (Ray rollout workers) each worker's gate runs with `control_servers=False` and a
driver-side handle (`rollwire.rollout.ray_gate.RayWeightGate`) closes them all, then pauses each
server once with `post_to_servers` / `label_servers` below.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import httpx
import msgspec

from rollwire.errors import EngineError

from .pool import start_new_epoch
from .types import Engine, GenerateRequest, GenerateResult

PauseMode = Literal["wait", "abort"]
Apply = Callable[[], Awaitable[Any] | Any]


async def paused_update(gate: Any, version: int | str | None, apply: Apply | None, mode: PauseMode) -> None:
    """What an update is, for any gate with `pause_generation`, `resume_generation` and
    `policy_version` (`PausableEngine`, the Ray workers' `RayWeightGate`): pause, `await apply()`,
    resume with `version`; if `apply` fails, resume on the old version and let the error propagate."""
    await gate.pause_generation(mode)
    try:
        if apply is not None:
            outcome = apply()
            if inspect.isawaitable(outcome):
                await outcome
    except BaseException:
        await gate.resume_generation(gate.policy_version)
        raise
    await gate.resume_generation(version)


class PausableEngine:
    """An `Engine` a trainer can pause for a weight update (see the module docstring)."""

    def __init__(self, engine: Engine, *, version: int | str | None = 0, control_servers: bool = True,
                 control_timeout_s: float = 600.0, labels_stale: bool = False) -> None:
        self.inner = engine
        self.policy_version = version
        self.control_servers = control_servers
        self.updates = 0
        self.resent = 0  # requests aborted by a pause and sent again after it
        self._open = asyncio.Event()
        self._open.set()
        self._in_flight: set[asyncio.Task[GenerateResult]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborting: set[asyncio.Task[GenerateResult]] = set()
        self._lock = asyncio.Lock()
        self._labelled = False  # the servers carry this gate's version label
        self._override = labels_stale  # a server could not be relabelled: its weight_versions label is stale
        self._timeout = control_timeout_s

    @property
    def clients(self) -> list[Any]:
        """The HTTP clients behind the engine (a pool's replicas, or the engine itself)."""
        engines = getattr(self.inner, "engines", None)
        if engines is not None:
            return list(engines)
        return [self.inner] if hasattr(self.inner, "base_url") else []

    async def connect(self) -> None:
        """Reach the engine, and label the servers' weights with this gate's version (so that the
        `weight_versions` they report and this gate's agree from the first request)."""
        connect = getattr(self.inner, "connect", None)
        if connect is not None:
            await connect()
        if self.control_servers and self.policy_version is not None and not self._labelled:
            self._labelled = True
            await self._label(self.policy_version)

    async def server_version(self) -> str | None:
        server_version = getattr(self.inner, "server_version", None)
        return await server_version() if server_version is not None else None

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> PausableEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        while True:
            await self._open.wait()
            version = self.policy_version
            task = asyncio.ensure_future(self.inner.generate(request))
            self._in_flight.add(task)
            self._idle.clear()
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if task not in self._aborting:  # our caller was cancelled, not the pause
                    task.cancel()
                    raise
                self.resent += 1
                continue
            finally:
                self._in_flight.discard(task)
                self._aborting.discard(task)
                if not self._in_flight:
                    self._idle.set()
            if not self._open.is_set() and any(c.finish_reason == "abort" for c in result.completions):
                self.resent += 1  # the server aborted it for the pause: again, after the resume
                continue
            return _tagged(result, version, override=self._override)

    async def pause_generation(self, mode: PauseMode = "wait") -> None:
        """New requests wait; those in flight finish (`wait`) or are aborted and queued again (`abort`)."""
        self._open.clear()
        if mode == "abort":
            for task in list(self._in_flight):
                self._aborting.add(task)
                task.cancel()
        await self._idle.wait()
        if self.control_servers:
            await self._control(f"/pause?mode={mode}")

    async def resume_generation(self, version: int | str | None, *, labels_stale: bool = False) -> None:
        """Resume with a new policy version; each server starts a new image epoch. `labels_stale`:
        whoever controls the servers could not relabel one, so completions carry `version`."""
        if self.control_servers and version is not None:
            await self._label(version)
        if self.control_servers:
            await self._control("/resume")
        self._override = self._override or labels_stale
        for client in self.clients:
            start_new_epoch(client, f"weights updated to version {version}")
        self.policy_version = version
        self._labelled = True
        self.updates += 1
        self._open.set()

    async def update_weights(self, version: int | str | None, apply: Apply | None = None, *,
                             mode: PauseMode = "wait") -> None:
        """Pause, `await apply()` (the trainer pushes its weights), resume with `version`. If
        `apply` fails, generation resumes on the old version and the error propagates."""
        async with self._lock:
            await paused_update(self, version, apply, mode)

    async def _label(self, version: int | str) -> None:
        """Label the servers' weights `version`; where one cannot be (no RL endpoints), the label
        it reports is stale, so this gate's version is recorded instead."""
        if await label_servers([c.base_url for c in self.clients], version, timeout_s=self._timeout):
            self._override = True

    async def _control(self, path: str, body: Any = None) -> list[str]:
        return await post_to_servers([c.base_url for c in self.clients], path, body, timeout_s=self._timeout)


async def label_servers(urls: Sequence[str], version: int | str, *, timeout_s: float = 600.0) -> list[str]:
    """`/update_weight_version` on every server; those that cannot be relabelled (404) are returned."""
    return await post_to_servers(urls, "/update_weight_version", {"new_version": str(version)},
                                      timeout_s=timeout_s)


async def post_to_servers(urls: Sequence[str], path: str, body: Any = None, *,
                               timeout_s: float = 600.0) -> list[str]:
    """POST to every server that has vLLM's RL endpoints; those without (404) are returned."""
    if not urls:
        return []
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        answers = await asyncio.gather(*(
            http.post(url + path, content=None if body is None else msgspec.json.encode(body),
                      headers={"content-type": "application/json"}) for url in urls), return_exceptions=True)
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, BaseException):
            raise EngineError(f"{url}{path} failed: {type(answer).__name__}: {answer}")
        if answer.status_code not in (200, 404):
            raise EngineError(f"{url}{path} answered {answer.status_code}: {answer.text[:200]}")
    return [url for url, answer in zip(urls, answers, strict=True)
            if not isinstance(answer, BaseException) and answer.status_code == 404]


def _tagged(result: GenerateResult, version: int | str | None, *, override: bool) -> GenerateResult:
    """The completions with the gate's version where the server reported none (or everywhere)."""
    if version is None or all(c.policy_version is not None and not override for c in result.completions):
        return result
    completions = [c if c.policy_version is not None and not override
                   else msgspec.structs.replace(c, policy_version=version) for c in result.completions]
    return msgspec.structs.replace(result, completions=completions)


__all__ = ["PausableEngine", "PauseMode", "label_servers", "paused_update", "post_to_servers"]
