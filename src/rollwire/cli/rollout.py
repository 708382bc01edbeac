"""`rollwire rollout`: many multi-turn rollouts into a run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rollwire.cli.app import MODEL_HELP, app, console, err_console, fail, resolve_model
from rollwire.cli.render import WIRE_HELP
from rollwire.config import DEFAULTS as D
from rollwire.config import parse_env_args, read_config_file, resolve_settings
from rollwire.errors import RollwireError

EXIT_INCOMPLETE = 3  # some rollouts failed or could not be written
EXIT_NOT_STARTED = 2  # bad settings, unreachable engine, a resume with other settings


@app.command()
def rollout(
    ctx: typer.Context,
    env: Annotated[str | None, typer.Option(help="Environment: shapes, zoom, dataset, or an import path "
                                                 "package.module:factory (required, here or in --config).")] = None,
    env_args: Annotated[str | None, typer.Option(
        help="Keyword arguments of the environment's factory, as a JSON object.")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML file holding any of these options (flags given here override it).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Run directory (rerunning with the same one resumes; required, here or in --config).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    server: Annotated[list[str] | None, typer.Option(
        help="vLLM (or rollwire serve) base URL; default: embedded. Repeat for several servers: a pool "
             "(each GRPO group on one, new groups to the least loaded, failover).")] = None,
    servers_file: Annotated[Path | None, typer.Option(help="A file of server URLs, one a line.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Rollout workers on Ray (a local cluster unless --ray-address).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join ('auto': the running one).")] = None,
    served_name: Annotated[str | None, typer.Option(help="Served model name (default: from /v1/models).")] = None,
    prompts: Annotated[int, typer.Option("-n", "--prompts", min=1, help="Prompts (environment seeds).")] = D.prompts,
    group: Annotated[int, typer.Option(min=1, help="Samples per prompt (GRPO group size).")] = D.group,
    max_turns: Annotated[int, typer.Option(min=1, help="Turns per rollout at most.")] = D.max_turns,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per turn at most.")] = D.max_tokens,
    max_total_tokens: Annotated[int, typer.Option(
        min=1, help="Prompt + completion budget of a rollout.")] = D.max_total_tokens,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = D.temperature,
    concurrency: Annotated[int, typer.Option(min=1, help="Rollouts in flight.")] = D.concurrency,
    seed: Annotated[int, typer.Option(help="Run seed (environment and sampling seeds derive from it).")] = D.seed,
    retry_deadline: Annotated[float, typer.Option(
        min=0.0, help="Seconds of server unavailability to wait out (backoff) before a request fails.")
    ] = D.retry_deadline,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = D.progress,
    wire: Annotated[str, typer.Option(help=WIRE_HELP)] = D.wire,
    group_requests: Annotated[bool, typer.Option(
        help="Send a GRPO group's shared first prompt as one request with n = --group (the server prefills "
             "it and receives its images once; completions are seeded per request, not per member).")
    ] = D.group_requests,
) -> None:
    """Run many multi-turn rollouts and write them to a run directory.

    Exit code 0: every rollout done and written; 3: some failed or were not written (rerun the same
    --out to retry them); 2: nothing ran (bad settings, unreachable engine, a resume with other settings).
    """
    import asyncio

    from rollwire.render import create_renderer
    from rollwire.rollout import RolloutConfig, RunConfig, run_to_dir

    try:
        flags = {k: v for k, v in ctx.params.items() if k != "config" and _given(ctx, k)}
        if env_args is not None:
            flags["env_args"] = parse_env_args(env_args)
        if out is not None:
            flags["out"] = str(out)
        if servers_file is not None:
            flags["servers_file"] = str(servers_file)
        s = resolve_settings(read_config_file(config) if config else {}, flags, source=f"config file {config}")
        if os.getcwd() not in sys.path:  # --env mymod:make_env finds mymod.py in the current directory
            sys.path.insert(0, os.getcwd())
        run = RunConfig(env=str(s.env), n_prompts=s.prompts, group=s.group, concurrency=s.concurrency, seed=s.seed,
                        env_kwargs=s.env_args,
                        rollout=RolloutConfig(max_turns=s.max_turns, max_tokens=s.max_tokens,
                                              max_total_tokens=s.max_total_tokens, temperature=s.temperature))
        model_dir = resolve_model(s.model)
        out = Path(str(s.out))
        servers = s.server_urls()
        lost: list[str] = []
        if s.workers is not None or s.ray_address is not None:
            from rollwire.rollout.workers import run_on_ray

            summary, lost = run_on_ray(run, out, model=model_dir, workers=s.workers or 1, address=s.ray_address,
                                       servers=servers, served_name=s.served_name,
                                       retry_deadline=s.retry_deadline, wire=s.wire,
                                       group_requests=s.group_requests, resolved=s.record())
        else:
            summary = asyncio.run(run_to_dir(run, out, model=model_dir, renderer=create_renderer(model_dir),
                                             server=servers or None, served_name=s.served_name,
                                             retry_deadline=s.retry_deadline, progress=s.progress,
                                             wire=s.wire, group_requests=s.group_requests,
                                             resolved=s.record(), freeze_heap=True))
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
    for message in lost:
        err_console.print(f"[red]{message}[/red] (rerun with the same --out to redo its rollouts)",
                          highlight=False)
    if not summary.ok:
        err_console.print(f"[red]{summary.failed} failed, {summary.unwritten} not written[/red] "
                          "(rerun with the same --out to retry them); most common errors:", highlight=False)
        for message, count in summary.top_errors(5):
            err_console.print(f"  {count} × {message}", highlight=False, markup=False)
    if lost or not summary.ok:
        raise typer.Exit(code=EXIT_INCOMPLETE)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was given on the command line (it then overrides the config file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"  # by name: Typer may vendor its own click
