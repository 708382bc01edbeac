"""Event-loop lag with K concurrent image rollouts: rendering off the loop (rollwire) against
rendering on it (the baseline, the loop's `_off_loop` replaced by a direct call), side by side in
one process, against an instant engine (so only rollwire's own work is measured).

A 10 ms ticker measures how late the loop wakes it; also reported: rollouts/s.
Run: python benchmarks/bench_loop_lag.py [--k 64] [--side 1024] [--turns 4]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
from _report import write_section
from PIL import Image

import rollwire.rollout.loop as loop_module
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.features import FeatureStore, VisionConfig
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer
from rollwire.rollout import EnvStep, Observation, RolloutConfig, run_rollout
from rollwire.tiny_model import ensure_tiny_model

COMMAND = "python benchmarks/bench_loop_lag.py"


class Pictures:
    """Each turn shows the next of a rollout's pre-made noise pictures (drawing costs nothing)."""

    name = "pictures"

    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images
        self.turn = 0

    def _ask(self) -> Message:
        return Message(role="user", content=(ImagePart(self.images[self.turn]), TextPart("How many?")))

    async def reset(self, seed: int) -> Observation:
        self.turn = 0
        return Observation(messages=[self._ask()])

    async def step(self, message: Message) -> EnvStep:
        self.turn += 1
        if self.turn >= len(self.images):
            return EnvStep(messages=[], reward=0.0, done=True)
        return EnvStep(messages=[self._ask()], reward=0.0)


class Instant:
    def __init__(self, renderer: Any) -> None:
        self.ids = [*renderer.tokenizer.encode_ids("2"), renderer.im_end_id]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        await asyncio.sleep(0)
        return GenerateResult(completions=[Completion(token_ids=self.ids, logprobs=[-1.0] * len(self.ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


async def _inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def measure(k: int, side: int, turns: int, *, off_loop: bool) -> dict[str, float]:
    model_dir = ensure_tiny_model("qwen2_vl")
    renderer = create_renderer(model_dir, feature_store=FeatureStore(VisionConfig.from_pretrained(model_dir)))
    engine = Instant(renderer)
    original = loop_module._off_loop
    loop_module._off_loop = original if off_loop else _inline  # type: ignore[assignment]
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    rng = np.random.default_rng(0)
    envs = [Pictures([Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(turns)])
            for _ in range(k)]
    tick = asyncio.ensure_future(ticker())
    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(
            run_rollout(env, renderer, engine, RolloutConfig(max_turns=turns, max_total_tokens=1 << 20),
                        seed=i, trajectory_id=f"r{i}")
            for i, env in enumerate(envs)))
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        await tick
        loop_module._off_loop = original  # type: ignore[assignment]
    failed = sum(r.trajectory.error is not None for r in results)
    return {"max": max(lags) * 1e3, "blocked": sum(lags) / seconds, "over50": sum(lag > 0.05 for lag in lags),
            "rollouts_s": k / seconds, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    base = asyncio.run(measure(args.k, args.side, args.turns, off_loop=False))
    ours = asyncio.run(measure(args.k, args.side, args.turns, off_loop=True))
    lines = [f"K={args.k} concurrent {args.turns}-turn rollouts, one new {args.side}² image per turn, instant engine.",
             "", "| rendering | max loop lag ms | ticks > 50 ms late | share of time the loop was blocked "
             "| rollouts/s | failed |", "|---|---|---|---|---|---|"]
    for name, r in (("on the loop (baseline)", base), ("in worker threads (rollwire)", ours)):
        lines.append(f"| {name} | {r['max']:.0f} | {int(r['over50'])} | {r['blocked']:.0%} | {r['rollouts_s']:.2f} "
                     f"| {int(r['failed'])} |")
    lines.append("")
    lines.append(f"max-lag ratio (rollwire / baseline): {ours['max'] / max(base['max'], 1e-9):.3f}; "
                 f"throughput ratio: {ours['rollouts_s'] / base['rollouts_s']:.2f}. The ticker wakes every 10 ms; "
                 "its lateness is how long the loop was held by one callback.")
    body = "\n".join(lines)
    print(body)
    write_section("loop lag", f"{COMMAND} --k {args.k} --side {args.side} --turns {args.turns}", body)


if __name__ == "__main__":
    main()
