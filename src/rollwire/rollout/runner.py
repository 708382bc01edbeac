"""Many rollouts at once: N prompts × G samples (GRPO groups share their prompt and its images),
bounded concurrency, a progress bar, and per-rollout errors that never stop the others."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rollwire import __version__
from rollwire.engines.group import GroupedEngine
from rollwire.engines.types import Engine
from rollwire.errors import RolloutConfigError
from rollwire.render.types import Renderer
from rollwire.rollout.env import make_env
from rollwire.rollout.images import ImageArchive
from rollwire.rollout.loop import RolloutConfig, RolloutResult, run_rollout
from rollwire.rollout.types import RolloutError, Trajectory


@dataclass(frozen=True)
class RunConfig:
    env: str
    n_prompts: int = 4
    group: int = 1
    concurrency: int = 8
    seed: int = 0
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("n_prompts", "group", "concurrency"):
            if getattr(self, name) < 1:
                raise RolloutConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rollout.max_turns < 1 or self.rollout.max_tokens < 1:
            raise RolloutConfigError("max_turns and max_tokens must be at least 1")


def trajectory_id(config: RunConfig, prompt_index: int, sample_index: int) -> str:
    return f"{config.env}-s{config.seed}-p{prompt_index}-g{sample_index}"


def group_id(config: RunConfig, prompt_index: int) -> str:
    """The GRPO group of a prompt's samples: their session on the servers (they share its images)."""
    return f"{config.env}-s{config.seed}-p{prompt_index}"


def env_seed(config: RunConfig, prompt_index: int) -> int:
    """The environment seed of a prompt: every sample of a group starts from the same prompt."""
    return config.seed * 1_000_003 + prompt_index


def sampling_seed(config: RunConfig, prompt_index: int, sample_index: int) -> int:
    """Distinct per (run seed, prompt, sample); each turn derives its own from it."""
    return int(np.random.SeedSequence([config.seed, prompt_index, sample_index]).generate_state(1)[0])


