"""The `rollwire` command line."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rollwire.errors import MessagesFileError, RollwireError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
err_console = Console(stderr=True)

DEFAULT_FAMILY = "qwen2_vl"
MODEL_HELP = "Model directory, or a tiny model family name (default: the tiny qwen2_vl model)."


def _fail(exc: Exception) -> typer.Exit:
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


MAX_MESSAGES_FILE_BYTES = 64 * 2**20
MAX_MESSAGES_FILE_DEPTH = 100  # JSON nesting; a real conversation is under 10 deep


def read_json_file(path: Path, *, max_bytes: int = MAX_MESSAGES_FILE_BYTES,
                   max_depth: int = MAX_MESSAGES_FILE_DEPTH) -> Any:
    """The JSON value in `path`: a regular file (a FIFO is refused, not waited on) of at most
    `max_bytes`, UTF-8, nested at most `max_depth` deep. Every failure is a `MessagesFileError`."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise MessagesFileError(f"messages file {path} is {kind}")
        if info.st_size > max_bytes:
            raise MessagesFileError(f"messages file {path} has {info.st_size} bytes, over the limit of {max_bytes}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise MessagesFileError(f"messages file {path} is not a regular file")
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise MessagesFileError(f"messages file {path} does not exist") from None
    except OSError as exc:
        raise MessagesFileError(f"cannot read messages file {path}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise MessagesFileError(f"messages file {path} has more than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MessagesFileError(f"messages file {path} is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MessagesFileError(f"messages file {path} is not JSON: {exc}") from None
    except RecursionError:
        raise MessagesFileError(f"messages file {path} is nested too deeply to parse") from None
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise MessagesFileError(f"messages file {path} is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return data


def load_messages_file(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and optional tools) from JSON: a list of messages or {"messages", "tools"}.

    Relative image paths are taken relative to the file's folder. The messages are checked
    when rendered; the tools here (`parse_tools`).
    """
    from rollwire.messages import parse_tools

    data = read_json_file(path)
    tools = None
    if isinstance(data, dict):
        tools = parse_tools(data.get("tools"))
        data = data.get("messages")
    if not isinstance(data, list):
        raise MessagesFileError(f"{path}: expected a list of messages or an object with 'messages'")
    base = path.resolve().parent
    for message in data:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            for key in ("image", "path"):
                src = part.get(key)
                if (isinstance(src, str) and "://" not in src and not src.startswith("data:")
                        and not Path(src).is_absolute()):
                    part[key] = str(base / src)
    return data, tools


def image_limits(messages_file: Path, image_roots: list[Path] | None, any_image_path: bool) -> Any:
    """What the CLI reads images under: the messages file's folder and any `--image-root`,
    or anywhere with `--any-image-path`."""
    from rollwire.images import ImageLimits

    if any_image_path:
        return ImageLimits()
    return ImageLimits(allowed_roots=(str(messages_file.resolve().parent), *map(str, image_roots or ())))


IMAGE_ROOT_HELP = "Also read images under this folder (repeatable); by default only the messages file's folder."
ANY_IMAGE_PATH_HELP = "Read images from any path the process can read (no folder confinement)."


@app.command()
def render(
    messages: Annotated[Path, typer.Option(help="JSON file: a list of messages, or {messages, tools}.")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    generation_prompt: Annotated[bool, typer.Option(help="Append the assistant generation prompt.")] = True,
    add_vision_id: Annotated[bool, typer.Option(help="Label images 'Picture k:' (Qwen-VL).")] = False,
    thinking: Annotated[bool, typer.Option(help="Qwen3 thinking mode.")] = True,
    image_root: Annotated[list[Path] | None, typer.Option(help=IMAGE_ROOT_HELP)] = None,
    any_image_path: Annotated[bool, typer.Option(help=ANY_IMAGE_PATH_HELP)] = False,
) -> None:
    """Render a conversation to token ids and image refs, as the model will see it."""
    from rollwire.render import create_renderer

    try:
        msgs, tools = load_messages_file(messages)
        renderer = create_renderer(resolve_model(model), add_vision_id=add_vision_id, enable_thinking=thinking,
                                   limits=image_limits(messages, image_root, any_image_path))
        out = renderer.render(msgs, tools, add_generation_prompt=generation_prompt)
    except RollwireError as exc:
        raise _fail(exc) from exc
    images = [
        {"id": r.id, "offset": r.offset, "length": r.length, "grid_thw": list(r.grid_thw)} for r in out.images
    ]
    if as_json:
        sys.stdout.write(json.dumps({"token_ids": out.token_ids, "images": images}) + "\n")
        return
    console.print(f"[bold]{len(out.token_ids)} tokens[/bold], {len(out.images)} image(s), "
                  f"family {renderer.family}")
    console.print("[bold]token ids[/bold]")
    console.print(" ".join(map(str, out.token_ids)), highlight=False, soft_wrap=True)
    console.print("[bold]text[/bold] (image spans marked)")
    pos = 0
    pieces: list[str] = []
    for ref in out.images:
        pieces.append(renderer.decode(out.token_ids[pos : ref.offset]))
        pieces.append(f"[[image {ref.id[:12]}: {ref.length} pad tokens, grid {'x'.join(map(str, ref.grid_thw))}]]")
        pos = ref.end
    pieces.append(renderer.decode(out.token_ids[pos:]))
    console.print("".join(pieces), highlight=False, markup=False, soft_wrap=True)
    if images:
        table = Table("#", "id", "offset", "length", "grid_thw")
        for k, r in enumerate(out.images):
            table.add_row(str(k), r.id, str(r.offset), str(r.length), "x".join(map(str, r.grid_thw)))
        console.print(table)


@app.command()
def generate(
    messages: Annotated[Path, typer.Option(help="JSON file: a list of messages, or {messages, tools}.")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP + " Its tokenizer and processor render.")] = None,
    server: Annotated[str | None, typer.Option(help="vLLM (or rollwire serve) base URL; default: embedded.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Served model name (default: from /v1/models).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    image_root: Annotated[list[Path] | None, typer.Option(help=IMAGE_ROOT_HELP)] = None,
    any_image_path: Annotated[bool, typer.Option(help=ANY_IMAGE_PATH_HELP)] = False,
) -> None:
    """Render a conversation and generate one completion through the token-in/token-out path."""
    import asyncio

    from rollwire.engines.types import GenerateRequest, SamplingParams
    from rollwire.render import create_renderer

    try:
        msgs, tools = load_messages_file(messages)
        model_dir = resolve_model(model)
        renderer = create_renderer(model_dir, limits=image_limits(messages, image_root, any_image_path))
        prompt = renderer.render(msgs, tools)
        request = GenerateRequest(
            prompt_token_ids=prompt.token_ids, images=prompt.images,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    stop_token_ids=renderer.stop_token_ids,
                                    banned_token_ids=renderer.vision_token_ids))
        result = asyncio.run(_generate_once(renderer, model_dir, server, served_name, request))
    except RollwireError as exc:
        raise _fail(exc) from exc
    completion = result.completions[0]
    if as_json:
        sys.stdout.write(json.dumps({
            "prompt_token_ids": prompt.token_ids, "completion_ids": completion.token_ids,
            "logprobs": completion.logprobs, "finish_reason": completion.finish_reason,
            "text": renderer.decode(completion.token_ids), "bytes_sent": result.bytes_sent,
        }) + "\n")
        return
    console.print(f"[bold]{len(prompt.token_ids)} prompt tokens[/bold], {len(prompt.images)} image(s); "
                  f"finish: {completion.finish_reason}; bytes sent: {result.bytes_sent}")
    console.print(renderer.decode(completion.token_ids), highlight=False, markup=False)
    table = Table("#", "token id", "text", "logprob")
    logprobs = completion.logprobs or [float("nan")] * len(completion.token_ids)
    for k, (t, lp) in enumerate(zip(completion.token_ids, logprobs, strict=True)):
        table.add_row(str(k), str(t), repr(renderer.decode([t])), f"{lp:.4f}")
    console.print(table)


def _engine(renderer: Any, model_dir: Path, server: str | None, served_name: str | None,
            retry_deadline: float = 60.0) -> Any:
    """The vLLM client for `server` (retrying for `retry_deadline` s of unavailability), else the
    embedded engine on `model_dir`."""
    if server:
        from rollwire.engines.vllm import RetryPolicy, VLLMEngine

        return VLLMEngine.for_renderer(server, renderer, model=served_name,
                                       retry=RetryPolicy(deadline_s=retry_deadline))
    from rollwire.engines.local import LocalEngine

    return LocalEngine(model_dir, feature_store=renderer.feature_store)


async def _generate_once(renderer: Any, model_dir: Path, server: str | None, served_name: str | None,
                         request: Any) -> Any:
    engine = _engine(renderer, model_dir, server, served_name)
    try:
        return await engine.generate(request)
    finally:
        await engine.close()


EXIT_INCOMPLETE = 3  # some rollouts failed or could not be written
EXIT_NOT_STARTED = 2  # bad settings, unreachable engine, a resume with other settings


@app.command()
def rollout(
    env: Annotated[str, typer.Option(help="Environment: shapes or zoom.")],
    out: Annotated[Path, typer.Option(help="Run directory (rerunning with the same one resumes).")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    server: Annotated[str | None, typer.Option(help="vLLM (or rollwire serve) base URL; default: embedded.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Served model name (default: from /v1/models).")] = None,
    n: Annotated[int, typer.Option("-n", "--prompts", min=1, help="Prompts (environment seeds).")] = 8,
    group: Annotated[int, typer.Option(min=1, help="Samples per prompt (GRPO group size).")] = 2,
    max_turns: Annotated[int, typer.Option(min=1, help="Turns per rollout at most.")] = 4,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per turn at most.")] = 32,
    max_total_tokens: Annotated[int, typer.Option(help="Prompt + completion budget of a rollout.")] = 4096,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Rollouts in flight.")] = 8,
    seed: Annotated[int, typer.Option(help="Run seed (environment and sampling seeds derive from it).")] = 0,
    retry_deadline: Annotated[float, typer.Option(
        min=0.0, help="Seconds of server unavailability to wait out (backoff) before a request fails.")] = 60.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run many multi-turn rollouts and write them to a run directory.

    Exit code 0: every rollout done and written; 3: some failed or were not written (rerun the same
    --out to retry them); 2: nothing ran (bad settings, unreachable engine, a resume with other settings).
    """
    import asyncio

    from rollwire.features import FeatureStore
    from rollwire.render import create_renderer
    from rollwire.rollout import RolloutConfig, RunConfig, env_names

    try:
        if env not in env_names():
            raise RollwireError(f"unknown environment {env!r} (known: {', '.join(env_names())})")
        config = RunConfig(env=env, n_prompts=n, group=group, concurrency=concurrency, seed=seed,
                           rollout=RolloutConfig(max_turns=max_turns, max_tokens=max_tokens,
                                                 max_total_tokens=max_total_tokens, temperature=temperature))
        model_dir = resolve_model(model)
        renderer = create_renderer(model_dir)
        store = renderer.feature_store
        if store is None:  # a text-only model: the writer still wants a (empty) store
            store = FeatureStore()
        summary = asyncio.run(_run(config, renderer, store, model_dir, server, served_name, out,
                                   retry_deadline, progress))
    except RollwireError as exc:
        raise _fail(exc) from exc
    table = Table("", "value", title=f"rollouts → {out}")
    rows = [
        ("rollouts done / failed / unwritten / resumed",
         f"{summary.done} / {summary.failed} / {summary.unwritten} / {summary.skipped}"),
        ("turns", str(summary.turns)),
        ("prompt / completion tokens", f"{summary.prompt_tokens} / {summary.completion_tokens}"),
        ("images unique / referenced", f"{summary.unique_images} / {summary.referenced_images}"),
        ("bridge success", f"{summary.bridge_successes}/{summary.bridge_attempts} "
                           f"({100 * summary.bridge_success_rate:.0f}%)"),
        ("feature store hits / misses", f"{summary.feature_store_hits} / {summary.feature_store_misses}"),
        ("bytes sent (images)", f"{summary.bytes_sent} ({summary.image_bytes_sent})"),
        ("rollouts per second", f"{summary.rollouts_per_second:.2f}"),
    ]
    for reason, count in sorted(summary.full_render_reasons.items()):
        rows.append((f"full render: {reason}", str(count)))
    for kind, count in sorted(summary.errors.items()):
        rows.append((f"errors: {kind}", str(count)))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if not summary.ok:
        err_console.print(f"[red]{summary.failed} failed, {summary.unwritten} not written[/red] "
                          "(rerun with the same --out to retry them); most common errors:", highlight=False)
        for message, count in summary.top_errors(5):
            err_console.print(f"  {count} × {message}", highlight=False, markup=False)
        raise typer.Exit(code=EXIT_INCOMPLETE)


async def _run(config: Any, renderer: Any, store: Any, model_dir: Path, server: str | None,
               served_name: str | None, out: Path, retry_deadline: float, progress: bool) -> Any:
    """Reach the engine, check or write the manifest, then run; the engine is closed either way."""
    import asyncio

    from rollwire.rollout import run_rollouts
    from rollwire.rollout.runner import run_manifest
    from rollwire.store import RunWriter

    engine = _engine(renderer, model_dir, server, served_name, retry_deadline) if server else None
    try:
        version = None
        if engine is not None:
            await engine.connect()  # unreachable: a ServerError here, before anything is written
            version = await engine.server_version()
        manifest = run_manifest(config, model_dir=model_dir, family=renderer.family, server_url=server,
                                server_version=version)
        with RunWriter(out, store, manifest=manifest) as writer:
            if engine is None:  # the embedded engine loads only once the run directory is accepted
                engine = _engine(renderer, model_dir, server, served_name, retry_deadline)
            return await run_rollouts(
                config, renderer, engine, skip_ids=set(writer.done_ids), progress=progress,
                on_result=lambda r: asyncio.to_thread(writer.write, r.trajectory, r.originals, r.features))
    finally:
        if engine is not None:
            await engine.close()


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
        raise _fail(exc) from exc


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
        raise _fail(exc) from exc
    console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
