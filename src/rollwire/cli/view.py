"""`rollwire view` (a run as one self-contained HTML page) and `rollwire inspect` (its figures in the
terminal, written to `summary.json`, optionally logged to wandb)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rollwire.cli.app import app, console, err_console, fail
from rollwire.errors import RollwireError

BAR = 30  # characters of the widest histogram bar


@app.command()
def view(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (rollwire rollout --out).")],
    out: Annotated[Path, typer.Option(help="HTML file to write.")],
    rollout: Annotated[str | None, typer.Option(help="Show this rollout id only.")] = None,
    max_rollouts: Annotated[int, typer.Option(min=1, help="Rollouts on the page at most.")] = 100,
    model: Annotated[Path | None, typer.Option(
        help="Model directory whose tokenizer decodes the tokens (default: the run's, from run.json).")] = None,
    thumb_size: Annotated[int, typer.Option(min=16, max=2048, help="Thumbnail size in pixels (longest side).")] = 256,
) -> None:
    """Write one HTML page (no network needed) showing the run's figures and each rollout turn by turn."""
    from rollwire.view import write_page

    try:
        stats = write_page(run_dir, out, rollout=rollout, max_rollouts=max_rollouts, model_dir=model,
                           max_side=thumb_size)
    except RollwireError as exc:
        raise fail(exc) from exc
    console.print(f"{out}: {stats.shown} of {stats.rollouts} rollouts, {stats.turns} turns, {stats.images} images "
                  f"({stats.missing_images} not archived), {stats.bytes / 1e6:.2f} MB",
                  highlight=False, markup=False, soft_wrap=True)
    if stats.tokenizer_note:
        err_console.print(f"warning: {stats.tokenizer_note}", highlight=False, markup=False, soft_wrap=True)


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(summary: dict[str, Any]) -> Table:
    """The run's figures as a rich table (what `inspect` prints)."""
    r, t, tok, rw, img = (summary[k] for k in ("rollouts", "turns", "tokens", "rewards", "images"))
    table = Table("", "value", title=f"run {summary['run_dir']}")
    rows = [("rollouts total / done / failed", f"{r['total']} / {r['done']} / {r['failed']}"),
            ("rows superseded by a retry", str(r["superseded_rows"])),
            ("rollouts unreadable (corrupt shard record)", str(r["unreadable"])),
            ("turns total / mean / max", f"{t['total']} / {_num(t['mean'])} / {t['max']}"),
            ("prompt / completion tokens", f"{tok['prompt']} / {tok['completion']}"),
            ("mean completion logprob", _num(tok["completion_logprob_mean"])),
            ("reward mean / std (n)", f"{_num(rw['mean'])} / {_num(rw['std'])} ({rw['count']})"),
            ("reward min / max", f"{_num(rw['min'])} / {_num(rw['max'])}"),
            ("images unique / referenced", f"{img['unique']} / {img['referenced']}"),
            ("bridge successes / attempts", f"{summary['bridge']['successes']} / {summary['bridge']['attempts']}")]
    rows += [(f"finish: {k}", str(v)) for k, v in summary["finish"].items()]
    rows += [(f"errors: {k}", str(v)) for k, v in summary["errors"].items()]
    rows += [(f"full render: {k}", str(v)) for k, v in summary["full_render"].items()]
    for k, v in rows:
        table.add_row(k, v)
    return table


def histogram_table(title: str, labels: list[str], counts: list[int]) -> Table:
    table = Table("bin", "count", "", title=title)
    top = max(counts, default=0) or 1
    for label, count in zip(labels, counts, strict=True):
        table.add_row(label, str(count), "█" * round(BAR * count / top))
    return table


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (rollwire rollout --out).")],
    write: Annotated[bool, typer.Option(help="Write RUN_DIR/summary.json.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of tables.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log the figures to wandb (needs rollwire[wandb]).")]
    = False,
    wandb_project: Annotated[str | None, typer.Option(help="wandb project (default: rollwire).")] = None,
) -> None:
    """Print a run's figures (rollouts, turns, tokens, rewards, errors, images) and write summary.json."""
    from rollwire.view.charts import histogram_labels
    from rollwire.view.summary import run_summary, write_summary

    try:
        if wandb:  # fail before doing anything when the extra is missing
            from rollwire.view.wandb_log import log_summary, require_wandb

            require_wandb()
        summary = write_summary(run_dir) if write else run_summary(run_dir)
        if as_json:
            console.print_json(json.dumps(summary))
        else:
            console.print(summary_table(summary))
            hist = summary["rewards"]["histogram"]
            if hist["counts"]:
                labels = histogram_labels(hist["edges"], ranges=True)
                console.print(histogram_table("reward per rollout (no error)", labels, hist["counts"]))
            per = summary["turns"]["per_rollout"]
            console.print(histogram_table("turns per rollout", list(per), list(per.values())))
        if wandb:
            url = log_summary(summary, project=wandb_project, name=Path(run_dir).resolve().name)
            console.print(f"logged to wandb {url}", highlight=False, markup=False, soft_wrap=True)
    except RollwireError as exc:
        raise fail(exc) from exc
