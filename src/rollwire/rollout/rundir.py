"""Rollouts into a run directory: reach the engine, settle the manifest, run what is not done yet.

What `rollwire rollout` does, as one library call. Rerunning with the same directory resumes:
rollouts already written without error are skipped; other settings are refused
(`ManifestMismatchError`) before anything runs. The store and the engines are imported lazily:
the store reads rollout types, and the embedded engine needs torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rollwire.engines.types import Engine
from rollwire.errors import RollwireError
from rollwire.render.types import Renderer
from rollwire.rollout.env import make_env
from rollwire.rollout.runner import RunConfig, RunSummary, run_manifest, run_rollouts, trajectory_id


def all_ids(config: RunConfig) -> list[str]:
    """Every trajectory id of the run, group by group."""
    return [trajectory_id(config, i, j) for i in range(config.n_prompts) for j in range(config.group)]


def make_engine(renderer: Renderer, model_dir: str | Path, server: str | Sequence[str] | None = None,
                served_name: str | None = None, retry_deadline: float = 60.0, wire: str = "auto") -> Any:
    """The vLLM client for `server` (retrying for `retry_deadline` s of unavailability, images sent
    as `wire` says: features, content-parts or auto), a pool of clients when it names several URLs,
    else the embedded engine on `model_dir`."""
    if server is not None and not isinstance(server, str):
        if len(server) > 1:
            from rollwire.engines.pool import EnginePool

            return EnginePool.for_renderer(server, renderer, model=served_name, deadline_s=retry_deadline,
                                           wire=wire)
        server = server[0] if server else None
    if server:
        from rollwire.engines.vllm import RetryPolicy, VLLMEngine

        return VLLMEngine.for_renderer(server, renderer, model=served_name, wire=wire,
                                       retry=RetryPolicy(deadline_s=retry_deadline))
    from rollwire.engines.local import LocalEngine

    return LocalEngine(Path(model_dir), feature_store=renderer.feature_store)


async def run_to_dir(
    config: RunConfig,
    out: str | Path,
    *,
    model: str | Path,
    renderer: Renderer | None = None,
    engine: Engine | None = None,
    server: str | Sequence[str] | None = None,
    served_name: str | None = None,
    retry_deadline: float = 60.0,
    progress: bool = False,
    wire: str = "auto",
    group_requests: bool = False,
    resolved: Mapping[str, Any] | None = None,
    worker: str | None = None,
    only: Collection[str] | None = None,
    freeze_heap: bool = False,
) -> RunSummary:
    """Run `config`'s rollouts on the model directory `model` and write them to `out`.

    The engine is `engine` when given (the caller keeps and closes it), else the vLLM client for
    `server`, else the embedded engine, loaded only once the run directory is accepted. An
    environment spec that names nothing, an unreachable server or a resume with other settings
    raise before anything is written. `resolved` (the whole configuration) goes into `run.json`, and
    so does the environment's `fingerprint` attribute when it has one (a resume after its data
    changed is refused). `server` may list several URLs (an `EnginePool`). `group_requests` sends
    each GRPO group's shared first prompt as one `n = group` request (`GroupedEngine`). A Ray worker
    (`rollout/workers.py`) passes its `worker` name (its own row and shard files) and the trajectory
    ids it runs (`only`). `freeze_heap` (the CLI and Ray workers: processes that exist for the run)
    moves everything made before the rollouts start (modules, the tokenizer, the model) out of the
    garbage collector's view with `gc.freeze()`, as vLLM's API server does after start-up, so its
    full passes walk only what the rollouts hold; the heap is unfrozen when the rollouts end.
    """
    from rollwire.features import FeatureStore
    from rollwire.render import create_renderer
    from rollwire.store import RunWriter

    if renderer is None:
        renderer = create_renderer(model)
    env = make_env(config.env, **config.env_kwargs)  # a bad spec or bad arguments fail before anything is made
    fingerprint = getattr(env, "fingerprint", None)
    store = renderer.feature_store if renderer.feature_store is not None else FeatureStore()
    own = engine is None
    if own and server:
        engine = make_engine(renderer, model, server, served_name, retry_deadline, wire)
    try:
        version = None
        if engine is not None:
            connect = getattr(engine, "connect", None)
            if connect is not None:  # unreachable: a ServerError here, before anything is written
                await connect()
            server_version = getattr(engine, "server_version", None)
            version = await server_version() if server_version is not None else None
        server_url = server if server is None or isinstance(server, str) else ",".join(server)
        manifest = run_manifest(config, model_dir=model, family=renderer.family, server_url=server_url,
                                server_version=version, resolved=resolved,
                                env_fingerprint=fingerprint if isinstance(fingerprint, str) else None)
        with RunWriter(out, store, manifest=manifest, worker=worker) as writer:
            if engine is None:
                engine = make_engine(renderer, model, None, served_name, retry_deadline)
            skip = set(writer.done_ids)
            if only is not None:
                skip |= set(all_ids(config)) - set(only)
            with frozen_heap(freeze_heap):
                summary = await run_rollouts(
                    config, renderer, engine, skip_ids=skip, progress=progress, archive=writer,
                    group_requests=group_requests,
                    on_result=lambda r: asyncio.to_thread(writer.write, r.trajectory, r.originals))
        if worker is None:  # a Ray run's driver writes it once the workers are done
            await asyncio.to_thread(write_run_summary, Path(out))
        return summary
    finally:
        if own and engine is not None:
            await engine.close()


@contextlib.contextmanager
def frozen_heap(enabled: bool = True) -> Iterator[None]:
    """Inside, everything made before it is out of the garbage collector's passes (`gc.freeze()`,
    as vLLM's API server does after start-up); unfrozen after. A caller's own freeze is left as it is."""
    frozen = enabled and gc.get_freeze_count() == 0
    if frozen:
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


def write_run_summary(out: Path) -> None:
    """The run's `summary.json` (what `rollwire inspect` shows). A failure here loses no rollout:
    the rows are written; it is reported as a warning and `rollwire inspect` writes it again."""
    from rollwire.view import write_summary

    try:
        write_summary(out)
    except (RollwireError, OSError) as exc:
        warnings.warn(f"could not write {out / 'summary.json'}: {exc} (rerun `rollwire inspect {out}`)",
                      stacklevel=2)
