"""A run's figures, computed from its run directory alone: what `rollwire inspect` prints,
`summary.json` holds, the HTML overview draws and `--wandb` logs (one source for all four).

Counts are over each rollout's newest row (a resume's retry supersedes the failed row). Rewards
and their histogram are over rollouts that ended without error (a failed rollout's partial reward
would pull the mean toward 0); `std` is the population std (ddof=0), as GRPO's group std. A
rollout whose shard record is corrupt is counted as `unreadable` (its row's figures still count;
its images and logprobs, which only the record holds, do not).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rollwire.errors import StoreError
from rollwire.store import MANIFEST, RunReader

SUMMARY = "summary.json"
REWARD_BINS = 10


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


def histogram(values: Sequence[float], bins: int = REWARD_BINS) -> dict[str, list[float] | list[int]]:
    """`bins` equal bins from min to max (one bin when every value is the same); empty for no values."""
    if not values:
        return {"edges": [], "counts": []}
    lo, hi = min(values), max(values)
    if lo == hi:
        return {"edges": [lo, hi], "counts": [len(values)]}
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's `run.json`, or None when it has none; a manifest that is not JSON is a StoreError."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StoreError(f"{path} is not a run manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} is not a run manifest (a JSON {type(manifest).__name__})")
    return manifest


def run_summary(run_dir: str | Path, reader: RunReader | None = None) -> dict[str, Any]:
    """Every figure of a run as plain JSON values (see the module docstring for what is counted)."""
    reader = reader or RunReader(run_dir)
    all_rows = list(reader.rows(all_rows=True))
    rows = [r for r in all_rows if not r["superseded"]]
    ok = [r for r in rows if r.get("error") is None]
    turns = [_int(r.get("turns")) for r in rows]
    rewards = [float(r["reward"]) for r in ok if isinstance(r.get("reward"), (int, float))]
    step_rewards = [float(x) for r in ok for x in (r.get("rewards") or []) if isinstance(x, (int, float))]
    errors = Counter(str(r["error"].get("kind")) for r in rows if isinstance(r.get("error"), Mapping))
    unique: set[str] = set()
    referenced = 0
    logprobs: list[float] = []
    unreadable = 0
    for row in rows:
        try:
            trajectory = reader.trajectory(row)
        except StoreError:  # counted, and shown by the page; the other rollouts' figures still stand
            unreadable += 1
            continue
        for step in trajectory.steps:
            referenced += len(step.images)
            unique.update(ref.id for ref in step.images)
            logprobs.extend(step.completion_logprobs or ())
    metrics: dict[str, float] = {}
    for row in rows:
        for key, value in (row.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and (key.startswith("bridge_") or key.startswith("full_render:")):
                metrics[key] = metrics.get(key, 0.0) + value
    manifest = read_manifest(reader.root)
    return {
        "run_dir": str(reader.root),
        "settings": (manifest or {}).get("settings"),
        "rollouts": {"total": len(rows), "done": len(ok), "failed": len(rows) - len(ok),
                     "superseded_rows": len(all_rows) - len(rows), "unreadable": unreadable},
        "finish": dict(sorted(Counter(str(r.get("finish")) for r in rows).items())),
        "turns": {"total": sum(turns), "mean": sum(turns) / len(turns) if turns else None,
                  "max": max(turns, default=0),
                  "per_rollout": {str(k): v for k, v in sorted(Counter(turns).items())}},
        "tokens": {"prompt": sum(_int(r.get("prompt_tokens")) for r in rows),
                   "completion": sum(_int(r.get("completion_tokens")) for r in rows),
                   "completion_logprob_mean": float(np.mean(logprobs)) if logprobs else None},
        "rewards": {**_stats(rewards), "count": len(rewards), "histogram": histogram(rewards),
                    "step_mean": _stats(step_rewards)["mean"]},
        "errors": dict(sorted(errors.items())),
        "images": {"unique": len(unique), "referenced": referenced},
        "bridge": {"attempts": int(metrics.get("bridge_attempts", 0)),
                   "successes": int(metrics.get("bridge_successes", 0))},
        "full_render": {k.removeprefix("full_render:"): int(v) for k, v in sorted(metrics.items())
                        if k.startswith("full_render:")},
    }


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def write_summary(run_dir: str | Path, reader: RunReader | None = None) -> dict[str, Any]:
    """Compute the run's figures and write them to `RUN_DIR/summary.json` (atomically: a reader sees
    the old file or the new one); returns them. The runner calls this once a run ends."""
    summary = run_summary(run_dir, reader)
    root = Path(run_dir)
    path = root / SUMMARY
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise StoreError(f"{path} must be a regular file, not a symlink or a folder")
    data = (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode()
    # Named as the run writer names its temporary files, so one a crash leaves is cleaned up.
    tmp = root / f".{SUMMARY}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return summary
