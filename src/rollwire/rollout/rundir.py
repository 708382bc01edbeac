"""Rollouts into a run directory: reach the engine, settle the manifest, run what is not done yet.

What `rollwire rollout` does, as one library call. Rerunning with the same directory resumes:
rollouts already written without error are skipped; other settings are refused
(`ManifestMismatchError`) before anything runs. The store and the engines are imported lazily:
the store reads rollout types, and the embedded engine needs torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rollwire.engines.types import Engine
from rollwire.render.types import Renderer
from rollwire.rollout.env import make_env
from rollwire.rollout.runner import RunConfig, RunSummary, run_manifest, run_rollouts


def make_engine(renderer: Renderer, model_dir: str | Path, server: str | None = None,
                served_name: str | None = None, retry_deadline: float = 60.0) -> Any:
    """The vLLM client for `server` (retrying for `retry_deadline` s of unavailability), else the
    embedded engine on `model_dir`."""
    if server:
        from rollwire.engines.vllm import RetryPolicy, VLLMEngine

        return VLLMEngine.for_renderer(server, renderer, model=served_name,
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
    server: str | None = None,
    served_name: str | None = None,
    retry_deadline: float = 60.0,
    progress: bool = False,
    resolved: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Run `config`'s rollouts on the model directory `model` and write them to `out`.

    The engine is `engine` when given (the caller keeps and closes it), else the vLLM client for
    `server`, else the embedded engine, loaded only once the run directory is accepted. An
    environment spec that names nothing, an unreachable server or a resume with other settings
    raise before anything is written. `resolved` (the whole configuration) goes into `run.json`, and
    so does the environment's `fingerprint` attribute when it has one (a resume after its data
    changed is refused).
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
        engine = make_engine(renderer, model, server, served_name, retry_deadline)
    try:
        version = None
        if engine is not None:
            connect = getattr(engine, "connect", None)
            if connect is not None:  # unreachable: a ServerError here, before anything is written
                await connect()
            server_version = getattr(engine, "server_version", None)
            version = await server_version() if server_version is not None else None
        manifest = run_manifest(config, model_dir=model, family=renderer.family, server_url=server,
                                server_version=version, resolved=resolved,
                                env_fingerprint=fingerprint if isinstance(fingerprint, str) else None)
        with RunWriter(out, store, manifest=manifest) as writer:
            if engine is None:
                engine = make_engine(renderer, model, None, served_name, retry_deadline)
            return await run_rollouts(
                config, renderer, engine, skip_ids=set(writer.done_ids), progress=progress,
                on_result=lambda r: asyncio.to_thread(writer.write, r.trajectory, r.originals, r.features))
    finally:
        if own and engine is not None:
            await engine.close()