# What identifies a model for a run: its architecture and everything that turns text into tokens
# and pixels into features (weights are not hashed: they can be many GB, and the config names them).
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                     "preprocessor_config.json")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the model directory's config, tokenizer and processor files (names and bytes)."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def run_manifest(config: RunConfig, *, model_dir: str | Path | None = None, family: str | None = None,
                 server_url: str | None = None, server_version: str | None = None,
                 resolved: Mapping[str, Any] | None = None, env_fingerprint: str | None = None) -> dict[str, Any]:
    """A run's `run.json`: `settings` must match for a resume; `about` is recorded, not compared
    (`resolved`: the whole configuration the run was started with, config file and flags merged).
    `env_fingerprint` (an environment's `fingerprint`: a hash of the data it reads) is a setting, so
    a resume after the data changed is refused."""
    r = config.rollout
    manifest: dict[str, Any] = {
        "settings": {
            "model": {"fingerprint": None if model_dir is None else model_fingerprint(model_dir), "family": family},
            "env": config.env, "env_kwargs": dict(config.env_kwargs), "seed": config.seed,
            "n_prompts": config.n_prompts, "group": config.group, "max_turns": r.max_turns,
            "max_tokens": r.max_tokens, "max_total_tokens": r.max_total_tokens,
            "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k},
        },
        "about": {"rollwire_version": __version__, "model_dir": None if model_dir is None else str(model_dir),
                  "server_url": server_url, "server_version": server_version,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "config": None if resolved is None else dict(resolved)},
    }
    if env_fingerprint is not None:
        manifest["settings"]["env_fingerprint"] = env_fingerprint
    return manifest


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bridge_attempts: int = 0
    bridge_successes: int = 0
    bytes_sent: int = 0
    image_bytes_sent: int = 0
    referenced_images: int = 0  # image occurrences over all prompts of all steps
    unique_images: int = 0
    feature_store_hits: int = 0
    feature_store_misses: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    full_render_reasons: dict[str, int] = field(default_factory=dict)
    # Rollouts `on_result` failed to take (the store refused them, the disk is full): they are
    # counted here and not in `done` / `failed`, which count only rollouts that were kept.
    unwritten: int = 0
    error_messages: Counter[str] = field(default_factory=Counter)  # "kind: message" -> rollouts
    _seen_images: set[str] = field(default_factory=set, repr=False)

    @property
    def rollouts_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def bridge_success_rate(self) -> float:
        return self.bridge_successes / self.bridge_attempts if self.bridge_attempts else 0.0

    @property
    def ok(self) -> bool:
        """Every rollout run finished without error and was kept."""
        return self.failed == 0 and self.unwritten == 0

    def top_errors(self, k: int = 5) -> list[tuple[str, int]]:
        """The `k` most common error messages (failed and unwritten rollouts), with counts."""
        return self.error_messages.most_common(k)

    def add_unwritten(self, exc: BaseException) -> None:
        self.unwritten += 1
        self.error_messages[_error_key(f"unwritten: {type(exc).__name__}: {exc}")] += 1

    def add(self, result: RolloutResult, *, kept: bool = True) -> None:
        """Count a rollout's metrics; `kept=False` (it could not be written) leaves done/failed alone."""
        t = result.trajectory
        if t.error is not None:
            self.errors[t.error.kind] = self.errors.get(t.error.kind, 0) + 1
            if kept:
                self.failed += 1
                self.error_messages[_error_key(f"{t.error.kind}: {t.error.message}")] += 1
        elif kept:
            self.done += 1
        m = t.metrics
        self.turns += int(m.get("turns", 0))
        self.prompt_tokens += int(m.get("prompt_tokens", 0))
        self.completion_tokens += int(m.get("completion_tokens", 0))
        self.bridge_attempts += int(m.get("bridge_attempts", 0))
        self.bridge_successes += int(m.get("bridge_successes", 0))
        self.bytes_sent += int(m.get("bytes_sent", 0))
        self.image_bytes_sent += int(m.get("image_bytes_sent", 0))
        for key, value in m.items():
            if key.startswith("full_render:"):
                reason = key.removeprefix("full_render:")
                self.full_render_reasons[reason] = self.full_render_reasons.get(reason, 0) + int(value)
        for step in t.steps:
            self.referenced_images += len(step.images)
            self._seen_images.update(ref.id for ref in step.images)
        self.unique_images = len(self._seen_images)


def _error_key(message: str) -> str:
    """An error message with content hashes masked, so the same failure on other images counts once."""
    return _HASH.sub("<hash>", message)[:300]


_HASH = re.compile(r"[0-9a-f]{2}/[0-9a-f]{16,}|[0-9a-f]{16,}")

# How long a group's first batch waits for a member after the last one joined. Members start
# together, so only a member that never comes (its environment failed) makes it wait; they render
# off the loop, and on a loaded machine a few hundred ms can pass between them.
GROUP_WINDOW_S = 1.0

OnResult = Callable[[RolloutResult], Awaitable[None] | None]


