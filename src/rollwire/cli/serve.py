"""`rollwire serve` and `rollwire tiny-model`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rollwire.cli.app import MODEL_HELP, app, console, fail, resolve_model
from rollwire.errors import RollwireError


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_name: Annotated[str | None, typer.Option(help="Model name in /v1/models (default: the directory).")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit to enforce.")] = None,
    connection_timeout: Annotated[float, typer.Option(
        help="Seconds a connection may idle, or take to send one request, before it is closed.")] = 30.0,
) -> None:
    """Serve the embedded engine over HTTP in vLLM's token-in/token-out wire format."""
    from rollwire.engines.server import serve_forever

    try:
        serve_forever(resolve_model(model), host=host, port=port, served_model_name=served_name,
                      max_model_len=max_model_len, connection_timeout=connection_timeout)
    except RollwireError as exc:
        raise fail(exc) from exc


@app.command("tiny-model")
def tiny_model(
    family: Annotated[str, typer.Argument(help="A registered family: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3, ...")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the model directory.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
) -> None:
    """Write a tiny random-weight model directory (real tokenizer and processor config)."""
    from rollwire.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(family, out_dir, seed=seed)
    except RollwireError as exc:
        raise fail(exc) from exc
    console.print(f"wrote {path}")


