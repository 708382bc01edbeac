"""Write one benchmark's section of docs/benchmarks.md (between its markers), keeping the others."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`; rerun one to refresh its section.\n"


def median_seconds(fn: Callable[[], object], repeat: int = 7) -> float:
    """Median wall time of `fn` over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_section(name: str, command: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = time.strftime("%Y-%m-%d")
    section = (f"{start}\n## {name}\n\nMeasured {stamp} on {platform.machine()}, Python "
               f"{platform.python_version()}, with `{command}`.\n\n{body.strip()}\n{end}")
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
