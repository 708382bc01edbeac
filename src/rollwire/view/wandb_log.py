"""Log a run's figures (the same `run_summary` that `summary.json` holds) to Weights & Biases.

wandb is an optional extra (`pip install 'rollwire[wandb]'`), imported only here and only when
asked, so rollwire never needs it installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rollwire.errors import MissingExtraError


def flat_figures(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric figure as `group/name` -> number (histograms and settings left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if key in ("histogram", "settings", "run_dir"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_figures(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def require_wandb() -> Any:
    """The wandb module, or a `MissingExtraError` naming the extra to install."""
    try:
        import wandb
    except ImportError:
        raise MissingExtraError("wandb", "wandb", "--wandb (logging a run's figures)") from None
    return wandb


def log_summary(summary: Mapping[str, Any], *, project: str | None = None, name: str | None = None) -> str:
    """One wandb run holding the figures (as its summary) and the reward histogram; returns its URL."""
    wandb = require_wandb()
    run = wandb.init(project=project or "rollwire", name=name, config=dict(summary.get("settings") or {}),
                     job_type="rollouts")
    try:
        figures = flat_figures(summary)
        hist = summary["rewards"]["histogram"]
        if hist["counts"]:
            figures_with_hist: dict[str, Any] = dict(figures)
            figures_with_hist["rewards/histogram"] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
            run.log(figures_with_hist)
        else:
            run.log(figures)
        run.summary.update(figures)
        return str(run.url or "")
    finally:
        run.finish()
