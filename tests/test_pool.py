"""The engine pool against real `rollwire serve` replicas: session affinity (a GRPO group on one
replica, `X-Session-ID` on every request), images once per replica, least-loaded placement, and
failover when a replica dies mid-run (no completed rollout lost, its sessions finish elsewhere)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollwire.engines.pool import EnginePool, read_servers_file
from rollwire.engines.server import EngineServer
from rollwire.engines.vllm import RetryPolicy
from rollwire.errors import EngineUnavailableError, ServerError
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.rollout.runner import group_id
from rollwire.store import RunReader


class Recorder(httpx.AsyncBaseTransport):
    """A real HTTP transport that notes (port, path, X-Session-ID) of every request it sends."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[int, str, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.port or 0, request.url.path, request.headers.get("x-session-id")))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def model_dir(tiny: Callable[[str], Path]) -> Path:
    return tiny("qwen2_vl")


@pytest.fixture(scope="module")
def renderer(model_dir: Path) -> Any:
    return create_renderer(model_dir)


@pytest.fixture
def servers(replicas: list[EngineServer]) -> Iterator[list[EngineServer]]:
    """The two replicas (conftest); a test that stopped one gets it back on the same port afterwards."""
    ports = [s.port for s in replicas]
    yield replicas
    for k, server in enumerate(replicas):
        if server.port != ports[k]:  # stopped (its port reads 0)
            replicas[k] = EngineServer(server.model_dir, served_model_name="tiny", port=ports[k]).start()
        else:
            server.forget_cache()


def config(**kw: Any) -> RunConfig:
    kw.setdefault("rollout", RolloutConfig(max_turns=2, max_tokens=4))
    return RunConfig(env="shapes", seed=3, **kw)


async def test_a_group_stays_on_one_replica_and_each_image_goes_once_per_replica(
        servers: list[EngineServer], renderer: Any) -> None:
    recorder = Recorder()
    pool = EnginePool.for_renderer([s.url for s in servers], renderer, transport=recorder)
    cfg = config(n_prompts=2, group=2, concurrency=1)
    results: list[Any] = []
    before = {s.port: s.stats().images_received for s in servers}
    async with pool:
        summary = await run_rollouts(cfg, renderer, pool, on_result=results.append, progress=False)
    assert summary.done == 4 and summary.failed == 0
    generates = [(port, session) for port, path, session in recorder.seen if path.endswith("/generate")]
    assert len(generates) == summary.turns and all(session is not None for _, session in generates)
    ports_of: dict[str | None, set[int]] = defaultdict(set)
    for port, session in generates:
        ports_of[session].add(port)
    assert set(ports_of) == {group_id(cfg, i) for i in range(2)}
    assert all(len(ports) == 1 for ports in ports_of.values())  # a group never leaves its replica
    by_port = {s.port: s for s in servers}
    assert {next(iter(p)) for p in ports_of.values()} == set(by_port)  # new groups spread over both
    # Each replica received each image of its groups exactly once (group members share them).
    images_of: dict[int, set[str]] = defaultdict(set)
    for r in results:
        port = next(iter(ports_of[group_id(cfg, r.trajectory.prompt_index)]))
        images_of[port].update(r.trajectory.image_ids)
    for port, server in by_port.items():
        assert server.stats().images_received - before[port] == len(images_of[port]) > 0
    assert sum(s.images_sent for s in pool.replica_stats()) == sum(len(v) for v in images_of.values())


