"""Batches of trajectories that hold each unique image once and each token once.

`pack` writes the format of `batch_format`; `unpack` (in `unpacking`, re-exported here) reads it.
Prompts are delta-encoded: step k names the earlier step j of its trajectory whose prompt +
completion is the longest prefix of k's prompt and stores only the tokens after it, and only
the image refs after j's (offsets unchanged); other steps store their whole prompt. Decoding
restores equal Trajectory objects. The checksum and the decoder's bounds checks make a
truncated or corrupted buffer a CodecError, never a wrong batch. Inputs are not mutated.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from rollwire.errors import CodecError
from rollwire.features import FeatureStore
from rollwire.rollout.types import Trajectory

from .batch_format import (
    BODY,
    FORMAT_VERSION,
    FRAME,
    MAGIC,
    MAX_META_BYTES,
    META,
    META_INFLATION,
    STEP_NAMES,
    TOKENS_PER_BYTE,
    TRAJECTORY_NAMES,
    ZLIB_LEVEL,
    Body,
    Meta,
    PackedPixels,
    PackedRef,
    StepHead,
    StepRest,
    TrajectoryRest,
)
from .unpacking import PackedBatch, unpack

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_META_BYTES", "META_INFLATION", "TOKENS_PER_BYTE", "PackedBatch",
           "pack", "unpack"]

_INT32 = np.iinfo(np.int32)


def _int_array(values: Sequence[int], what: str) -> np.ndarray:
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise CodecError(f"{what} must be a flat list of ints that fit in int64")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise CodecError(f"{what} holds an id beyond int64")
    return arr.astype(np.int64, copy=False)


def _matches(seq: np.ndarray, start: int, part: np.ndarray) -> bool:
    """seq[start:start+len(part)] == part, comparing growing chunks so a mismatch exits early."""
    n = len(part)
    if n == 0:
        return True
    if seq[start] != part[0] or seq[start + n - 1] != part[n - 1]:
        return False
    pos, chunk = 0, 512
    while pos < n:
        end = min(n, pos + chunk)
        if not np.array_equal(seq[start + pos:start + end], part[pos:end]):
            return False
        pos, chunk = end, chunk * 4
    return True


def _find_base(k: int, prompts: list[np.ndarray], completions: list[np.ndarray]) -> int:
    """The earlier step whose prompt + completion is the longest prefix of step k's prompt, or -1."""
    pk = prompts[k]
    candidates = sorted(
        (len(prompts[j]) + len(completions[j]), j) for j in range(k)
        if 0 < len(prompts[j]) + len(completions[j]) <= len(pk))
    for _, j in reversed(candidates):  # longest first; among equals the latest
        if _matches(pk, 0, prompts[j]) and _matches(pk, len(prompts[j]), completions[j]):
            return j
    return -1


def pack(trajectories: Sequence[Trajectory], features: FeatureStore, *, include_pixels: bool = True) -> bytes:
    """Pack `trajectories` with each unique image's pixels (from `features`) once."""
    image_index: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    logprob_chunks: list[np.ndarray] = []
    traj_rests, all_heads, all_rests = [], [], []
    for t, traj in enumerate(trajectories):
        if not isinstance(traj, Trajectory):
            raise CodecError(f"trajectories[{t}] is a {type(traj).__name__}, not a Trajectory")
        prompts = [_int_array(s.prompt_ids, f"trajectory {traj.id} step {k} prompt_ids")
                   for k, s in enumerate(traj.steps)]
        completions = [_int_array(s.completion_ids, f"trajectory {traj.id} step {k} completion_ids")
                       for k, s in enumerate(traj.steps)]
        heads = []
        for k, step in enumerate(traj.steps):
            base = _find_base(k, prompts, completions)
            start = len(prompts[base]) + len(completions[base]) if base >= 0 else 0
            refs = step.images
            refs_extend = False
            if base >= 0:
                base_refs = traj.steps[base].images
                if step.images[:len(base_refs)] == base_refs:
                    refs, refs_extend = step.images[len(base_refs):], True
            chunks += (prompts[k][start:], completions[k])
            n_logprobs = -1
            if step.completion_logprobs is not None:
                try:
                    lp = np.asarray(step.completion_logprobs, dtype=np.float64)
                except (TypeError, ValueError):
                    raise CodecError(f"trajectory {traj.id} step {k}: logprobs are not numbers") from None
                if lp.ndim != 1:
                    raise CodecError(f"trajectory {traj.id} step {k}: logprobs must be a flat list")
                logprob_chunks.append(lp)
                n_logprobs = len(lp)
            heads.append(StepHead(
                base=base, refs_extend=refs_extend, new_tokens=len(prompts[k]) - start,
                completion_tokens=len(completions[k]), logprobs=n_logprobs,
                refs=[PackedRef(image_index.setdefault(r.id, len(image_index)), r.offset, r.length, r.grid_thw)
                      for r in refs]))
        all_heads.append(heads)
        all_rests.append([StepRest(**{name: getattr(s, name) for name in STEP_NAMES}) for s in traj.steps])
        traj_rests.append(TrajectoryRest(**{name: getattr(traj, name) for name in TRAJECTORY_NAMES}))

    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    if tokens.size == 0 or (int(tokens.min()) >= _INT32.min and int(tokens.max()) <= _INT32.max):
        tokens = tokens.astype(np.int32)
    logprobs = np.concatenate(logprob_chunks) if logprob_chunks else np.zeros(0, dtype=np.float64)
    as_f32 = logprobs.astype(np.float32)
    if np.array_equal(as_f32.astype(np.float64), logprobs, equal_nan=True):
        logprobs = as_f32  # lossless: these are float32 values (what engines return)

    image_ids = list(image_index)
    pixels = []
    if include_pixels:
        for image_id in image_ids:
            feats = features.get(image_id)
            pixels.append(PackedPixels(feats.pixel_values, feats.grid_thw, feats.merge_size))
    meta = META.encode(Meta(trajectories=traj_rests, heads=all_heads, rests=all_rests))
    body = BODY.encode(Body(
        version=FORMAT_VERSION, step_fields=STEP_NAMES, trajectory_fields=TRAJECTORY_NAMES,
        image_ids=image_ids, pixels=pixels, tokens=tokens, logprobs=logprobs,
        meta_size=len(meta), meta=zlib.compress(meta, ZLIB_LEVEL)))
    return b"".join((FRAME.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)), body))
