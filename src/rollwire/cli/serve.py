"""`rollwire serve` and `rollwire tiny-model`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rollwire.cli.app import MODEL_HELP, app, console, fail, resolve_model
from rollwire.cli.render import WIRE_HELP
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
    upstream: Annotated[str | None, typer.Option(
        help="Serve the OpenAI front (/v1/chat/completions) over this vLLM or rollwire serve URL, or 'embedded' "
             "for the in-process engine; --model is the model it serves (its tokenizer renders).")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        help="The front's run directory, one trajectory per session (alone: --upstream embedded).")] = None,
    image_root: Annotated[list[Path] | None, typer.Option(
        help="Front: a folder image paths in messages may be read from (repeatable; default: none).")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Front: fetch http(s) image URLs.")] = False,
    retry_deadline: Annotated[float, typer.Option(
        min=0.0, help="Front: seconds of upstream unavailability to wait out before a call fails.")] = 60.0,
    max_sessions: Annotated[int, typer.Option(
        min=1, help="Front: open sessions kept in memory (the least recently used are closed first).")] = 4096,
    wire: Annotated[str, typer.Option(help=f"Front, over a vLLM upstream: {WIRE_HELP}")] = "features",
) -> None:
    """Serve the embedded engine over HTTP in vLLM's token-in/token-out wire format; with --upstream or
    --run-dir, serve the OpenAI-compatible front instead (sessions recorded to the run directory)."""
    try:
        if upstream is not None or run_dir is not None:
            _serve_front(resolve_model(model), upstream, run_dir, host=host, port=port, served_name=served_name,
                         image_roots=image_root or [], allow_remote_images=allow_remote_images,
                         connection_timeout=connection_timeout, retry_deadline=retry_deadline,
                         max_sessions=max_sessions, wire=wire)
            return
        from rollwire.engines.server import serve_forever

        serve_forever(resolve_model(model), host=host, port=port, served_model_name=served_name,
                      max_model_len=max_model_len, connection_timeout=connection_timeout)
    except RollwireError as exc:
        raise fail(exc) from exc


def _serve_front(model_dir: Path, upstream: str | None, run_dir: Path | None, *, host: str, port: int,
                 served_name: str | None, image_roots: list[Path], allow_remote_images: bool,
                 connection_timeout: float, retry_deadline: float, max_sessions: int, wire: str) -> None:
    import sys

    from rollwire.engines.httpd import wait_for_signal
    from rollwire.front import FrontServer

    if run_dir is None:
        raise typer.BadParameter("the front records every session: pass --run-dir", param_hint="--run-dir")
    front = FrontServer(model_dir, run_dir=run_dir, upstream=upstream, host=host, port=port,
                        served_model_name=served_name, image_roots=image_roots,
                        allow_remote_images=allow_remote_images, connection_timeout=connection_timeout,
                        retry_deadline=retry_deadline, max_sessions=max_sessions, wire=wire)

    def start() -> None:
        front.start()
        print(f"rollwire front: {front.served_model_name!r} on {front.url}/v1 over "
              f"{front.upstream or 'the embedded engine'}, sessions in {run_dir}; Ctrl-C stops",
              file=sys.stderr, flush=True)

    try:
        wait_for_signal(start)
    finally:
        front.stop()


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


