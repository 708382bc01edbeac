"""Rollouts/s against the number of `rollwire serve` replicas behind an `EnginePool`, as a ratio
to one replica in the same run, and how often each image went to each replica with its pixels.

Each replica is its own `rollwire serve` process (the embedded tiny Qwen2-VL). The same workload
(shapes, P prompts x G samples, T turns) runs against 1..R replicas, after one warm-up run each.
On a machine with fewer cores than replicas the ratio may be <= 1: the replicas share the cores.
"images sent with pixels" counts image occurrences that carried pixels, "unique images" the
distinct images of the run, "needed" each replica's distinct images (the floor: once per replica
that needs it), "sent by id" the occurrences that went as an id only.
Run: python scripts/bench_replicas.py [--replicas 4] [--prompts 8] [--group 2] [--turns 3]
     [--concurrency 8] [--group-requests] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx

from rollwire.engines.pool import EnginePool
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts
from rollwire.rollout.runner import group_id
from rollwire.tiny_model import ensure_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(model_dir: str, n: int) -> Iterator[list[str]]:
    """`n` rollwire serve processes; their URLs once each answers /health."""
    procs, urls = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rollwire.cli", "serve", "--model", model_dir, "--port", str(port),
                 "--served-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=os.environ | {"OMP_NUM_THREADS": "1"}))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{url} did not come up")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


async def one(urls: list[str], renderer: Any, config: RunConfig,
              group_requests: bool = False) -> dict[str, Any]:
    results: list[Any] = []
    async with EnginePool.for_renderer(urls, renderer) as pool:
        # warm-up (pixel-format probe, caches)
        await run_rollouts(config, renderer, pool, progress=False, group_requests=group_requests)
        warm = {s.url: (s.images_sent, s.images_by_id) for s in pool.replica_stats()}
        pool.forget_server_cache()
        config = dataclasses.replace(config, seed=config.seed + 1)  # new images, sent again
        start = time.perf_counter()
        summary = await run_rollouts(config, renderer, pool, on_result=results.append, progress=False,
                                     group_requests=group_requests)
        seconds = time.perf_counter() - start
        needed: dict[str, set[str]] = defaultdict(set)
        for r in results:
            url = pool.replica_of(group_id(config, r.trajectory.prompt_index))
            needed[str(url)].update(r.trajectory.image_ids)
        sent = {s.url: s.images_sent - warm[s.url][0] for s in pool.replica_stats()}
        by_id = {s.url: s.images_by_id - warm[s.url][1] for s in pool.replica_stats()}
    return {"replicas": len(urls), "rollouts": summary.done + summary.failed, "failed": summary.failed,
            "seconds": seconds, "rollouts_per_s": (summary.done + summary.failed) / seconds,
            "unique_images": len(set().union(*needed.values())),
            "images_needed": sum(len(v) for v in needed.values()), "images_sent": sum(sent.values()),
            "images_by_id": sum(by_id.values()), "referenced_images": summary.referenced_images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--group-requests", action="store_true", help="a group's first turn as one n=G request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model_dir = str(ensure_tiny_model("qwen2_vl"))
    renderer = create_renderer(model_dir)
    config = RunConfig(env="shapes", n_prompts=args.prompts, group=args.group, concurrency=args.concurrency,
                       rollout=RolloutConfig(max_turns=args.turns, max_tokens=8))
    rows = []
    with serve(model_dir, args.replicas) as urls:
        for n in range(1, args.replicas + 1):
            rows.append(asyncio.run(one(urls[:n], renderer, config, args.group_requests)))
    base = rows[0]["rollouts_per_s"]
    for row in rows:
        row["ratio_to_1"] = row["rollouts_per_s"] / base
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"{args.prompts} prompts x {args.group} samples x {args.turns} turns, concurrency {args.concurrency}, "
          f"{'group requests, ' if args.group_requests else ''}{os.cpu_count()} cores")
    print("| replicas | rollouts/s | ratio to 1 | images sent with pixels | unique images | needed (once per "
          "replica) | sent by id | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['replicas']} | {row['rollouts_per_s']:.2f} | {row['ratio_to_1']:.2f} | {row['images_sent']} | "
              f"{row['unique_images']} | {row['images_needed']} | {row['images_by_id']} | {row['failed']} |")


if __name__ == "__main__":
    main()