async def run_rollouts(
    config: RunConfig,
    renderer: Renderer,
    engine: Engine,
    *,
    on_result: OnResult | None = None,
    skip_ids: Collection[str] = (),
    progress: bool = True,
    archive: ImageArchive | None = None,
    group_requests: bool = False,
) -> RunSummary:
    """Run every (prompt, sample) not in `skip_ids`; `on_result` sees each rollout as it ends.
    `archive` (the run's `RunWriter`) takes each image when first seen, so rollouts hold ids only;
    `group_requests` sends a group's shared first prompt as one `n = group` request (`GroupedEngine`:
    a group's members start together, taking their slots at once, and their first request is sent once
    they have all joined, or as many as `concurrency` lets in)."""
    jobs = [(i, j) for i in range(config.n_prompts) for j in range(config.group)
            if trajectory_id(config, i, j) not in skip_ids]
    grouped = group_requests and config.group > 1
    if grouped:
        members = Counter(group_id(config, i) for i, _ in jobs)
        engine = GroupedEngine(engine, group=config.group, window_s=GROUP_WINDOW_S,
                               members={g: min(n, config.concurrency) for g, n in members.items()})
    connect = getattr(engine, "connect", None)
    if connect is not None:  # reach the engine once: an unreachable one fails here, not in every rollout
        await connect()
    summary = RunSummary()
    store = renderer.feature_store
    stats0 = store.stats() if store is not None else None
    summary.skipped = config.n_prompts * config.group - len(jobs)
    if jobs:  # a spec that names nothing, or arguments the factory refuses, fail here, before any rollout
        make_env(config.env, **config.env_kwargs)
    semaphore = asyncio.Semaphore(config.concurrency)
    start = time.perf_counter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"), disable=not progress, transient=False)
    task = bar.add_task(f"rollouts ({config.env})", total=len(jobs), status="")

    async def one(i: int, j: int, *, admitted: bool = False) -> None:
        if not admitted:
            await semaphore.acquire()
        try:
            try:
                env = make_env(config.env, **config.env_kwargs)
            except Exception as exc:  # this rollout fails (recorded); the others go on
                result = _unstarted(config, i, j, exc)
            else:
                result = await run_rollout(
                    env, renderer, engine, config.rollout, seed=env_seed(config, i),
                    trajectory_id=trajectory_id(config, i, j), prompt_index=i, sample_index=j,
                    sampling_seed=sampling_seed(config, i, j), session_id=group_id(config, i),
                    archive=archive)
        finally:
            semaphore.release()
        kept = True
        if on_result is not None:
            try:
                maybe = on_result(result)
                if maybe is not None:
                    await maybe
            except Exception as exc:  # this rollout is lost (counted and shown); the others go on
                kept = False
                summary.add_unwritten(exc)
                bar.console.print(f"[red]not written:[/red] {escape(result.trajectory.id)}: "
                                  f"{escape(f'{type(exc).__name__}: {exc}')}", highlight=False)
        summary.add(result, kept=kept)
        bar.update(task, advance=1, status=f"failed {summary.failed}" if summary.failed else "")

    admit = asyncio.Lock()

    async def group(i: int, js: list[int]) -> None:
        """A group's members take their slots together (up to `concurrency`), so that they start,
        and their first requests meet in `GroupedEngine`, together."""
        together, taken = min(len(js), config.concurrency), 0
        try:
            async with admit:
                for _ in range(together):
                    await semaphore.acquire()
                    taken += 1
        except BaseException:  # cancelled while waiting: give back what it took
            for _ in range(taken):
                semaphore.release()
            raise
        await asyncio.gather(*(one(i, j, admitted=k < together) for k, j in enumerate(js)))

    with bar:
        if grouped:
            by_group: dict[int, list[int]] = {}
            for i, j in jobs:
                by_group.setdefault(i, []).append(j)
            await asyncio.gather(*(group(i, js) for i, js in by_group.items()))
        else:
            await asyncio.gather(*(one(i, j) for i, j in jobs))
    summary.seconds = time.perf_counter() - start
    if store is not None and stats0 is not None:
        stats = store.stats()
        summary.feature_store_hits = stats.hits - stats0.hits
        summary.feature_store_misses = stats.misses - stats0.misses
    return summary


def _unstarted(config: RunConfig, i: int, j: int, exc: BaseException) -> RolloutResult:
    """The result of a rollout whose environment could not be made."""
    error = RolloutError(kind="env_error", message=f"{type(exc).__name__}: {exc}", step=0)
    return RolloutResult(Trajectory(id=trajectory_id(config, i, j), env=config.env, prompt_index=i,
                                    sample_index=j, seed=env_seed(config, i), finish="error", error=error))
