"""Where the event loop stalls in one `rollwire bench memory` configuration.

Runs `python -m rollwire.bench.memory ARGS` in this process with asyncio's debug mode logging every
callback over 50 ms (`slow_callback_duration`), and `gc.callbacks` timing every garbage-collector
pass (wall and the thread's CPU time); prints the pass counts and maxima per generation on stderr
at exit. MODE: `debug` (that),
`debugfreeze` (also `gc.freeze()` of the start-up objects first), `off` (the collector disabled),
`saveall` (what the collector frees is kept and named at exit), `gc` (only the pass timing).

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
passes: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}  # (wall, thread CPU) seconds
started: dict[str, float] = {}
costly: list[tuple[float, int, int]] = []  # (CPU seconds, generation, objects collected) of each pass


def _time_pass(phase: str, info: dict) -> None:
    if phase == "start":
        started["t"], started["cpu"] = time.perf_counter(), time.thread_time()
    else:
        cpu = time.thread_time() - started["cpu"]
        passes[info["generation"]].append((time.perf_counter() - started["t"], cpu))
        costly.append((cpu, info["generation"], info["collected"]))


def _report() -> None:
    # wall includes the collecting thread waiting for a core; CPU is the pass's own work
    out = {g: {"n": len(v), "max_ms": round(max((w for w, _ in v), default=0) * 1e3, 1),
               "max_cpu_ms": round(max((c for _, c in v), default=0) * 1e3, 1), "sum_s": round(sum(w for w, _ in v), 2)}
           for g, v in passes.items()}
    print("GC", json.dumps(out), file=sys.stderr)
    top = [{"cpu_ms": round(c * 1e3, 1), "generation": g, "collected": n} for c, g, n in sorted(costly)[-5:]]
    print("GC costliest passes", json.dumps(top), file=sys.stderr)


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
if mode == "saveall":  # what the collector frees: kept in gc.garbage instead, and named at exit
    gc.set_debug(gc.DEBUG_SAVEALL)

    def _garbage() -> None:
        kinds: dict[str, int] = {}
        for obj in gc.garbage:
            kinds[type(obj).__qualname__] = kinds.get(type(obj).__qualname__, 0) + 1
        print("GC garbage", json.dumps(sorted(kinds.items(), key=lambda kv: -kv[1])[:30]), file=sys.stderr)

    atexit.register(_garbage)
sys.argv[0] = "rollwire.bench.memory"
runpy.run_module("rollwire.bench.memory", run_name="__main__")