async def test_a_dead_replica_fails_over_and_loses_no_completed_rollout(
        servers: list[EngineServer], renderer: Any) -> None:
    recorder = Recorder()
    pool = EnginePool.for_renderer([s.url for s in servers], renderer, transport=recorder, probe_s=0.2,
                                   retry=RetryPolicy(deadline_s=0.5, base_s=0.05, cap_s=0.1))
    cfg = config(n_prompts=4, group=2, concurrency=4, rollout=RolloutConfig(max_turns=3, max_tokens=2))
    victim, survivor = servers[1], servers[0]
    victim_port, before, ok0 = victim.port, survivor.stats().images_received, victim.stats().ok
    results: list[Any] = []

    async def kill_when_busy() -> None:
        while victim.stats().ok < ok0 + 2:  # the victim has answered some turns: sessions are pinned to it
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.stop)

    async with pool:
        killer = asyncio.create_task(kill_when_busy())
        summary = await run_rollouts(cfg, renderer, pool, on_result=results.append, progress=False)
        await killer
        stats = pool.replica_stats()
    assert summary.done == 8 and summary.failed == 0  # every rollout finished, none lost
    assert pool.stats.failovers >= 1 and pool.stats.sessions_moved >= 1
    assert [s.up for s in stats] == [True, False] and stats[1].failures == 1
    generates = [(port, session) for port, path, session in recorder.seen if path.endswith("/generate")]
    moved = {session for port, session in generates if port == victim_port}
    after = [session for port, session in generates if port == survivor.port and session in moved]
    assert after  # sessions that were on the dead replica went on on the other one
    # Their images were re-sent in full to the survivor: it received every image of every rollout
    # (some more than once: group members in flight together each carry it).
    assert survivor.stats().images_received - before >= len({i for r in results for i in r.trajectory.image_ids})


async def test_a_replica_that_comes_back_is_used_again(servers: list[EngineServer], renderer: Any) -> None:
    a, b = servers
    port, url = b.port, b.url
    b.stop()
    pool = EnginePool.for_renderer([a.url, url], renderer, probe_s=0.1,
                                   retry=RetryPolicy(deadline_s=0.3, base_s=0.05, cap_s=0.1))
    async with pool:
        await pool.connect()  # one replica is enough to start
        assert [r.up for r in pool.replica_stats()] == [True, False]
        revived = servers[1] = EngineServer(b.model_dir, served_model_name="tiny", port=port).start()
        for _ in range(100):
            if pool.replica_stats()[1].up:
                break
            await asyncio.sleep(0.05)
        assert pool.stats.revived == 1
        summary = await run_rollouts(config(n_prompts=2, concurrency=2), renderer, pool, progress=False)
        assert summary.done == 2 and revived.stats().ok > 0  # new sessions reach it again


async def test_no_replica_up_is_a_typed_error(renderer: Any) -> None:
    pool = EnginePool.for_renderer(["http://127.0.0.1:9", "http://127.0.0.1:10"], renderer,
                                   retry=RetryPolicy(deadline_s=0.2, base_s=0.05, cap_s=0.1), deadline_s=0.3)
    async with pool:
        with pytest.raises(ServerError, match="no server of the pool can be reached"):
            await pool.connect()
    with pytest.raises(EngineUnavailableError, match="repeat"):
        EnginePool.for_renderer(["http://a:1", "http://a:1"], renderer)


def test_servers_file_lines() -> None:
    assert read_servers_file("http://a:1\n\n# spare\nhttp://b:2  # second\n") == ["http://a:1", "http://b:2"]


def test_the_cli_takes_several_servers(servers: list[EngineServer], tiny: Callable[[str], Path],
                                       tmp_path: Path) -> None:
    """`rollwire rollout --server A --servers-file F`: one run over both replicas (a real subprocess)."""
    (tmp_path / "servers.txt").write_text(f"# the second replica\n{servers[1].url}\n")
    before = [s.stats().ok for s in servers]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "rollwire.cli", "rollout", "--env", "shapes", "--out", str(tmp_path / "run"),
         "--model", str(tiny("qwen2_vl")), "--server", servers[0].url, "--servers-file", str(tmp_path / "servers.txt"),
         "-n", "2", "--group", "1", "--max-turns", "1", "--max-tokens", "2", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert all(s.stats().ok > b for s, b in zip(servers, before, strict=True))  # both replicas served
    assert len(list(RunReader(tmp_path / "run").rows())) == 2
