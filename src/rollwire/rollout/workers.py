"""Rollout workers on Ray: the same rollout loop in N processes (or N machines) into one run directory.

The driver settles the run directory once (manifest, repairs, the ids already done), splits the
missing (prompt, sample) ids between the workers, whole GRPO groups at a time (a group shares its
prompt images: one worker, one server session), and starts one Ray task per worker. Each task runs
`run_to_dir` on its slice with its own row and shard files (`RunWriter(worker=...)`); `RunReader`
merges them. A resume with any number of workers redoes only what is missing; a worker that dies
loses only its in-flight rollouts (Ray retries it `max_retries` times; the retry skips what it
committed; a rerun redoes the rest).

With `weights=RayWeightGate(...)` (`rollout/ray_gate.py`) every worker's engine follows one gate,
so the trainer on the driver pauses all of them, and each server once, for a weight update.

Tasks and results cross Ray as plain data (dicts of numbers and strings; the gate by its actor's
name). `ray` is an optional extra (`pip install rollwire[ray]`), imported only here and only when a
run starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollwire.errors import RolloutConfigError, RollwireError
from rollwire.rollout.loop import RolloutConfig
from rollwire.rollout.rundir import run_to_dir, write_run_summary
from rollwire.rollout.runner import RunConfig, RunSummary, run_manifest, trajectory_id

if TYPE_CHECKING:
    from rollwire.rollout.ray_gate import RayWeightGate


def split_ids(config: RunConfig, done: set[str], workers: int) -> list[list[str]]:
    """The ids not done yet, in `workers` slices of whole groups, balanced by rollouts."""
    slices: list[list[str]] = [[] for _ in range(workers)]
    for i in range(config.n_prompts):
        group = [t for t in (trajectory_id(config, i, j) for j in range(config.group)) if t not in done]
        if group:
            min(slices, key=len).extend(group)
    return slices


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    fields = dict(data)
    fields["rollout"] = RolloutConfig(**fields["rollout"])
    return RunConfig(**fields)


def summary_to_dict(summary: RunSummary) -> dict[str, Any]:
    out = {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary) if not f.name.startswith("_")}
    out["error_messages"] = dict(summary.error_messages)
    return out


def merge_summaries(parts: Sequence[Mapping[str, Any]], *, skipped: int, seconds: float) -> RunSummary:
    """One summary of the workers' (plain-dict) summaries; `unique_images` is the sum of each
    worker's (groups do not cross workers, so only images shared between prompts count twice)."""
    total = RunSummary(skipped=skipped, seconds=seconds)
    for part in parts:
        for f in dataclasses.fields(total):
            if f.name.startswith("_") or f.name in ("skipped", "seconds"):
                continue
            value = part.get(f.name)
            if isinstance(value, Mapping):
                merged = getattr(total, f.name)
                for key, count in value.items():
                    merged[key] = merged.get(key, 0) + count
            elif isinstance(value, (int, float)):
                setattr(total, f.name, getattr(total, f.name) + value)
    total.error_messages = Counter(total.error_messages)
    return total


def run_worker(job: Mapping[str, Any]) -> dict[str, Any]:
    """One worker's share (in its own process): `run_to_dir` on its ids with its own files."""
    config = config_from_dict(job["config"])
    kwargs: dict[str, Any] = dict(
        model=job["model"], server=list(job["servers"]) or None, served_name=job.get("served_name"),
        retry_deadline=job.get("retry_deadline", 60.0), wire=job.get("wire", "auto"),
        group_requests=bool(job.get("group_requests", False)), resolved=job.get("resolved"),
        worker=job["worker"], only=set(job["ids"]), freeze_heap=True)
    gate = job.get("gate")
    run = run_to_dir(config, job["out"], **kwargs) if gate is None else _run_gated(config, job["out"], gate, kwargs)
    return summary_to_dict(asyncio.run(run))


async def _run_gated(config: RunConfig, out: str, gate: str, kwargs: dict[str, Any]) -> RunSummary:
    """`run_to_dir` with this worker's engine behind the driver's weight gate (the actor `gate`)."""
    from rollwire.render import create_renderer
    from rollwire.rollout.ray_gate import follow_gate
    from rollwire.rollout.rundir import make_engine

    renderer = create_renderer(kwargs["model"])
    engine = make_engine(renderer, kwargs["model"], kwargs["server"], kwargs["served_name"],
                         kwargs["retry_deadline"], kwargs["wire"])
    async with follow_gate(gate, kwargs["worker"], engine) as gated:
        return await run_to_dir(config, out, renderer=renderer, engine=gated, **kwargs)


