"""`rollwire bench NAME`: one benchmark, its figures beside their baselines, as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from rollwire.cli.app import app, console, err_console

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each rollwire figure beside its baseline, same run.")
app.add_typer(bench_app, name="bench")

QUICK = Annotated[bool, typer.Option("--quick", help="Small sizes: a smoke test, not figures to quote.")]
JSON = Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")]
WRITE = Annotated[Path | None, typer.Option(help="Also write this benchmark's section of a benchmarks page "
                                                 "(e.g. docs/benchmarks.md).")]


def _show(names: list[str], quick: bool, as_json: bool, write: Path | None, **options: object) -> None:
    from rollwire.bench import run_benchmark
    from rollwire.bench.report import write_sections

    reports = []
    for name in names:
        if not as_json and len(names) > 1:
            err_console.print(f"[dim]running {name} ...[/dim]")
        report = run_benchmark(name, quick=quick, **options)
        reports.append(report)
        if write is not None:  # section by section: an interrupted `all` keeps what it measured
            write_sections(write, [report])
        if not as_json:
            report.print(console)
    if as_json:
        out = [r.to_json() for r in reports]
        sys.stdout.write(json.dumps(out[0] if len(out) == 1 else out) + "\n")


def _command(name: str, help_text: str) -> None:
    def command(quick: QUICK = False, as_json: JSON = False, write: WRITE = None) -> None:
        _show([name], quick, as_json, write)

    command.__doc__ = help_text[0].upper() + help_text[1:] + "."
    bench_app.command(name)(command)


def _register() -> None:
    from rollwire.bench import BENCHMARKS

    for name, help_text in BENCHMARKS.items():
        if name not in ("memory", "e2e", "embedded"):
            _command(name, help_text)


_register()


@bench_app.command("memory")
def memory(
    quick: QUICK = False, as_json: JSON = False, write: WRITE = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Concurrent rollouts (repeatable; default 16 64 256).")]
    = None,
) -> None:
    """Peak RSS and loop lag of K concurrent 8-turn image rollouts vs the floor (a subprocess per K)."""
    _show(["memory"], quick, as_json, write, ks=tuple(k) if k else None)


@bench_app.command("embedded")
def embedded(
    quick: QUICK = False, as_json: JSON = False, write: WRITE = None,
    threads: Annotated[int, typer.Option(min=0, help="torch intra-op threads (0: torch's default; default 1: "
                                                     "on a shared machine more threads wait on each other).")] = 1,
) -> None:
    """Embedded-engine rollouts/s on shapes: the inverse-CDF draw vs torch.multinomial, and the draw alone."""
    _show(["embedded"], quick, as_json, write, threads=threads or None)


@bench_app.command("e2e")
def e2e(
    quick: QUICK = False, as_json: JSON = False, write: WRITE = None,
    server: Annotated[str | None, typer.Option(help="A running vLLM base URL (default: start the CPU vLLM of "
                                                    "ROLLWIRE_VLLM_VENV on the tiny model).")] = None,
) -> None:
    """Multi-turn image rollouts against one CPU vLLM: rollwire vs verifiers 0.4.0's client."""
    _show(["e2e"], quick, as_json, write, server=server)


@bench_app.command("all")
def all_benchmarks(
    quick: QUICK = False, as_json: JSON = False, write: WRITE = None,
    skip: Annotated[list[str] | None, typer.Option(help="Benchmarks to leave out (repeatable).")] = None,
) -> None:
    """Every benchmark in turn; with --write, regenerate the benchmarks page from this run."""
    from rollwire.bench import BENCHMARKS

    _show([n for n in BENCHMARKS if n not in (skip or [])], quick, as_json, write)
