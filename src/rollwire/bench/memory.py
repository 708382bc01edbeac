"""`rollwire bench memory`: peak RSS and event-loop lag of K concurrent 8-turn rollouts, one new
1024² picture per turn, against an instant in-process engine; one subprocess per configuration
(peak RSS is per process), so configurations cannot inflate each other.

floor = the child's RSS once everything is loaded, before any rollout, + K × (one picture as PIL
holds it + its uint8 features): each in-flight rollout needs at most its newest, not yet sent
picture. Loop lag: a 10 ms timer's lateness (p99 and max) while the rollouts run. Baseline
(smallest K): the same run with rendering on the event loop instead of worker threads.

A child stops itself when its RSS passes a cap (ROLLWIRE_BENCH_RSS_CAP_GIB, default 4.5: the
machine is shared); its row then says so and gives the turns done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from functools import partial
from typing import Any

import numpy as np

KS, QUICK_KS = (16, 64, 256), (2, 4)
STORE_GIB = 1.0  # the feature store's bound in these runs (FeatureStore(max_bytes=...))
TURNS, QUICK_TURNS = 8, 3
SIDE, QUICK_SIDE = 1024, 256
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _picture(side: int, rollout: int, turn: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng([rollout, turn])
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _dataset_file(folder: str, rollout: int, turn: int) -> str:
    """Where the dataset holds a picture: a JPEG file, named by its path."""
    return os.path.join(folder, f"{rollout}-{turn}.jpg")


def _write_dataset_file(folder: str, side: int, rollout: int, turn: int) -> None:
    _picture(side, rollout, turn).save(_dataset_file(folder, rollout, turn), format="JPEG", quality=90)


def child(k: int, turns: int, side: int, on_loop: bool, cap: int, *, archive: bool = True,
          store_gib: float = STORE_GIB, files: bool = False) -> dict[str, Any]:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import rollwire.rollout.loop as loop_module
    from rollwire.bench.instant import Pictures, run_rollouts
    from rollwire.features import FeatureStore
    from rollwire.render import create_renderer
    from rollwire.rollout.rundir import frozen_heap
    from rollwire.store import RunWriter
    from rollwire.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("qwen2_vl")
    default_store = create_renderer(model).feature_store
    assert default_store is not None
    store = FeatureStore(default_store.config, max_bytes=int(store_gib * 2**30))
    renderer: Any = create_renderer(model, feature_store=store)
    probe = _picture(side, 1 << 20, 0)
    features = store.get_or_process(probe)
    per_image = side * side * 4 + features.pixel_values.nbytes  # PIL keeps RGB as 4 bytes a pixel
    store.clear()
    misses_before = store.stats().misses  # the probe's
    del probe, features
    stack = contextlib.ExitStack()
    if files:  # the dataset is on disk before the rollouts start, as a user's is
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="rollwire-bench-dataset-"))
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            list(pool.map(lambda it: _write_dataset_file(folder, side, *it),
                          [(i, t) for i in range(k) for t in range(turns)]))
        envs = [Pictures(partial(_dataset_file, folder, i), turns) for i in range(k)]
    else:
        envs = [Pictures(partial(_picture, side, i), turns) for i in range(k)]
    idle = _rss()
    out: dict[str, Any] = {"k": k, "turns": turns, "side": side, "on_loop": on_loop, "idle_rss": idle,
                           "per_image_bytes": per_image, "capped": False, "archive": archive,
                           "store_bytes": store.max_bytes, "files": files}

    def watch() -> None:
        while True:
            if _rss() > cap:
                out.update(capped=True, peak_rss=_rss(), turns_done=sum(e.turn for e in envs))
                sys.stdout.write(json.dumps(out) + "\n")
                sys.stdout.flush()
                os._exit(0)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    if on_loop and hasattr(loop_module, "_off_loop"):
        async def inline(fn: Any, *args: Any) -> Any:
            return fn(*args)

        loop_module._off_loop = inline
    elif on_loop:
        out["on_loop_unavailable"] = True
    lags: list[float] = []

    results: list[Any] = []

    async def main(writer: RunWriter | None) -> None:
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t - 0.01)

        tick = asyncio.ensure_future(ticker())
        try:  # results are not returned: asyncio.run would repr them (all their token ids) at the end
            results.extend(await run_rollouts(renderer, envs, turns, writer=writer))
        finally:
            stop.set()
            await tick

    # The run directory is made and removed outside the loop: removing thousands of blobs is the
    # benchmark's own cleanup (seconds at K=256), not a stall of the rollouts it measures.
    with stack:
        writer = None
        if archive:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rollwire-bench-"))
            writer = stack.enter_context(RunWriter(run_dir, store))
        with frozen_heap():  # the start-up heap out of the collector's passes, as `rollwire rollout` does
            start = time.perf_counter()
            asyncio.run(main(writer))
            seconds = time.perf_counter() - start
    lag = np.array(lags or [0.0]) * 1e3
    out.update(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds=seconds,
               rollouts_s=k / seconds, turns_s=sum(len(r.trajectory.steps) for r in results) / seconds,
               failed=sum(r.trajectory.error is not None for r in results),
               lag_p99_ms=float(np.percentile(lag, 99)), lag_max_ms=float(lag.max()),
               processed_twice=store.stats().misses - misses_before - k * turns + store.stats().reloaded,
               errors=[r.trajectory.error.message for r in results if r.trajectory.error][:1])
    return out


def _spawn(k: int, turns: int, side: int, on_loop: bool, cap: int, archive: bool = True,
           files: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "rollwire.bench.memory", "--k", str(k), "--turns", str(turns), "--side", str(side),
           "--cap", str(cap), *(["--on-loop"] if on_loop else []), *([] if archive else ["--hold-originals"]),
           *(["--files"] if files else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child K={k} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _count(n: int) -> str:
    return f"{n:,}"


def run(quick: bool = False, ks: tuple[int, ...] | None = None) -> Any:
    from rollwire.bench.report import Report, Table

    turns, side = (QUICK_TURNS, QUICK_SIDE) if quick else (TURNS, SIDE)
    ks = ks or (QUICK_KS if quick else KS)
    cap = int(float(os.environ.get("ROLLWIRE_BENCH_RSS_CAP_GIB", "4.5")) * 2**30)
    table = Table(["K", "rollouts", "peak RSS", "floor", "peak / floor", "loop lag p99 ms", "loop lag max ms",
                   "rollouts/s", "images processed again"])
    rows = []
    for k in ks:
        # rollwire (a run directory archives each image when first seen), with PIL pictures and with
        # a dataset's JPEG files; the baselines: every image held until its rollout ends (no archive,
        # as before), and, at the smallest K, rendering on the loop.
        configs = [(False, True, False), (False, True, True), (False, False, False)]
        configs += [(True, True, False)] if k == min(ks) else []
        for on_loop, archive, files in configs:
            r = _spawn(k, turns, side, on_loop, cap, archive, files)
            floor = r["idle_rss"] + k * r["per_image_bytes"]
            r["floor_rss"] = floor
            rows.append(r)
            where = ("archived, rendering on the loop (baseline)" if on_loop else
                     "rollwire, JPEG files: archived as they are" if files else
                     "rollwire, PIL pictures: archived as TIFF" if archive else "every image held (baseline)")
            if r["capped"]:
                table.add(k, where, f"> {_gib(r['peak_rss'])} (stopped at the cap)", _gib(floor),
                          f"> {r['peak_rss'] / floor:.2f}×", "—", "—", "—", "—")
            else:
                table.add(k, where, _gib(r["peak_rss"]), _gib(floor), f"{r['peak_rss'] / floor:.2f}×",
                          _count(round(r["lag_p99_ms"])), _count(round(r["lag_max_ms"])), f"{r['rollouts_s']:.2f}",
                          _count(r["processed_twice"]) + (f" ({r['failed']} failed)" if r["failed"] else ""))
    ours = [r for r in rows if not r["on_loop"] and r["archive"] and not r.get("files")]
    biggest = ours[-1]
    summary = (f"K={biggest['k']}: peak RSS {_gib(biggest['peak_rss'])}"
               f"{' (stopped at the cap)' if biggest['capped'] else ''} vs a floor of {_gib(biggest['floor_rss'])} "
               f"(target ≤ 4 GB at K=256)")
    if not biggest["capped"]:
        summary += (f"; loop lag p99 {biggest['lag_p99_ms']:.0f} ms, max {_count(round(biggest['lag_max_ms']))} ms "
                    f"(target: no callback over 50 ms); {_count(biggest['processed_twice'])} of "
                    f"{_count(biggest['k'] * turns)} images processed again after an eviction")
        held = next((r for r in rows if r["k"] == biggest["k"] and not r["archive"]), None)
        if held is not None and not held["capped"]:
            summary += f"; {biggest['rollouts_s']:.2f} rollouts/s archived vs {held['rollouts_s']:.2f} held"
    return Report(
        name="memory", command="rollwire bench memory" + (" --quick" if quick else ""), summary=summary + ".",
        tables=[table],
        notes=[f"K concurrent {turns}-turn rollouts, one new {side}² noise picture per turn (made when shown, a PIL "
               "image; in the JPEG rows a dataset's file, written before the run, quality 90, named by its path), the "
               "tiny Qwen2-VL renderer, an engine that answers at once; one subprocess per row (peak RSS = its "
               "ru_maxrss). floor = the child's RSS before the rollouts + K × (one picture as PIL holds it + its "
               f"uint8 features). Rows that pass the RSS cap ({_gib(cap)}) are stopped there; the machine is shared. "
               f"The feature store is bounded at {STORE_GIB:g} GiB; rollwire's rows write a run directory (each image "
               "archived when first seen, rows written as rollouts end), as `rollwire rollout` does: a PIL picture "
               "as uncompressed TIFF, a file as its own bytes. The run directory is made and removed outside the "
               "timed loop. Every row freezes its start-up heap (`gc.freeze()`) before the rollouts, as `rollwire "
               "rollout` does. Loop lag = a 10 ms timer's lateness; on a shared 2-core machine most of it is the "
               "loop thread waiting for a core (its /proc schedstat run-queue time), not a callback of rollwire's."],
        figures={"rows": rows, "cap_bytes": cap},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="one memory benchmark configuration (a child process)")
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--side", type=int, default=SIDE)
    parser.add_argument("--cap", type=int, default=9 * 2**29)
    parser.add_argument("--on-loop", action="store_true")
    parser.add_argument("--hold-originals", action="store_true", help="no run directory: rollouts hold originals")
    parser.add_argument("--files", action="store_true", help="pictures are JPEG files on disk, named by path")
    args = parser.parse_args()
    result = child(args.k, args.turns, args.side, args.on_loop, args.cap, archive=not args.hold_originals,
                   files=args.files)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
