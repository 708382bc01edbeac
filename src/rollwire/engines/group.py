"""A GRPO group's shared first prompt as one request with `n = G`.

The members of a group start from the same prompt, so their first requests are identical but for
the sampling seed. `GroupedEngine` wraps an engine that samples `n` completions per request (vLLM,
the local engine) and coalesces concurrent requests with the same session, prompt ids, images and
sampling (the seed and request id aside) into one request with `n` = their number, up to `group`; each
member gets its own completion. The server prefills the prompt once and receives its images once.

Waiting: with `members` (a session id -> how many of its requests will come; the runner passes
each group's members to run) a session's first batch is sent as soon as they have all joined, and
that session's later requests go straight through; a member that never comes (its environment
failed) holds the batch `window_s` after the last one joined. Without `members`, a batch is sent
when `group` have joined or `window_s` after the last joined. Seeds: the batch is sampled with its
first member's seed, so its completions are reproducible for the same batch, not per member.
Later turns differ by their completions and are never coalesced. Opt-in
(`run_rollouts(group_requests=True)`, `rollwire rollout --group-requests`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .types import Engine, GenerateRequest, GenerateResult


@dataclass
class _Batch:
    members: list[GenerateRequest] = field(default_factory=list)
    result: asyncio.Future[GenerateResult] | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class GroupStats:
    requests: int = 0  # requests sent to the wrapped engine
    coalesced: int = 0  # member requests answered from a shared request


class GroupedEngine:
    """An `Engine` that sends identical concurrent requests of a group as one `n = G` request."""

    def __init__(self, engine: Engine, *, group: int, window_s: float = 0.05,
                 members: Mapping[str, int] | None = None) -> None:
        self.engine = engine
        self.group = group
        self.window_s = window_s
        self.stats = GroupStats()
        self._members = None if members is None else dict(members)  # sessions whose first batch is to come
        self._open: dict[Any, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        target = self.group
        if self._members is not None:  # a listed session's first batch, else alone
            target = min(target, self._members.get(request.session_id or "", 0))
        if target <= 1 or request.sampling.n != 1:
            self.stats.requests += 1
            return await self.engine.generate(request)
        key = (request.session_id, tuple(request.prompt_token_ids), request.images,
               msgspec.structs.replace(request.sampling, seed=None))
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(result=loop.create_future())
        if batch.timer is not None:
            batch.timer.cancel()
        batch.timer = loop.call_later(self.window_s, self._flush, key, batch)  # from the last member to join
        index = len(batch.members)
        batch.members.append(request)
        if len(batch.members) >= target:
            self._flush(key, batch)
        assert batch.result is not None
        result = await asyncio.shield(batch.result)  # one member cancelled does not cancel the others
        if len(result.completions) <= index:
            raise RuntimeError(f"the engine answered {len(result.completions)} completions for n={index + 1}")
        mine = [result.completions[index]]
        if index:  # the bytes went once: count them on the first member only
            return msgspec.structs.replace(result, completions=mine, bytes_sent=0, image_bytes_sent=0,
                                           cache_misses=0)
        return msgspec.structs.replace(result, completions=mine)

    def _flush(self, key: Any, batch: _Batch) -> None:
        if self._open.get(key) is not batch:
            return
        del self._open[key]
        if self._members is not None:  # the session's first batch is sent: its later turns go alone
            self._members.pop(key[0], None)
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        assert batch.result is not None
        first = batch.members[0]
        n = len(batch.members)
        self.stats.requests += 1
        self.stats.coalesced += n - 1
        try:
            request = msgspec.structs.replace(first, sampling=msgspec.structs.replace(first.sampling, n=n))
            result = await self.engine.generate(request)
        except BaseException as exc:  # every member sees the shared request's failure
            batch.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        batch.result.set_result(result)

    async def connect(self) -> None:
        connect = getattr(self.engine, "connect", None)
        if connect is not None:
            await connect()

    async def close(self) -> None:
        await self.engine.close()
