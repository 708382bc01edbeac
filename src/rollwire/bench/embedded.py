"""`rollwire bench embedded`: rollouts/s of the embedded engine on `shapes`, with its sampler and
with the one it replaced, side by side in one process; and the sampler alone at the real vocab size.

The workload is `rollwire rollout --env shapes`'s defaults (8 prompts x 2 samples, 4 turns, 32
tokens, temperature 1, concurrency 8) run by `run_to_dir` into a fresh run directory, on the tiny
Qwen2-VL model (151,669 logits a row, as Qwen2-VL's vocabulary). Variants, one engine each, taken
in turn round after round (the order rotates):
- current: one uniform draw per row, inverse CDF over the filtered distribution (`engines/local_sampler.py`);
- old sampler: `torch.multinomial` over the softmax of the filtered logits, one row at a time (the
  code the inverse CDF replaced, here as `multinomial_draw`, swapped in for the draw);
- before: the old sampler and every image normalised again on every turn (`image_cache_bytes=0`),
  i.e. the embedded engine before issue 9's item 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollwire.bench.report import Report, Table, cpu_clock

ROUNDS, QUICK_ROUNDS = 3, 1
WORKLOAD = {"n_prompts": 8, "group": 2, "max_turns": 4, "max_tokens": 32, "concurrency": 8}
QUICK_WORKLOAD = {"n_prompts": 1, "group": 2, "max_turns": 2, "max_tokens": 4, "concurrency": 2}
DRAWS, QUICK_DRAWS = 60, 5  # sampler-alone timings per sampler
# One torch thread by default: on a machine shared with other jobs, torch's two-thread parallel
# regions wait for a descheduled thread (here the same run took 9x longer with 2 threads than with 1).
THREADS = 1


def multinomial_draw(torch: Any, logits: Any, generator: Any) -> int:
    """The draw the inverse CDF replaced: softmax, then `torch.multinomial` for one sample."""
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@dataclass
class Draws:
    count: int = 0
    seconds: float = 0.0  # wall time inside the draw (the engine thread)


@contextlib.contextmanager
def sampler(draw: Callable[[Any, Any, Any], int] | None) -> Iterator[Draws]:
    """The embedded engine's draw replaced by `draw` (None: its own) while inside. Yields the draws
    made and their time, so a swap that did not take effect is caught, not reported."""
    from rollwire.engines import local_sampler

    own = local_sampler.inverse_cdf
    use = own if draw is None else draw
    calls = Draws()

    def counted(torch: Any, logits: Any, generator: Any) -> int:
        t = time.perf_counter()
        try:
            return use(torch, logits, generator)
        finally:
            calls.count += 1
            calls.seconds += time.perf_counter() - t

    local_sampler.inverse_cdf = counted
    try:
        yield calls
    finally:
        local_sampler.inverse_cdf = own


def _run_once(model: Path, renderer: Any, engine: Any, workload: dict[str, int], seed: int) -> dict[str, Any]:
    from rollwire.rollout import RolloutConfig, RunConfig, run_to_dir

    config = RunConfig(env="shapes", n_prompts=workload["n_prompts"], group=workload["group"],
                       concurrency=workload["concurrency"], seed=seed,
                       rollout=RolloutConfig(max_turns=workload["max_turns"], max_tokens=workload["max_tokens"],
                                             temperature=1.0))
    with tempfile.TemporaryDirectory(prefix="rollwire-bench-embedded-") as out:
        start = time.perf_counter()
        summary = asyncio.run(run_to_dir(config, out, model=model, renderer=renderer, engine=engine))
        seconds = time.perf_counter() - start
    if summary.failed or summary.unwritten:
        raise RuntimeError(f"embedded bench run failed: {summary.top_errors(3)}")
    return {"seconds": seconds, "rollouts": summary.done, "turns": summary.turns,
            "completion_tokens": summary.completion_tokens}


def _sampler_ms(torch: Any, vocab: int, draws: int) -> dict[str, float]:
    """Median CPU ms per row of each draw on `vocab` random (tempered) logits, the two alternating,
    on one torch thread (the calling thread's CPU time: other jobs on the machine do not count)."""
    from rollwire.engines.local_sampler import inverse_cdf

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=generator) * 3.0
    fns = {"current": inverse_cdf, "multinomial": multinomial_draw}
    times: dict[str, list[float]] = {name: [] for name in fns}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in fns.values():  # warm-up
            fn(torch, logits, generator)
        for _ in range(draws):
            for name, fn in fns.items():
                t = cpu_clock()
                fn(torch, logits, generator)
                times[name].append(cpu_clock() - t)
    finally:
        torch.set_num_threads(threads)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(quick: bool = False, threads: int | None = THREADS) -> Report:
    """`threads`: torch's intra-op threads for the whole benchmark (None: torch's default)."""
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(torch, quick, torch.get_num_threads(), default_threads)
    finally:
        torch.set_num_threads(default_threads)