def prepare_run(config: RunConfig, out: str | Path, *, model: str | Path, servers: Sequence[str] = (),
                resolved: Mapping[str, Any] | None = None) -> set[str]:
    """Settle the run directory before the workers start (refusing a resume with other settings):
    write or check `run.json`, repair what a killed writer left, and return the ids already done."""
    from rollwire.features import FeatureStore
    from rollwire.render import create_renderer
    from rollwire.rollout.env import make_env
    from rollwire.store import RunWriter

    env = make_env(config.env, **config.env_kwargs)  # a bad spec fails here, not in every worker
    fingerprint = getattr(env, "fingerprint", None)  # as run_to_dir records it, or the workers' differ
    renderer = create_renderer(model)
    manifest = run_manifest(config, model_dir=model, family=renderer.family,
                            server_url=",".join(servers) or None, resolved=resolved,
                            env_fingerprint=fingerprint if isinstance(fingerprint, str) else None)
    with RunWriter(out, FeatureStore(), manifest=manifest) as writer:
        return set(writer.done_ids)


def run_on_ray(
    config: RunConfig,
    out: str | Path,
    *,
    model: str | Path,
    workers: int = 2,
    address: str | None = None,
    servers: Sequence[str] = (),
    served_name: str | None = None,
    retry_deadline: float = 60.0,
    wire: str = "auto",
    group_requests: bool = False,
    resolved: Mapping[str, Any] | None = None,
    num_cpus_per_worker: float = 1.0,
    max_retries: int = 1,
    weights: RayWeightGate | None = None,
) -> tuple[RunSummary, list[str]]:
    """Run `config` on `workers` Ray tasks into `out`; (merged summary, one message per lost worker).

    Joins the Ray cluster at `address` ("auto" for a running one) or starts a local one; a Ray
    already initialised in this process is used as it is. Without `servers` each worker loads the
    embedded engine; with them each worker pools the same servers (sessions stay per worker) and
    sends images as `wire` says. `group_requests` as in `run_to_dir` (a group is never split).
    `weights`: a `RayWeightGate` every worker's engine follows (create it after `ray.init()`; the
    trainer calls its `update_weights` while this runs in another thread).
    """
    if workers < 1:
        raise RolloutConfigError(f"workers must be at least 1, got {workers}")
    ray = _import_ray()
    out = str(out)
    done = prepare_run(config, out, model=model, servers=servers, resolved=resolved)
    slices = [s for s in split_ids(config, done, workers) if s]
    if weights is not None:
        weights.bind(servers)  # labels the servers with the gate's version before any request
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(1, int(workers * num_cpus_per_worker + 0.999))}))
    start = time.perf_counter()
    try:
        task = ray.remote(num_cpus=num_cpus_per_worker, max_retries=max_retries)(run_worker)
        base = {"config": config_to_dict(config), "out": out, "model": str(model), "servers": list(servers),
                "served_name": served_name, "retry_deadline": retry_deadline, "wire": wire,
                "group_requests": group_requests, "resolved": None if resolved is None else dict(resolved),
                "gate": None if weights is None else weights.name}
        futures = [task.remote(base | {"worker": f"w{k}", "ids": ids}) for k, ids in enumerate(slices)]
        if weights is not None:
            weights.bind(servers, {f"w{k}": future for k, future in enumerate(futures)})
        parts: list[dict[str, Any]] = []
        lost: list[str] = []
        for k, future in enumerate(futures):
            try:
                parts.append(ray.get(future))
            except RollwireError:
                raise
            except Exception as exc:  # a dead worker process, or an error inside it
                lost.append(f"worker w{k} ({len(slices[k])} rollouts) was lost: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300])
    finally:
        if started:
            ray.shutdown()
    write_run_summary(Path(out))  # of the merged run, once every worker is done
    return merge_summaries(parts, skipped=len(done), seconds=time.perf_counter() - start), lost


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RolloutConfigError("rollout workers need Ray: pip install 'rollwire[ray]'") from None
    return ray


__all__ = ["merge_summaries", "prepare_run", "run_on_ray", "run_worker", "split_ids"]
