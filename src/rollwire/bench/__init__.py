"""`rollwire bench`: each benchmark measures a rollwire figure beside its baseline in the same run.

One module per benchmark, each with `run(quick: bool, **options) -> Report`; `--quick` sizes are a
smoke test. `rollwire bench all --write docs/benchmarks.md` regenerates the benchmarks page.
"""

from __future__ import annotations

import importlib
from typing import Any

from rollwire.bench.report import Report

__all__ = ["BENCHMARKS", "Report", "run_benchmark"]

# Name -> what it compares (the order of docs/benchmarks.md).
BENCHMARKS: dict[str, str] = {
    "render": "per-turn prompt cost: rollwire's bridge vs HF full re-render, renderers 0.1.12, the floor",
    "features": "image features vs the resize + copy floor; a stored image vs a new one",
    "wire": "request bytes of a 32-turn image rollout in each wire mode vs resending",
    "codec": "transport codec encode/decode MB/s vs memcpy",
    "transport": "packed trajectories (refs + unique blobs) vs JSON of every image per step",
    "memory": "peak RSS and loop lag of K concurrent image rollouts vs the floor",
    "embedded": "embedded-engine rollouts/s on shapes: the inverse-CDF sampler vs torch.multinomial row by row",
    "e2e": "multi-turn image rollouts against a CPU vLLM: rollwire vs verifiers 0.4.0",
}


def run_benchmark(name: str, quick: bool = False, **options: Any) -> Report:
    if name not in BENCHMARKS:
        raise KeyError(f"no benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    module = importlib.import_module(f"rollwire.bench.{name}")
    report: Report = module.run(quick=quick, **options)
    return report
