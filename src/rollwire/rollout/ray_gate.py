"""Weight updates across Ray rollout workers: one driver-side handle pauses every worker together.

`PausableEngine` gates one process. With `run_on_ray` each worker has its own, so the trainer (the
driver) holds a `RayWeightGate`: a small Ray actor keeps the gate's state (paused, pause mode,
policy version, a sequence number bumped on every change) and each worker follows it
(`follow_gate`: a background task long-polls the actor and pauses or resumes the worker's own
`PausableEngine`, which never talks to the servers itself). `update_weights` on the driver:

1. closes every worker's gate and waits until each has let its requests in flight finish (`wait`)
   or aborted them (`abort`; they go again after the resume, so no rollout fails);
2. pauses each server once (`/pause`), awaits the trainer's `apply()`, relabels the servers'
   weights (`/update_weight_version`) and resumes them (`/resume`);
3. tells the workers: each opens its gate with the new version and starts a new server epoch.

A worker that joins during a pause starts closed; one that finished or died is not waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping, Sequence
from typing import Any

from rollwire.engines.types import Engine
from rollwire.engines.weights import Apply, PausableEngine, PauseMode, label_servers, paused_update, post_to_servers
from rollwire.errors import EngineTimeoutError, RolloutConfigError

State = dict[str, Any]  # {"seq", "paused", "mode", "version", "stale"}: plain data across Ray


class GateState:
    """The gate's state, as a Ray actor (async: workers long-poll `watch` while the driver calls)."""

    def __init__(self, version: int | str | None) -> None:
        self.seq = 0
        self.paused = False
        self.mode: PauseMode = "wait"
        self.version = version
        self.stale = False  # a server could not be relabelled: completions carry the gate's version
        self.workers: set[str] = set()
        self.acked: set[str] = set()  # workers whose gate is closed and idle for pause `seq`
        self.stats: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()

    def state(self) -> State:
        return {"seq": self.seq, "paused": self.paused, "mode": self.mode, "version": self.version,
                "stale": self.stale}

    def _bump(self) -> None:
        self.seq += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def register(self, worker: str) -> State:
        self.workers.add(worker)
        return self.state()

    async def leave(self, worker: str, stats: Mapping[str, Any] | None = None) -> None:
        self.workers.discard(worker)
        if stats is not None:
            self.stats[worker] = dict(stats)

    async def watch(self, seq: int, timeout_s: float) -> State:
        """The state once it differs from `seq` (or after `timeout_s`, unchanged)."""
        if self.seq == seq:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.state()

    async def pause(self, mode: PauseMode) -> int:
        self.paused, self.mode = True, mode
        self.acked = set()
        self._bump()
        return self.seq

    async def ack(self, worker: str, seq: int, stats: Mapping[str, Any]) -> None:
        self.stats[worker] = dict(stats)
        if seq == self.seq:
            self.acked.add(worker)

    async def missing(self, seq: int, wait_s: float) -> list[str]:
        """The workers that have not closed their gate for pause `seq` (waiting up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while self.seq == seq and self.workers - self.acked and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return sorted(self.workers - self.acked) if self.seq == seq else []

    async def resume(self, version: int | str | None, stale: bool) -> None:
        self.paused, self.version, self.stale = False, version, stale
        self._bump()

    async def mark_stale(self) -> None:
        self.stale = True

    async def report(self) -> dict[str, Any]:
        return {"workers": sorted(self.workers), "stats": self.stats, **self.state()}


class RayWeightGate:
    """The driver's handle on every rollout worker's gate (see the module docstring).

    Create it after `ray.init()` and pass it to `run_on_ray(..., weights=gate)` (which gives it the
    servers and the workers' tasks), then `await gate.update_weights(version, apply)` from the
    trainer while the run goes on in another thread. `control_servers=False` leaves the servers to
    the trainer (it only closes and opens the workers' gates).
    """

    def __init__(self, version: int | str | None = 0, *, servers: Sequence[str] = (),
                 control_servers: bool = True, timeout_s: float = 600.0, name: str | None = None) -> None:
        ray = import_ray()
        self.name = name or f"rollwire-gate-{uuid.uuid4().hex[:12]}"
        self.policy_version = version
        self.servers = list(servers)
        self.control_servers = control_servers
        self.timeout_s = timeout_s
        self.updates = 0
        self._stale = False
        self._labelled = False
        self._tasks: dict[str, Any] = {}  # worker name -> its Ray task (done or dead: not waited for)
        self._lock = asyncio.Lock()
        self._actor = ray.remote(num_cpus=0)(GateState).options(name=self.name).remote(version)

    def bind(self, servers: Sequence[str], tasks: Mapping[str, Any] | None = None) -> None:
        """The servers the workers use (labelled with this gate's version once, before any request,
        so the `weight_versions` they report match it) and, once started, the workers' tasks."""
        if servers and not self.servers:
            self.servers = list(servers)
        if self.control_servers and self.servers and self.policy_version is not None and not self._labelled:
            self._labelled = True
            self._stale = bool(_run_sync(label_servers(self.servers, self.policy_version, timeout_s=self.timeout_s)))
            if self._stale:
                import_ray().get(self._actor.mark_stale.remote())
        if tasks is not None:
            self._tasks = dict(tasks)

    async def update_weights(self, version: int | str | None, apply: Apply | None = None, *,
                             mode: PauseMode = "wait") -> None:
        """Pause every worker and each server once, `await apply()`, resume with `version`. If
        `apply` fails, generation resumes on the old version and the error propagates."""
        async with self._lock:
            await paused_update(self, version, apply, mode)

    async def pause_generation(self, mode: PauseMode = "wait") -> None:
        """Close every worker's gate, wait until each is idle, then pause each server once. A worker
        still busy after `timeout_s` reopens every gate and raises `EngineTimeoutError`."""
        seq = await self._actor.pause.remote(mode)
        deadline = time.monotonic() + self.timeout_s
        while missing := await self._actor.missing.remote(seq, 0.25):
            gone = [w for w in missing if self._finished(w)]
            for worker in gone:  # finished, or dead (a dead worker's task ends with its error)
                await self._actor.leave.remote(worker)
            waiting = [w for w in missing if w not in gone]
            if waiting and time.monotonic() > deadline:
                await self._actor.resume.remote(self.policy_version, self._stale)
                raise EngineTimeoutError(f"rollout workers {waiting} did not pause within {self.timeout_s} s "
                                         f"(their requests were still in flight); generation resumed")
        if self.control_servers:
            await post_to_servers(self.servers, f"/pause?mode={mode}", timeout_s=self.timeout_s)

    async def resume_generation(self, version: int | str | None) -> None:
        """Relabel and resume the servers, then open every worker's gate with `version`."""
        if self.control_servers and version is not None:
            self._stale = self._stale or bool(await label_servers(self.servers, version, timeout_s=self.timeout_s))
        if self.control_servers:
            await post_to_servers(self.servers, "/resume", timeout_s=self.timeout_s)
        await self._actor.resume.remote(version, self._stale)
        self.policy_version = version
        self.updates += 1

    async def report(self) -> dict[str, Any]:
        """The gate's state, the workers following it and what each reported (`resent`: requests
        aborted by a pause and sent again; `updates`: resumes it followed; `policy_version`)."""
        report: dict[str, Any] = await self._actor.report.remote()
        return report

    def close(self) -> None:
        import_ray().kill(self._actor)

    def __enter__(self) -> RayWeightGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finished(self, worker: str) -> bool:
        task = self._tasks.get(worker)
        return task is not None and bool(import_ray().wait([task], timeout=0)[0])


@contextlib.asynccontextmanager
async def follow_gate(name: str, worker: str, engine: Engine) -> AsyncIterator[PausableEngine]:
    """`engine` behind a `PausableEngine` that the gate actor `name` pauses and resumes (a worker's
    side); closes `engine` on exit and tells the gate this worker is gone."""
    actor = import_ray().get_actor(name)
    state: State = await actor.register.remote(worker)
    gated = PausableEngine(engine, version=state["version"], control_servers=False, labels_stale=state["stale"])
    try:
        if state["paused"]:  # joined during a pause: start closed (nothing is in flight yet)
            await gated.pause_generation(state["mode"])
            await actor.ack.remote(worker, state["seq"], _stats(gated))
        follower = asyncio.create_task(_follow(actor, worker, gated, state["seq"]))
        try:
            yield gated
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            with contextlib.suppress(Exception):
                await actor.leave.remote(worker, _stats(gated))
    finally:
        await gated.close()


async def _follow(actor: Any, worker: str, gated: PausableEngine, seq: int) -> None:
    """Pause and resume `gated` as the gate's state changes. If the gate goes away the worker
    opens its own gate and carries on (its rollouts keep their recorded versions)."""
    try:
        while True:
            state: State = await actor.watch.remote(seq, 30.0)
            if state["seq"] == seq:
                continue
            seq = state["seq"]
            if state["paused"]:
                await gated.pause_generation(state["mode"])
                await actor.ack.remote(worker, seq, _stats(gated))
            else:
                await gated.resume_generation(state["version"], labels_stale=state["stale"])
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the gate actor died or was killed
        warnings.warn(f"worker {worker} lost its weight gate ({type(exc).__name__}: {exc}); "
                      f"it carries on at version {gated.policy_version}", stacklevel=1)
        await gated.resume_generation(gated.policy_version)


def _stats(gated: PausableEngine) -> dict[str, Any]:
    return {"resent": gated.resent, "updates": gated.updates, "policy_version": gated.policy_version}


def _run_sync(coro: Coroutine[Any, Any, Any] | Awaitable[Any]) -> Any:
    """Run `coro` to completion from sync code, whether or not this thread runs an event loop."""
    async def main() -> Any:
        return await coro

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RolloutConfigError("rollout workers need Ray: pip install 'rollwire[ray]'") from None
    return ray


__all__ = ["GateState", "RayWeightGate", "follow_gate"]
