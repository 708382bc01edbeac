"""`rollwire render` and `rollwire generate`: one conversation, as the model sees it, and one completion."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rollwire.cli.app import MODEL_HELP, app, console, fail, resolve_model
from rollwire.cli.inputs import ANY_IMAGE_PATH_HELP, IMAGE_ROOT_HELP, image_limits, load_messages_file
from rollwire.errors import RollwireError
from rollwire.rollout.rundir import make_engine

WIRE_HELP = ("How images reach a vLLM server: features (processed uint8 patches), content-parts (each image once as "
             "its own JPEG/PNG/WebP bytes, or a PNG where the server processes them otherwise, by uuid afterwards; "
             "the server's expansion is checked), or auto (features where the server "
             "supports it, else content-parts, e.g. vLLM's Rust frontend).")


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
        raise fail(exc) from exc
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
    wire: Annotated[str, typer.Option(help=WIRE_HELP)] = "auto",
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
        result = asyncio.run(_generate_once(renderer, model_dir, server, served_name, request, wire))
    except RollwireError as exc:
        raise fail(exc) from exc
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


async def _generate_once(renderer: Any, model_dir: Path, server: str | None, served_name: str | None,
                         request: Any, wire: str = "auto") -> Any:
    engine = make_engine(renderer, model_dir, server, served_name, wire=wire)
    try:
        return await engine.generate(request)
    finally:
        await engine.close()

