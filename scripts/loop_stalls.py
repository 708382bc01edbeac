"""Where the event loop stalls in one `rollwire bench memory` configuration.

Runs `python -m rollwire.bench.memory ARGS` in this process with asyncio's debug mode logging every
callback over 50 ms (`slow_callback_duration`), and `gc.callbacks` timing every garbage-collector
pass; prints the pass counts and maxima per generation on stderr at exit. MODE: `debug` (that),
`debugfreeze` (also `gc.freeze()` of the start-up objects first), `off` (the collector disabled).

    PYTHONASYNCIODEBUG=1 .venv/bin/python scripts/loop_stalls.py debug --k 256 --cap 6442450944
"""

import atexit
import gc
import importlib
import json
import logging
import runpy
import sys
import time

mode = sys.argv.pop(1)
passes: dict[int, list[float]] = {0: [], 1: [], 2: []}
started: dict[str, float] = {}


def _time_pass(phase: str, info: dict) -> None:
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        passes[info["generation"]].append(time.perf_counter() - started["t"])


def _report() -> None:
    out = {g: {"n": len(v), "max_ms": round(max(v, default=0) * 1e3, 1), "sum_s": round(sum(v), 2)}
           for g, v in passes.items()}
    print("GC", json.dumps(out), file=sys.stderr)


gc.callbacks.append(_time_pass)
atexit.register(_report)
if mode.endswith("freeze"):
    # the start-up objects: rollwire's modules, transformers, numpy (71k objects in the run quoted)
    for name in ("numpy", "transformers", "rollwire.bench.instant", "rollwire.bench.memory", "rollwire.store"):
        importlib.import_module(name)
    print("objects frozen", len(gc.get_objects()), file=sys.stderr)
    gc.collect()
    gc.freeze()
if mode.startswith("debug"):
    import asyncio.base_events

    asyncio.base_events.BaseEventLoop.slow_callback_duration = 0.05  # type: ignore[attr-defined]
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)d %(name)s %(message)s")
if mode == "off":
    gc.disable()
sys.argv[0] = "rollwire.bench.memory"
runpy.run_module("rollwire.bench.memory", run_name="__main__")
