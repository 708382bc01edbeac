"""Reading a packed batch back: equal trajectories and zero-copy image features, or a CodecError.

Decoding is bounded by the input, so a small hostile record cannot take a large amount of memory:
the metadata inflates to at most `META_INFLATION` times its compressed size (or 1 MiB) and
`max_meta_bytes`; the decoded prompts, completions and image refs together hold at most
`TOKENS_PER_BYTE` items per input byte (or `max_tokens`), i.e. at most 8 x that in list memory.
A step decodes to at most every token its trajectory stored plus as many refs (a ref covers at
least one pad token) and a stored token takes 4 bytes, so trajectories of at most
2 x `TOKENS_PER_BYTE` = 128 steps always fit; a linear conversation, about twice as many.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from rollwire.errors import CodecError, FeatureError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.render.types import ImageRef
from rollwire.rollout.types import Step, Trajectory

from .batch_format import (
    BODY,
    FORMAT_VERSION,
    FRAME,
    MAGIC,
    MAX_META_BYTES,
    META,
    META_FLOOR,
    META_INFLATION,
    SCHEMA,
    STEP_NAMES,
    TOKENS_PER_BYTE,
    TRAJECTORY_NAMES,
    Body,
    StepHead,
)

__all__ = ["PackedBatch", "unpack"]


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Unpacked trajectories and the images the batch carried.

    `images` holds zero-copy, read-only views of the packed buffer (empty when it was packed
    without pixels); `image_ids` lists every image the trajectories refer to.
    """

    trajectories: list[Trajectory]
    images: dict[str, ImageFeatures]
    image_ids: tuple[str, ...]

    def store_into(self, store: FeatureStore) -> int:
        """Put the batch's images into `store` (copied, so the store does not pin the packed buffer).
        Returns how many were new to it."""
        added = 0
        for image_id, feats in self.images.items():
            if image_id in store:
                store.put(feats)  # checks the grid agrees, refreshes its LRU position
                continue
            store.put(ImageFeatures(image_id, np.array(feats.pixel_values), feats.grid_thw, feats.merge_size))
            added += 1
        return added


def _read_frame(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) < FRAME.size:
        raise CodecError(f"packed batch is truncated ({len(view)} bytes, the frame alone is {FRAME.size})")
    magic, version, crc, length = FRAME.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("not a packed batch (bad magic)")
    if version != FORMAT_VERSION:
        raise CodecError(f"packed batch format {version} is not supported (this is {FORMAT_VERSION})")
    body = view[FRAME.size:]
    if len(body) != length:
        raise CodecError(f"packed batch body is {len(body)} bytes, the frame says {length} (truncated?)")
    if zlib.crc32(body) != crc:
        raise CodecError("packed batch checksum mismatch (corrupted)")
    return body


def _check_schema(body: memoryview) -> None:
    schema = SCHEMA.decode(body)
    if schema.version != FORMAT_VERSION:
        raise CodecError(f"packed body format {schema.version} is not supported")
    for what, got, ours in (("Step", schema.step_fields, STEP_NAMES),
                            ("Trajectory", schema.trajectory_fields, TRAJECTORY_NAMES)):
        if got != ours:
            raise CodecError(f"packed batch was written with {what} fields {got}, this version has {ours}")


def _meta(body: Body, max_bytes: int) -> Any:
    """The inflated metadata; the declared size bounds the output (no zlib bombs): at most `max_bytes`
    and `META_INFLATION` times the compressed size (or 1 MiB)."""
    bound = min(max_bytes, max(META_FLOOR, META_INFLATION * len(body.meta)))
    if not 0 <= body.meta_size <= bound:
        raise CodecError(f"packed metadata declares {body.meta_size} bytes from {len(body.meta)} compressed "
                         f"(the bound is {bound})")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body.meta, body.meta_size + 1)
    except zlib.error as exc:
        raise CodecError(f"packed metadata does not inflate: {exc}") from None
    if len(raw) != body.meta_size or not inflater.eof or inflater.unused_data:
        raise CodecError(f"packed metadata inflates to {len(raw)}+ bytes, the body says {body.meta_size}")
    return META.decode(raw)


def _images(body: Body) -> dict[str, ImageFeatures]:
    if not body.pixels:
        return {}
    if len(body.pixels) != len(body.image_ids):
        raise CodecError(f"packed batch has {len(body.pixels)} pixel arrays for {len(body.image_ids)} images")
    images = {}
    for image_id, px in zip(body.image_ids, body.pixels, strict=True):
        try:
            images[image_id] = ImageFeatures(image_id, px.rows, px.grid_thw, px.merge_size)
        except FeatureError as exc:
            raise CodecError(f"packed batch: {exc}") from None
    return images


