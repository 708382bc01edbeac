"""The embedded engine: a transformers Qwen / Qwen-VL model run in this process, token-in/token-out.

This module is the `Engine` and its scheduler: requests are checked on the caller's thread
(placeholders first, DESIGN invariant 3); one worker thread runs the model. Requests waiting at
the same time are prefilled together and decoded together with a KV cache, each row with its own
sampling settings and seeded generator. The model, its loading and its forward passes are
`local_model.py`; the sampler is `local_sampler.py`; the image tensors kept between turns are
`local_image_inputs.py`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rollwire.engines.local_model import LocalModel
from rollwire.engines.local_sampler import check_sampling, new_generator, sample
from rollwire.engines.types import (
    Completion,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    Timings,
)
from rollwire.errors import (
    EngineClosedError,
    EngineError,
    EngineUnavailableError,
    FeatureError,
    InvalidRequestError,
    RollwireError,
)
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.render import ImageRef, ModelDir, validate_placeholders

if TYPE_CHECKING:
    import torch

__all__ = ["LocalEngine", "LocalEngineStats"]


@dataclass(frozen=True)
class LocalEngineStats:
    requests: int  # requests served (including failed and aborted ones)
    batches: int  # prefill + decode runs of the worker
    max_batch_rows: int  # most sequences decoded together so far


@dataclass(eq=False)
class _Job:
    """One request on its way through the worker; resolved on its own event loop."""

    prompt: list[int]
    refs: tuple[ImageRef, ...]
    features: list[ImageFeatures]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerateResult]
    enqueued: float
    started: float = 0.0
    completions: list[Completion | None] = field(default_factory=list)
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    """One sequence being decoded: completion `index` of `job`."""

    job: _Job
    index: int
    generator: torch.Generator
    next_position: int  # position (every M-RoPE axis) of the next input token
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class LocalEngine:
    """The in-process `Engine`: loads `model_dir` with transformers and samples token by token.

    Logprobs are vLLM's default "raw logprobs": the log-softmax of the model's own logits at
    temperature 1, taken *before* banned ids, temperature, top-k and top-p are applied, of the
    token that was sampled. Temperature below 1e-5 is greedy (argmax after banning). With a seed,
    completion i of a request uses a `torch.Generator` seeded with `seed + i`; without one, a
    random seed. A sampled stop id ends a completion with finish_reason "stop" and stop_reason
    that id; the model's EOS ids (generation_config) end it with stop_reason None, as vLLM does.
    Concurrent requests are batched (up to `max_batch_size` sequences); requests arriving while
    a batch runs wait for the next one.
    """

    def __init__(
        self,
        model_dir: str | Path | ModelDir,
        *,
        feature_store: FeatureStore | None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 8,
        image_cache_bytes: int = 1 << 30,
    ) -> None:
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {max_batch_size}")
        try:
            model = model_dir if isinstance(model_dir, ModelDir) else ModelDir.load(model_dir)
        except RollwireError as exc:
            raise EngineUnavailableError(str(exc)) from None
        self.model_dir = model.path
        self.max_batch_size = max_batch_size
        self.feature_store = feature_store
        loaded = LocalModel(model, feature_store=feature_store, device=device, dtype=dtype,
                            image_cache_bytes=image_cache_bytes)
        self._model: LocalModel | None = loaded  # None once closed (the weights are freed)
        self._torch, self._device = loaded.torch, loaded.device
        self.is_vision, self.vocab_size, self.max_model_len = loaded.is_vision, loaded.vocab_size, loaded.max_model_len
        self.eos_token_ids, self.pad_token_id = loaded.eos_token_ids, loaded.pad_token_id
        self.image_pad_id = loaded.image_pad_id
        self._cond = threading.Condition()
        self._staged: list[_Job] = []  # submitted on a loop, released to the worker by _flush
        self._pending: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._requests = self._batches = self._max_rows = 0
        self._thread = threading.Thread(target=self._worker, name="rollwire-local-engine", daemon=True)
        self._thread.start()

    # --- the Engine protocol ------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Sample `request.sampling.n` completions; raises before any model call on bad input."""
        enqueued = time.perf_counter()
        if self._closed:
            raise EngineClosedError("the local engine is closed")
        features = self._check_request(request)
        loop = asyncio.get_running_loop()
        job = _Job(list(request.prompt_token_ids), tuple(request.images), features, request.sampling,
                   loop, loop.create_future(), enqueued)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the local engine is closed")
            self._staged.append(job)
        # Released on the loop's next turn: requests submitted together (asyncio.gather) share a batch.
        loop.call_soon(self._flush)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def close(self) -> None:
        """Stop the worker: queued requests fail with `EngineClosedError`, running ones end "abort"."""
        with self._cond:
            self._closed = True
            orphans = [*self._staged, *self._pending]
            self._staged.clear()
            self._pending.clear()
            self._cond.notify_all()
        for job in orphans:
            _deliver(job, EngineClosedError("the local engine was closed before the request ran"))
        await asyncio.to_thread(self._thread.join)
        self._model = None  # free the weights; the engine cannot be reopened

    async def __aenter__(self) -> LocalEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> LocalEngineStats:
        with self._cond:
            return LocalEngineStats(self._requests, self._batches, self._max_rows)

    # --- request checks (caller's thread) -------------------------------------------------------

    def _check_request(self, request: GenerateRequest) -> list[ImageFeatures]:
        sp = request.sampling
        check_sampling(sp, self.vocab_size)
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("prompt_token_ids is empty")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InvalidRequestError("prompt_token_ids must be a flat list of ints")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(prompt) + sp.max_tokens > self.max_model_len:
            raise InvalidRequestError(f"prompt ({len(prompt)}) + max_tokens ({sp.max_tokens}) exceeds the "
                                      f"model's {self.max_model_len} positions")
        if not self.is_vision:
            if request.images:
                raise InvalidRequestError(f"{self.model_dir.name} is a text-only model; the request has images")
            return []
        store = self.feature_store
        assert store is not None and self.image_pad_id is not None
        validate_placeholders(ids, request.images, pad_id=self.image_pad_id,
                              merge_size=store.config.merge_size, known_ids=store)
        features = [store.get(ref.id) for ref in request.images]  # held: eviction cannot race the run
        for ref, feat in zip(request.images, features, strict=True):
            if tuple(ref.grid_thw) != feat.grid_thw:
                raise FeatureError(f"image {ref.id[:12]}: ref grid {tuple(ref.grid_thw)} but the stored "
                                   f"features have grid {feat.grid_thw}")
        return features

    # --- the worker thread ----------------------------------------------------------------------

    def _flush(self) -> None:
        with self._cond:
            jobs, self._staged = self._staged, []
            if not self._closed:
                self._pending.extend(jobs)
                self._cond.notify()
                jobs = []
        for job in jobs:
            _deliver(job, EngineClosedError("the local engine was closed before the request ran"))

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
                if not batch:  # every waiting request was cancelled
                    continue
                rows = sum(job.sampling.n for job in batch)
                self._requests += len(batch)
                self._batches += 1
                self._max_rows = max(self._max_rows, rows)
            try:
                with self._torch.inference_mode():
                    self._run_batch(batch)
            except Exception as exc:  # never leave a caller waiting; say what failed
                error = exc if isinstance(exc, RollwireError) else EngineError(f"the local engine failed: {exc!r}")
                for job in batch:
                    _deliver(job, error)

    def _take_batch(self) -> list[_Job]:  # caller holds the lock
        batch: list[_Job] = []
        rows = 0
        while self._pending:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            if batch and rows + job.sampling.n > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            rows += job.sampling.n
        return batch

    def _run_batch(self, jobs: list[_Job]) -> None:
        torch, model = self._torch, self._model
        assert model is not None  # dropped only by close(), after this thread has ended
        now = time.perf_counter()
        for job in jobs:
            job.started = now
            job.completions = [None] * job.sampling.n
        logits, cache, mask, positions = model.prefill([(job.prompt, job.refs) for job in jobs],
                                                       [feat for job in jobs for feat in job.features])
        # One row per completion: rows of a prompt share its prefilled cache entries.
        order = [b for b, job in enumerate(jobs) for _ in range(job.sampling.n)]
        rows = [_Row(job, i, new_generator(torch, self._device, job.sampling.seed, i), positions[b])
                for b, job in enumerate(jobs) for i in range(job.sampling.n)]
        if order != list(range(len(jobs))):
            index = torch.tensor(order, device=self._device)
            model.select_rows(cache, index)
            logits = logits[index]
            mask = mask[index] if mask is not None else None
        banned = {id(job): torch.tensor(job.sampling.banned_token_ids, dtype=torch.long, device=logits.device)
                  for job in jobs if job.sampling.banned_token_ids}
        while True:
            log_norm = torch.logsumexp(logits, dim=-1)  # raw logprob = logit - log_norm
            keep: list[int] = []
            for i, row in enumerate(rows):
                token = sample(torch, logits[i], row.job.sampling, row.generator, banned.get(id(row.job)))
                row.tokens.append(token)
                row.logprobs.append(float(logits[i, token] - log_norm[i]))
                row.next_position += 1
                reason = self._finish_reason(row)
                if reason is not None:
                    self._complete(row, *reason)
                elif self._closed:
                    self._complete(row, "abort", None)
                elif not row.job.cancelled:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self._device)
                model.select_rows(cache, index)
                mask = mask[index] if mask is not None else None
                rows = [rows[i] for i in keep]
            # The token just sampled sits at next_position - 1.
            logits, mask = model.decode_step([row.tokens[-1] for row in rows],
                                             [row.next_position - 1 for row in rows], cache, mask)

    def _finish_reason(self, row: _Row) -> tuple[FinishReason, int | None] | None:
        sp = row.job.sampling
        token = row.tokens[-1]
        if token in sp.stop_token_ids:
            return "stop", token
        if token in self.eos_token_ids:
            return "stop", None
        if len(row.tokens) >= sp.max_tokens:
            return "length", None
        return None

    def _complete(self, row: _Row, reason: FinishReason, stop_reason: int | None) -> None:
        job = row.job
        job.completions[row.index] = Completion(
            token_ids=row.tokens, logprobs=row.logprobs if job.sampling.logprobs else None,
            finish_reason=reason, stop_reason=stop_reason)
        if all(c is not None for c in job.completions):
            done = time.perf_counter()
            completions = [c for c in job.completions if c is not None]
            _deliver(job, GenerateResult(completions=completions, timings=Timings(
                total_s=done - job.enqueued, queue_s=job.started - job.enqueued)))


# --- helpers ------------------------------------------------------------------------------------


def _deliver(job: _Job, outcome: GenerateResult | BaseException) -> None:
    """Resolve `job` on its own loop (from any thread); a cancelled or closed loop is ignored."""

    def resolve() -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
        job.loop.call_soon_threadsafe(resolve)