def _run(torch: Any, quick: bool, threads: int, default_threads: int) -> Report:

    from rollwire.engines.local import LocalEngine
    from rollwire.render import create_renderer
    from rollwire.tiny_model import ensure_tiny_model

    workload, rounds = (QUICK_WORKLOAD, QUICK_ROUNDS) if quick else (WORKLOAD, ROUNDS)
    model = ensure_tiny_model("qwen2_vl")
    renderer = create_renderer(model)
    variants = {  # name: (draw swapped in, what the table calls it, image inputs cache bytes)
        "current": (None, "inverse CDF", "once per image", 1 << 30),
        "old sampler": (multinomial_draw, "torch.multinomial", "once per image", 1 << 30),
        "before": (multinomial_draw, "torch.multinomial", "every turn", 0),
    }
    engines = {name: LocalEngine(model, feature_store=renderer.feature_store, image_cache_bytes=v[3])
               for name, v in variants.items()}
    names = list(variants)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        seed = 1000
        for name in names if not quick else ():  # warm-up: every engine once
            seed += 1
            _run_once(model, renderer, engines[name], QUICK_WORKLOAD, seed=seed)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                seed += 1  # new pictures every run (the feature store would hold the last run's)
                with sampler(variants[name][0]) as draws:
                    result = _run_once(model, renderer, engines[name], workload, seed=seed)
                if draws.count != result["completion_tokens"]:  # every sampled token is one draw
                    raise AssertionError(f"{name}: {draws.count} draws for {result['completion_tokens']} tokens")
                runs[name].append(result | {"draw_seconds": draws.seconds})
        vocab = engines["current"].vocab_size
    finally:
        for engine in engines.values():
            asyncio.run(engine.close())
    ms = _sampler_ms(torch, vocab, QUICK_DRAWS if quick else DRAWS)

    def median(name: str, fn: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(fn(x) for x in runs[name])

    figures: dict[str, Any] = {"workload": workload, "rounds": rounds, "vocab": vocab, "sampler_ms_per_row": ms,
                               "torch_threads": threads, "variants": {}}
    for name in names:
        figures["variants"][name] = {
            "rollouts_per_s": median(name, lambda x: x["rollouts"] / x["seconds"]),
            "tokens_per_s": median(name, lambda x: x["completion_tokens"] / x["seconds"]),
            "draw_share": median(name, lambda x: x["draw_seconds"] / x["seconds"]),
            "draw_ms_per_row": median(name, lambda x: 1e3 * x["draw_seconds"] / x["completion_tokens"]),
            "runs": runs[name]}
    v = figures["variants"]
    base = v["before"]["rollouts_per_s"]
    table = Table(["variant", "draw", "image inputs", "rollouts/s", "completion tokens/s", "vs before",
                   "draw ms per row (in the run)", "share of the run in the draw"],
                  title="embedded `rollwire rollout --env shapes`")
    for name, (_, what, images, _) in variants.items():
        f = v[name]
        table.add(name, what, images, f"{f['rollouts_per_s']:.2f}", f"{f['tokens_per_s']:.1f}",
                  f"{f['rollouts_per_s'] / base:.2f}×", f"{f['draw_ms_per_row']:.2f}", f"{100 * f['draw_share']:.0f}%")
    alone = Table(["draw", "CPU ms per row", "vs inverse CDF"], title=f"the draw alone, {vocab:,} logits, one thread")
    alone.add("inverse CDF (current)", f"{ms['current']:.2f}", "1.00×")
    alone.add("torch.multinomial (old)", f"{ms['multinomial']:.2f}", f"{ms['multinomial'] / ms['current']:.2f}×")
    w = workload
    now = v["current"]["rollouts_per_s"]
    return Report(
        name="embedded", command="rollwire bench embedded" + (" --quick" if quick else "")
        + (f" --threads {threads}" if threads != THREADS else ""),
        summary=(f"embedded shapes rollouts: {now:.2f}/s now, {v['old sampler']['rollouts_per_s']:.2f}/s with the old "
                 f"sampler ({now / v['old sampler']['rollouts_per_s']:.2f}×), {base:.2f}/s before "
                 f"({now / base:.2f}×); the draw alone {ms['current']:.2f} vs {ms['multinomial']:.2f} CPU ms per row."),
        tables=[table, alone],
        notes=[f"{w['n_prompts']} prompts × {w['group']} samples, up to {w['max_turns']} turns of "
               f"{w['max_tokens']} tokens, temperature 1, concurrency {w['concurrency']} (`rollwire rollout --env "
               f"shapes`'s defaults{', shrunk' if quick else ''}; shapes ends after 3 turns), written to a run "
               f"directory by `run_to_dir`, on the tiny Qwen2-VL model, {threads} torch thread(s) (torch's "
               f"default here: {default_threads}; `--threads`); median of "
               f"{rounds} round(s), the variants in rotating order, each with its own engine, in one process, new "
               "pictures every run. \"old sampler\" swaps `torch.multinomial` over the softmax of the filtered "
               "logits (the code the inverse CDF replaced) in for the draw; \"before\" also normalises every "
               "image again on every turn (`image_cache_bytes=0`). Rollouts/s are wall-clock; the draw's time "
               "in the run is measured around each draw in the engine thread. The draw alone: random logits, "
               "the two alternating, median thread CPU time on one torch thread (with two threads on this "
               "loaded machine each parallel region waits for a descheduled thread: tens of ms, not a figure)."],
        figures=figures,
    )
