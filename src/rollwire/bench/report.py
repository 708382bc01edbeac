"""What a benchmark returns, and the three ways it is shown: a rich table, JSON, a docs section.

A `Report` holds tables (rows of already formatted cells, for people) and `figures` (plain
numbers by name, for machines and for `--json`). A docs section is the report as markdown
between `<!-- name:start -->` and `<!-- name:end -->` markers, headed by the command that
produced it and the machine it ran on, so one section can be refreshed without the others.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DOC_HEADER", "Report", "Table", "cpu_clock", "machine", "median_seconds", "write_sections"]

DOC_HEADER = ("# Benchmarks\n\nEvery section below was written by `rollwire bench all --write docs/benchmarks.md` "
              "(or `python scripts/bench_all.py`) from a fresh run; each names the command that produced it and "
              "the machine. Ratios are taken side by side in one run (the machine is shared and noisy: absolute "
              "times move between runs, ratios much less).\n")


@dataclass
class Table:
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    title: str = ""

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])


@dataclass
class Report:
    """One benchmark run: `figures` are plain numbers (JSON); `tables` and `notes` say what they mean."""

    name: str
    command: str
    summary: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.name, "command": self.command, "machine": machine(), "summary": self.summary,
                "figures": self.figures, "notes": self.notes,
                "tables": [{"title": t.title, "columns": list(t.columns), "rows": [list(r) for r in t.rows]}
                           for t in self.tables]}

    def markdown(self) -> str:
        parts = [f"## {self.name}", "", f"`{self.command}` — {machine_line()}.", "", self.summary]
        for table in self.tables:
            parts += ["", *([f"**{table.title}**", ""] if table.title else []),
                      "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
            parts += ["| " + " | ".join(row) + " |" for row in table.rows]
        for note in self.notes:
            parts += ["", note]
        return "\n".join(parts)

    def print(self, console: Any) -> None:
        from rich.table import Table as RichTable

        console.print(f"[bold]{self.name}[/bold]: {self.summary}", highlight=False)
        for table in self.tables:
            rich = RichTable(*table.columns, title=table.title or None)
            for row in table.rows:
                rich.add_row(*row)
            console.print(rich)
        for note in self.notes:
            console.print(note, highlight=False, markup=False)


def machine() -> dict[str, Any]:
    import numpy as np

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arch": platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "shared": True}


def machine_line() -> str:
    m = machine()
    return (f"measured {m['date']} on {m['arch']}, {m['cores']} cores shared with other jobs, "
            f"Python {m['python']}, numpy {m['numpy']}")


def cpu_clock() -> float:
    """The calling thread's CPU time: on a shared machine, time this thread was not running (other
    jobs held the cores) does not count, so single-threaded paths compare fairly run to run."""
    return time.thread_time()


def median_seconds(fn: Callable[[], object], repeat: int = 7, warmup: int = 1,
                   clock: Callable[[], float] = cpu_clock) -> float:
    """Median time of `fn` over `repeat` runs (after `warmup` runs), by `clock` (thread CPU time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def write_sections(path: Path, reports: Iterable[Report], order: Sequence[str] | None = None) -> None:
    """Replace each report's marked section of `path` in place, keeping the others; a new section
    goes before the first later one in `order` (default: the benchmarks' order), else at the end."""
    if order is None:
        from rollwire.bench import BENCHMARKS

        order = list(BENCHMARKS)
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_HEADER
    if not text.startswith("# Benchmarks"):
        text = DOC_HEADER + "\n" + text
    for report in reports:
        start, end = f"<!-- {report.name}:start -->", f"<!-- {report.name}:end -->"
        section = f"{start}\n{report.markdown()}\n{end}"
        found = re.search(re.escape(start) + r".*?" + re.escape(end), text, re.DOTALL)
        if found:
            text = text[: found.start()] + section + text[found.end():]
            continue
        later = order[order.index(report.name) + 1:] if report.name in order else []
        at = min((text.index(f"<!-- {n}:start -->") for n in later if f"<!-- {n}:start -->" in text), default=None)
        text = (text.rstrip() + "\n\n" + section + "\n") if at is None else (text[:at] + section + "\n\n" + text[at:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
