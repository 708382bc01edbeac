"""The Typer app, its consoles, and what every command shares: failing with one line, finding the model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

HELP = "The `rollwire` command line: render, generate, rollout, serve."
app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
console = Console()
err_console = Console(stderr=True)

DEFAULT_FAMILY = "qwen2_vl"
MODEL_HELP = "Model directory, or a tiny model family name (default: the tiny qwen2_vl model)."


def fail(exc: Exception) -> typer.Exit:
    """Exit 2: the command could not do its work; one line naming the error (printed as is, never as markup)."""
    err_console.print("[red]error:[/red] ", end="")
    err_console.print(f"{type(exc).__name__}: {exc}", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code=2)


def resolve_model(model: str | None) -> Path:
    """A model directory: the given one, a tiny model by family name, or the embedded tiny default
    (tiny models are built on first use)."""
    from rollwire.tiny_model import ensure_tiny_model, tiny_families

    if model and not Path(model).is_dir() and model in tiny_families():
        return ensure_tiny_model(model)
    if model:
        return Path(model)
    return ensure_tiny_model(DEFAULT_FAMILY)

