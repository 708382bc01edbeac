"""`rollwire rollout`: many multi-turn rollouts into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rollwire.cli.app import MODEL_HELP, app, console, err_console, fail, resolve_model
from rollwire.cli.render import WIRE_HELP, make_engine
from rollwire.errors import RollwireError

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
    wire: Annotated[str, typer.Option(help=WIRE_HELP)] = "auto",
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
                                   retry_deadline, progress, wire))
    except RollwireError as exc:
        raise fail(exc) from exc
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
               served_name: str | None, out: Path, retry_deadline: float, progress: bool, wire: str = "auto") -> Any:
    """Reach the engine, check or write the manifest, then run; the engine is closed either way."""
    import asyncio

    from rollwire.rollout import run_rollouts
    from rollwire.rollout.runner import run_manifest
    from rollwire.store import RunWriter

    engine = make_engine(renderer, model_dir, server, served_name, retry_deadline, wire) if server else None
    try:
        version = None
        if engine is not None:
            await engine.connect()  # unreachable: a ServerError here, before anything is written
            version = await engine.server_version()
        manifest = run_manifest(config, model_dir=model_dir, family=renderer.family, server_url=server,
                                server_version=version)
        with RunWriter(out, store, manifest=manifest) as writer:
            if engine is None:  # the embedded engine loads only once the run directory is accepted
                engine = make_engine(renderer, model_dir, server, served_name, retry_deadline)
            return await run_rollouts(
                config, renderer, engine, skip_ids=set(writer.done_ids), progress=progress,
                on_result=lambda r: asyncio.to_thread(writer.write, r.trajectory, r.originals, r.features))
    finally:
        if engine is not None:
            await engine.close()


