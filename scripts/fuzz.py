#!/usr/bin/env python
"""Long fuzz runs of rollwire's decoders: the CI targets (tests/fuzz/fuzz_targets.py), for longer.

    python scripts/fuzz.py [--seconds N] [--target NAME ...] [--seed S] [--out DIR]

Each target gets N seconds (default 60) of a simple mutation loop over its real seeds: random
bytes, bit flips, interesting bytes, truncation, duplication, splicing. It prints executions per
target; a failure (anything but a valid value or a rollwire typed error) is written to
DIR/<target>-<n>.bin with the command that reproduces it, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "fuzz"), str(ROOT / "tests")]

import fuzz_targets as ft  # noqa: E402


def _model_dir() -> Path:
    import rollwire.tiny_model as tm

    cache = os.environ.get("ROLLWIRE_CACHE")
    return tm.ensure_tiny_model("qwen2_vl", cache_dir=Path(cache) if cache else ROOT / ".cache" / "rollwire")


def reproduce(name: str, path: Path) -> int:
    ctx = ft.Context(model_dir=_model_dir() if ft.TARGETS[name].needs_model else None)
    try:
        ft.check(ft.TARGETS[name], path.read_bytes(), ctx)
    finally:
        ctx.close()
    print(f"{name}: {path} is handled (a valid value or a typed error)")
    return 0


def run(name: str, seconds: float, rng: random.Random, out: Path, ctx: ft.Context) -> tuple[int, int]:
    target = ft.TARGETS[name]
    seeds = ctx.seeds(name)
    if target.needs_model:
        ctx.server()  # started before the clock runs
    corpus = list(seeds)
    execs = failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rng.random() < 0.05:
            data = rng.randbytes(rng.randint(0, 256))
        else:
            data = ft.mutate(rng.choice(corpus), rng, corpus, target.kind)
        execs += 1
        try:
            ft.check(target, data, ctx)
        except ft.Finding as finding:
            failures += 1
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{name}-{failures}.bin"
            path.write_bytes(data)
            print(f"FAIL {finding}\n  reproduce: python scripts/fuzz.py --target {name} --reproduce {path}",
                  flush=True)
            continue
        if len(corpus) < 256 and rng.random() < 0.01:
            corpus.append(data)  # keep some mutants: later mutations go deeper
    return execs, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per target")
    parser.add_argument("--target", action="append", choices=sorted(ft.TARGETS), help="default: all")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("--reproduce", type=Path, help="run one saved input through --target")
    args = parser.parse_args(argv)
    names = args.target or sorted(ft.TARGETS)
    if args.reproduce is not None:
        if len(names) != 1:
            parser.error("--reproduce needs exactly one --target")
        return reproduce(names[0], args.reproduce)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}, {args.seconds:g} s per target", flush=True)
    rng = random.Random(seed)
    ctx = ft.Context(model_dir=_model_dir() if any(ft.TARGETS[n].needs_model for n in names) else None)
    total = bad = 0
    try:
        for name in names:
            start = time.monotonic()
            execs, failures = run(name, args.seconds, rng, args.out, ctx)
            total, bad = total + execs, bad + failures
            print(f"{name}: {execs} executions, {failures} failures "
                  f"({execs / (time.monotonic() - start):.0f}/s)", flush=True)
    finally:
        ctx.close()
    print(f"total: {total} executions, {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