def _check_heads(heads: list[StepHead], t: int, n_images: int) -> int:
    """Check one trajectory's step heads before anything is built; returns the items they decode to
    (prompt and completion tokens and image refs, summed over steps)."""
    sizes: list[tuple[int, int]] = []  # per step: (prompt + completion tokens, image refs)
    total = 0
    for k, head in enumerate(heads):
        if not -1 <= head.base < k or (head.refs_extend and head.base < 0):
            raise CodecError(f"packed trajectory {t} step {k} names base step {head.base}")
        if head.new_tokens < 0 or head.completion_tokens < 0 or head.logprobs < -1:
            raise CodecError(f"packed trajectory {t} step {k} has negative counts")
        for r in head.refs:
            if not 0 <= r.image < n_images:
                raise CodecError(f"packed trajectory {t} step {k} refers to an image outside the batch")
            if r.offset < 0 or r.length <= 0 or min(r.grid_thw) <= 0:
                raise CodecError(f"packed trajectory {t} step {k} has an image ref at offset {r.offset}, "
                                 f"length {r.length}, grid {r.grid_thw}")
        tokens, refs = head.new_tokens + head.completion_tokens, len(head.refs)
        if head.base >= 0:
            tokens += sizes[head.base][0]
            refs += sizes[head.base][1] if head.refs_extend else 0
        sizes.append((tokens, refs))
        total += tokens + refs
    return total


def unpack(data: bytes | bytearray | memoryview, *, max_meta_bytes: int = MAX_META_BYTES,
           max_tokens: int | None = None) -> PackedBatch:
    """Decode a `pack`ed batch: equal trajectories and (zero-copy) image features.

    Every malformed, truncated or hostile buffer is a `CodecError`. The decoded prompt and
    completion tokens plus image refs are at most `max_tokens` (default `TOKENS_PER_BYTE` per input
    byte), checked before any step is built; the inflated metadata is bounded as `_meta` says.
    """
    body_view = _read_frame(data)
    budget = TOKENS_PER_BYTE * len(body_view) if max_tokens is None else max_tokens
    _check_schema(body_view)
    body = BODY.decode(body_view)
    if len(body.image_ids) != len(set(body.image_ids)):
        raise CodecError("packed batch lists an image id twice")
    meta = _meta(body, max_meta_bytes)
    if not (len(meta.trajectories) == len(meta.heads) == len(meta.rests)):
        raise CodecError("packed batch trajectory, head and step lists differ in length")
    for arr, kinds, what in ((body.tokens, ("int32", "int64"), "tokens"),
                             (body.logprobs, ("float32", "float64"), "logprobs")):
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.name not in kinds:
            raise CodecError(f"packed {what} must be a 1-D {' or '.join(kinds)} numpy array, "
                             f"got {type(arr).__name__} {getattr(arr, 'dtype', '')}{getattr(arr, 'shape', '')}")
    ids = body.image_ids
    decoded = 0
    for t, (heads, step_rests) in enumerate(zip(meta.heads, meta.rests, strict=True)):
        if len(heads) != len(step_rests):
            raise CodecError(f"packed trajectory {t} has unequal head and step lists")
        decoded += _check_heads(heads, t, len(ids))
        if decoded > budget:
            raise CodecError(f"packed batch decodes to more than {budget} tokens and image refs "
                             f"({len(body_view)} input bytes; see unpack's max_tokens)")
    tokens: tuple[int, ...] = tuple(body.tokens.tolist())  # a step's ids are tuples (see `Step`)
    logprobs: tuple[float, ...] = tuple(body.logprobs.tolist())
    images = _images(body)
    tok_pos = lp_pos = 0
    trajectories = []
    for rest, heads, step_rests in zip(meta.trajectories, meta.heads, meta.rests, strict=True):
        steps: list[Step] = []
        for k, (head, step_rest) in enumerate(zip(heads, step_rests, strict=True)):
            mid = tok_pos + head.new_tokens
            end = mid + head.completion_tokens
            if end > len(tokens) or (head.logprobs > 0 and lp_pos + head.logprobs > len(logprobs)):
                raise CodecError(f"packed step {k} reads past the token or logprob array")
            refs = tuple(ImageRef(ids[r.image], r.offset, r.length, r.grid_thw) for r in head.refs)
            prompt = tokens[tok_pos:mid]
            if head.base >= 0:
                base = steps[head.base]
                prompt = base.prompt_ids + base.completion_ids + prompt
                if head.refs_extend:
                    refs = base.images + refs
            step_logprobs = None
            if head.logprobs >= 0:
                step_logprobs = logprobs[lp_pos:lp_pos + head.logprobs]
                lp_pos += head.logprobs
            steps.append(Step(prompt_ids=prompt, images=refs, completion_ids=tokens[mid:end],
                              completion_logprobs=step_logprobs, **msgspec.structs.asdict(step_rest)))
            tok_pos = end
        trajectories.append(Trajectory(steps=steps, **msgspec.structs.asdict(rest)))
    if tok_pos != len(tokens) or lp_pos != len(logprobs):
        raise CodecError("packed batch has tokens or logprobs no step accounts for")
    return PackedBatch(trajectories=trajectories, images=images, image_ids=tuple(ids))
