"""One full pass of CPython's garbage collector over what 256 live 8-turn rollouts hold per token.

A live rollout keeps every step's prompt ids, completion ids and logprobs (and the rendered prompt
it may extend) until it ends; the collector's full pass walks each element of every list it
tracks, and stops tracking a tuple of numbers. This runs K real rollouts (8 turns, a new 1024²
picture each turn, the tiny Qwen2-VL renderer, an engine that answers at once), keeps their
trajectories, copies their per-token state COPIES times over (new objects, the same values) to stand
for COPIES x K live rollouts, and times `gc.collect()` over it:

- rollwire: the steps as they are (tuples; a prompt's labels are a few runs);
- previous (baseline, same process, same values): what the release before held per step: the
  prompt ids, a message index and a sampled flag per prompt token, the completion ids and the
  logprobs, each a list;
- rollwire with the start-up heap frozen (`gc.freeze()` once the modules and the model are
  loaded, as vLLM's API server does): a full pass then walks only what was made after it.

    .venv/bin/python scripts/gc_pass.py            # K=16 x 16 copies = 256 rollouts
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from functools import partial
from typing import Any

from rollwire.bench.instant import Pictures, run_rollouts
from rollwire.bench.memory import _picture
from rollwire.render import create_renderer
from rollwire.tiny_model import ensure_tiny_model


def timed_pass(reps: int = 5) -> tuple[float, float]:
    """Median (thread CPU, wall) seconds of a full collection."""
    cpu, wall = [], []
    for _ in range(reps):
        c, w = time.thread_time(), time.perf_counter()
        gc.collect()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def held(steps: list[Any], copies: int) -> list[tuple[tuple[Any, ...], ...]]:
    """New tuples of the steps' values, `copies` times (tuple() of a tuple is the same object). The
    first pass stops tracking them, as the young collection does a turn after a step is made; the
    median is of the passes after it."""
    return [(tuple([*s.prompt_ids]), tuple([*s.completion_ids]), tuple([*(s.completion_logprobs or ())]))
            for _ in range(copies) for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16, help="real rollouts")
    parser.add_argument("--copies", type=int, default=16, help="copies of their per-token state")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    renderer: Any = create_renderer(ensure_tiny_model("qwen2_vl"))
    envs = [Pictures(partial(_picture, args.side, i), args.turns) for i in range(args.k)]
    results = asyncio.run(run_rollouts(renderer, envs, args.turns))
    steps = [s for r in results for s in r.trajectory.steps]
    tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in steps) * args.copies
    del results, envs
    gc.collect()
    base_cpu, base_wall = timed_pass()

    # new tuples (tuple() of a tuple is the same object); the first pass stops tracking them, as the
    # young collection does a turn after a step is made; the median is the passes after it
    ours = [(tuple([*s.prompt_ids]), tuple([*s.completion_ids]), tuple([*(s.completion_logprobs or ())]))
            for _ in range(args.copies) for s in steps]
    ours_cpu, ours_wall = timed_pass()
    del ours
    previous = [(list(s.prompt_ids), [k] * len(s.prompt_ids), [False] * len(s.prompt_ids), list(s.completion_ids),
                 list(s.completion_logprobs or ())) for _ in range(args.copies) for k, s in enumerate(steps)]
    prev_cpu, prev_wall = timed_pass()
    del previous
    gc.collect()
    gc.freeze()  # the start-up heap (modules, the tokenizer, torch): what vLLM's server freezes after start-up
    ours = held(steps, args.copies)
    frozen_cpu, frozen_wall = timed_pass()
    del ours
    n = args.k * args.copies
    print(f"{n} rollouts x {args.turns} turns of {args.side}² pictures held: {tokens / 1e6:.1f} M token slots")
    print(f"full GC pass, nothing held: {base_cpu * 1e3:.1f} ms CPU ({base_wall * 1e3:.1f} ms wall)")
    print(f"full GC pass, rollwire (tuples): {ours_cpu * 1e3:.1f} ms CPU ({ours_wall * 1e3:.1f} ms wall)")
    print(f"full GC pass, previous (lists): {prev_cpu * 1e3:.1f} ms CPU ({prev_wall * 1e3:.1f} ms wall)")
    print(f"full GC pass, rollwire, start-up heap frozen (gc.freeze): {frozen_cpu * 1e3:.1f} ms CPU "
          f"({frozen_wall * 1e3:.1f} ms wall)")


if __name__ == "__main__":
    main()
