"""The embedded engine: a transformers Qwen / Qwen-VL model run in this process, token-in/token-out.

Requests are checked on the caller's thread (placeholders first, DESIGN invariant 3); one worker
thread runs the model. Requests waiting at the same time are prefilled together (left-padded,
images of all of them in one vision pass) and decoded together with a KV cache, each row with
its own sampling settings and seeded generator. Positions are computed once per prompt with the
model's own `get_rope_index` (M-RoPE for Qwen-VL) and passed explicitly at every step, so the
model's stateful `rope_deltas` is never used and prefill + cached decode equals one full forward
pass over prompt + completion.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from rollwire.render import ImageRef, ModelDir, family_of, validate_placeholders

if TYPE_CHECKING:
    import torch

__all__ = ["LocalEngine", "LocalEngineStats"]

LOCAL_HINT = "pip install 'rollwire[local]'"
GREEDY_TEMPERATURE = 1e-5  # below this a request is greedy (vLLM's threshold)


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
        self._torch, transformers = _import_backend()
        self.is_vision, cls = _model_class(transformers, model)
        self._model = _load_model(self._torch, cls, model.path, device, dtype)
        self._device = self._torch.device(device)
        config = self._model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        self.max_model_len = int(getattr(text_config, "max_position_embeddings", 0) or 2**31)
        self.eos_token_ids = _eos_ids(self._model)
        self.pad_token_id = _pad_id(text_config, self.eos_token_ids)
        self.image_pad_id = _image_pad_id(model, config) if self.is_vision else None
        if self.is_vision:
            if feature_store is None:
                raise EngineUnavailableError(
                    f"{self.model_dir.name} is a vision model: pass the renderer's feature_store=")
            _check_store(feature_store, config)
        params = inspect.signature(self._model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._rope_index = _rope_index_fn(self._model) if self.is_vision else None

        # Image kwargs by image id (worker thread only): normalised once per image, not per turn.
        self._inputs_cache: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._inputs_cache_bytes, self._inputs_cached = image_cache_bytes, 0
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
        _check_sampling(sp, self.vocab_size)
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
        torch = self._torch
        now = time.perf_counter()
        for job in jobs:
            job.started = now
            job.completions = [None] * job.sampling.n
        logits, cache, mask, positions = self._prefill(jobs)
        # One row per completion: rows of a prompt share its prefilled cache entries.
        order = [b for b, job in enumerate(jobs) for _ in range(job.sampling.n)]
        rows = [_Row(job, i, _generator(torch, self._device, job.sampling.seed, i), positions[b])
                for b, job in enumerate(jobs) for i in range(job.sampling.n)]
        if order != list(range(len(jobs))):
            index = torch.tensor(order, device=self._device)
            _select_rows(cache, index)
            logits = logits[index]
            mask = mask[index] if mask is not None else None
        banned = {id(job): torch.tensor(job.sampling.banned_token_ids, dtype=torch.long, device=logits.device)
                  for job in jobs if job.sampling.banned_token_ids}
        while True:
            log_norm = torch.logsumexp(logits, dim=-1)  # raw logprob = logit - log_norm
            keep: list[int] = []
            for i, row in enumerate(rows):
                token = self._pick(logits[i], row, banned.get(id(row.job)))
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
                _select_rows(cache, index)
                mask = mask[index] if mask is not None else None
                rows = [rows[i] for i in keep]
            logits, mask = self._decode_step(rows, cache, mask)

    def _prefill(self, jobs: list[_Job]) -> tuple[torch.Tensor, Any, torch.Tensor | None, list[int]]:
        """Run the left-padded prompts (and every image) once; return last-position logits, the
        cache, the padding mask (None without padding) and each prompt's next position."""
        torch = self._torch
        width = max(len(job.prompt) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        mm_types = torch.zeros((len(jobs), width), dtype=torch.long)
        axes = 3 if self._rope_index is not None else 1  # M-RoPE axes; Gemma 4 has plain positions
        position_ids = torch.zeros((axes, len(jobs), width), dtype=torch.long)
        next_positions: list[int] = []
        for b, job in enumerate(jobs):
            pad = width - len(job.prompt)
            prompt = torch.tensor(job.prompt, dtype=torch.long)
            ids[b, pad:] = prompt
            mask[b, pad:] = 1
            for ref in job.refs:
                mm_types[b, pad + ref.offset : pad + ref.end] = 1
            positions, next_position = self._prompt_positions(prompt, mm_types[b, pad:], job)
            position_ids[:, b, pad:] = positions
            next_positions.append(next_position)
        padded = not bool(mask.all())
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self._device),
            "attention_mask": mask.to(self._device) if padded else None,
            "position_ids": (position_ids if axes == 3 else position_ids[0]).to(self._device),
            self._cache_kwarg: _new_cache(self._model),
            "use_cache": True,
        }
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        if self.is_vision:
            kwargs["mm_token_type_ids"] = mm_types.to(self._device)
            features = [feat for job in jobs for feat in job.features]
            if features:
                for name, tensor in self._image_inputs(features).items():
                    kwargs[name] = tensor
        out = self._model(**kwargs)
        logits = out.logits[:, -1, :].float()
        return logits, kwargs[self._cache_kwarg], kwargs["attention_mask"], next_positions

    def _image_inputs(self, features: list[ImageFeatures]) -> dict[str, torch.Tensor]:
        """The model's image kwargs for these images, each image's made (normalised) once and kept
        in a byte-bounded LRU, not again on every turn that carries it."""
        assert self.feature_store is not None
        parts: list[dict[str, torch.Tensor]] = []
        for feat in features:
            cached = self._inputs_cache.get(feat.id)
            if cached is None:
                arrays = self.feature_store.config.model_inputs([feat])
                cached = {k: self._torch.from_numpy(v).to(self._device) for k, v in arrays.items()}
                size = _nbytes(cached)
                if size <= self._inputs_cache_bytes:
                    self._inputs_cache[feat.id] = cached
                    self._inputs_cached += size
                    while self._inputs_cached > self._inputs_cache_bytes:
                        _, old = self._inputs_cache.popitem(last=False)
                        self._inputs_cached -= _nbytes(old)
            else:
                self._inputs_cache.move_to_end(feat.id)
            parts.append(cached)
        return {k: self._torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _prompt_positions(self, prompt: torch.Tensor, mm_types: torch.Tensor, job: _Job) -> tuple[torch.Tensor, int]:
        """(axes, len) positions of one unpadded prompt and the position of the token after it."""
        torch = self._torch
        if not job.refs or self._rope_index is None:
            return torch.arange(len(job.prompt)), len(job.prompt)
        grids = torch.tensor([ref.grid_thw for ref in job.refs], dtype=torch.long)
        positions, delta = self._rope_index(prompt[None], mm_types[None], grids)
        return positions[:, 0, :], len(job.prompt) + int(delta.reshape(-1)[0])

    def _decode_step(self, rows: list[_Row], cache: Any,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch = self._torch
        ids = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self._device)
        # The token just sampled sits at next_position - 1.
        pos = torch.tensor([row.next_position - 1 for row in rows], dtype=torch.long, device=self._device)
        position_ids = pos.view(1, -1, 1).expand(3, -1, -1) if self._rope_index is not None else pos.view(-1, 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float(), mask

    # --- sampling -------------------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor, row: _Row, banned: torch.Tensor | None) -> int:
        """The next token of `row` from its raw logits (1-D, float32)."""
        torch = self._torch
        sp = row.job.sampling
        if banned is not None:
            logits = logits.index_fill(0, banned, -math.inf)
        if sp.temperature < GREEDY_TEMPERATURE:
            return int(torch.argmax(logits))
        values, ids = _top_k_top_p(torch, logits / sp.temperature, sp.top_k, sp.top_p)
        choice = _inverse_cdf(torch, values, row.generator)
        return choice if ids is None else int(ids[choice])

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


def _check_sampling(sp: SamplingParams, vocab_size: int) -> None:
    if sp.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {sp.max_tokens}")
    if sp.n < 1:
        raise InvalidRequestError(f"n must be >= 1, got {sp.n}")
    if not (math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequestError(f"temperature must be finite and >= 0, got {sp.temperature}")
    if not 0 < sp.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < -1:
        raise InvalidRequestError(f"top_k must be >= 0 (or -1 for off), got {sp.top_k}")
    if any(not 0 <= t < vocab_size for t in sp.banned_token_ids):
        raise InvalidRequestError(f"banned_token_ids must lie in [0, {vocab_size})")
    if len(set(sp.banned_token_ids)) >= vocab_size:
        raise InvalidRequestError("banned_token_ids leaves no token to sample")


def _top_k_top_p(torch: Any, logits: torch.Tensor, top_k: int,
                 top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidates vLLM's filter keeps from tempered logits: the top_k largest, then the smallest
    prefix (by descending probability among those) whose mass reaches top_p. Returns (logits, ids)
    of the candidates, or (all logits, None) when neither filter is on."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        values, ids = torch.topk(logits, top_k)  # sorted, descending
    elif top_p < 1.0:
        values, ids = torch.sort(logits, descending=True)
    else:
        return logits, None
    if top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = int((mass_before < top_p).sum().clamp(min=1))
        values, ids = values[:keep], ids[:keep]
    return values, ids


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _inverse_cdf(torch: Any, logits: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn from softmax(logits) with one uniform: the first whose cumulative mass exceeds
    u * total (float64 sums; zero-probability entries are never drawn). Exact in distribution, and
    several times cheaper than `torch.multinomial` over a 150k-256k vocabulary."""
    weights = torch.exp((logits - logits.max()).double())
    cumulative = torch.cumsum(weights, dim=0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=logits.device) * cumulative[-1]
    return int(torch.searchsorted(cumulative, u, right=True).clamp(max=logits.shape[0] - 1))


def _generator(torch: Any, device: torch.device, seed: int | None, index: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index) % 2**63 if seed is not None else secrets.randbits(63))
    return generator


def _import_backend() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EngineUnavailableError(f"the local engine needs torch and transformers ({exc}): {LOCAL_HINT}") from None
    return torch, transformers


def _model_class(transformers: Any, model: ModelDir) -> tuple[bool, Any]:
    """(is_vision, transformers class) of the directory: from its family's record, or for a vision
    model no family claims (the generic path) from `config.json`'s `architectures`."""
    family = family_of(model)
    name = family.model_types.get(model.model_type) if family is not None else None
    if name is None:
        is_vision = "vision_config" in model.config or (family is not None and family.is_vision)
        if not is_vision:
            return False, transformers.AutoModelForCausalLM
        architectures = model.config.get("architectures")
        name = architectures[0] if family is None and isinstance(architectures, list) and architectures else None
        if not isinstance(name, str):
            raise EngineUnavailableError(f"model type {model.model_type!r} is a vision model whose transformers "
                                         "class neither a family record nor config.json's architectures names")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise EngineUnavailableError(f"transformers {transformers.__version__} has no {name}: upgrade it")
    return True, cls


def _load_model(torch: Any, cls: Any, model_dir: Path, device: str, dtype: str) -> Any:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise EngineUnavailableError(f"dtype must name a torch float type (float32, bfloat16, ...), got {dtype!r}")
    try:
        model = cls.from_pretrained(str(model_dir), dtype=torch_dtype)
        model.to(device)
    except Exception as exc:  # transformers/torch raise many kinds; name the model that failed
        raise EngineUnavailableError(f"cannot load {model_dir} with {cls.__name__}: {exc}") from exc
    model.eval()
    return model


def _eos_ids(model: Any) -> frozenset[int]:
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else (int(t) for t in eos))
    return frozenset()


def _pad_id(text_config: Any, eos_ids: frozenset[int]) -> int:
    """The token left padding is filled with (masked out, so any valid id works)."""
    pad = getattr(text_config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return min(eos_ids) if eos_ids else 0


def _image_pad_id(model: ModelDir, config: Any) -> int:
    """The placeholder id the model's forward pass looks for (its config's `image_token_id`)."""
    pad = getattr(config, "image_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise EngineUnavailableError(f"the config of {model.path} names no image_token_id")
    return pad


def _check_store(store: FeatureStore, config: Any) -> None:
    """The store's features must have the shape the model's vision tower takes."""
    try:
        store.config.check_model(config.vision_config)
    except FeatureError as exc:
        raise EngineUnavailableError(f"the feature store does not fit {type(config).__name__}: {exc}") from None


def _rope_index_fn(model: Any) -> Any:
    """`(input_ids, mm_token_type_ids, image_grid_thw) -> (positions (3,1,L), delta)` from the model
    (None: the model has no M-RoPE, its positions are 1-D)."""
    owner = model if hasattr(model, "get_rope_index") else model.model
    rope_index = getattr(owner, "get_rope_index", None)
    if rope_index is None:
        return None
    takes_types = "mm_token_type_ids" in inspect.signature(rope_index).parameters

    def positions(input_ids: Any, mm_types: Any, grids: Any) -> Any:
        if takes_types:
            return rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grids)
        return rope_index(input_ids, image_grid_thw=grids)

    return positions


def _select_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep the cache rows `index` in every layer: key/value and linear-attention (conv, recurrent)
    states alike (`reorder_cache` is the per-layer row selection every cache layer has)."""
    for layer in cache.layers:
        layer.reorder_cache(index)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
