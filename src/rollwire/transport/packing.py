"""Batches of trajectories that hold each unique image once and each token once.

A packed batch is a frame around one msgpack body (see `codec`):

    b"RWPB" | u8 version | u32 crc32(body) | u64 len(body) | body

The body holds a schema line (the Step and Trajectory field names it was written with), the
ids of the batch's unique images with, when pixels are included, each one's uint8 patch rows,
grid and merge size; one token array (int32, or int64 when an id does not fit) and one logprob
array (float32 when every logprob is exactly a float32, as engines produce them, else float64)
that every step slices; and the zlib-compressed metadata: per step a head (base step, token
counts, new image refs as indices into the image table) and its remaining fields, per
trajectory its fields but the steps (mostly text and repeated field names, which compress).

Prompts are delta-encoded: step k names the earlier step j of its trajectory whose prompt +
completion is the longest prefix of k's prompt and stores only the tokens after it, and only
the image refs after j's (offsets unchanged); other steps store their whole prompt. Decoding
restores equal Trajectory objects. The checksum and the decoder's bounds checks make a
truncated or corrupted buffer a CodecError, never a wrong batch. Inputs are not mutated.

Decoding is bounded by the input, so a small hostile record cannot take a large amount of memory:
the metadata inflates to at most `META_INFLATION` times its compressed size (or 1 MiB) and
`max_meta_bytes`; the decoded prompts, completions and image refs together hold at most
`TOKENS_PER_BYTE` items per input byte (or `max_tokens`), i.e. at most 8 x that in list memory.
A step decodes to at most every token its trajectory stored plus as many refs (a ref covers at
least one pad token) and a stored token takes 4 bytes, so trajectories of at most
2 x `TOKENS_PER_BYTE` = 128 steps always fit; a linear conversation, about twice as many.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from rollwire.errors import CodecError, FeatureError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.render.types import ImageRef
from rollwire.rollout.types import Step, Trajectory

from .codec import Codec

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_META_BYTES", "META_INFLATION", "TOKENS_PER_BYTE", "PackedBatch",
           "pack", "unpack"]

MAGIC = b"RWPB"
MAX_META_BYTES = 1 << 30  # default bound on the inflated metadata of one batch
META_INFLATION = 128  # inflated / compressed metadata (real batches: 4-11x; zlib's ceiling: ~1032x)
_META_FLOOR = 1 << 20  # small batches may always inflate this far
TOKENS_PER_BYTE = 64  # decoded tokens + image refs per input byte (delta encoding expands prompts)
FORMAT_VERSION = 1
_FRAME = struct.Struct("<4sBIQ")
_DELTA_FIELDS = ("prompt_ids", "images", "completion_ids", "completion_logprobs")
_INT32 = np.iinfo(np.int32)


# --- wire types -----------------------------------------------------------------------------


class _Ref(msgspec.Struct, array_like=True, frozen=True):
    image: int  # index into the batch's image ids
    offset: int
    length: int
    grid_thw: tuple[int, int, int]


class _StepHead(msgspec.Struct, array_like=True, frozen=True):
    base: int  # earlier step of the trajectory whose prompt + completion prefixes this prompt, or -1
    refs_extend: bool  # refs follow the base step's images; else they are the whole list
    new_tokens: int  # prompt tokens after the base (the whole prompt when base == -1)
    completion_tokens: int
    logprobs: int  # number of logprobs, -1 for None
    refs: list[_Ref]


class _Pixels(msgspec.Struct, array_like=True, frozen=True):
    rows: np.ndarray  # uint8 (patches, row_size)
    grid_thw: tuple[int, int, int]
    merge_size: int


class _Schema(msgspec.Struct, array_like=True, frozen=True):
    """What the body starts with; read first so a mismatch gets a clear error."""

    version: int
    step_fields: list[str]
    trajectory_fields: list[str]


_STEP_REST_FIELDS = [f for f in msgspec.structs.fields(Step) if f.name not in _DELTA_FIELDS]
_TRAJ_REST_FIELDS = [f for f in msgspec.structs.fields(Trajectory) if f.name != "steps"]
_STEP_NAMES = [f.name for f in _STEP_REST_FIELDS]
_TRAJ_NAMES = [f.name for f in _TRAJ_REST_FIELDS]
# Step and Trajectory minus the delta-encoded fields, as positional (array_like) structs.
_StepRest: Any = msgspec.defstruct("StepRest", [(f.name, f.type) for f in _STEP_REST_FIELDS],
                                   array_like=True, frozen=True, module=__name__)
_TrajRest: Any = msgspec.defstruct("TrajectoryRest", [(f.name, f.type) for f in _TRAJ_REST_FIELDS],
                                   array_like=True, frozen=True, module=__name__)
_Meta: Any = msgspec.defstruct("PackedMeta", [
    ("trajectories", list[_TrajRest]),
    ("heads", list[list[_StepHead]]),
    ("rests", list[list[_StepRest]]),
], array_like=True, frozen=True, module=__name__)


class _Body(msgspec.Struct, array_like=True, frozen=True):
    version: int
    step_fields: list[str]
    trajectory_fields: list[str]
    image_ids: list[str]
    pixels: list[_Pixels]  # aligned with image_ids, or empty
    tokens: np.ndarray  # int32 or int64: every step's new prompt tokens, then its completion
    logprobs: np.ndarray  # float32 or float64
    meta_size: int
    meta: bytes  # zlib of the msgpack `_Meta`: per-step heads and every other field (mostly text)


_BODY: Codec[_Body] = Codec(_Body)
_META: Codec[Any] = Codec(_Meta)
_ZLIB_LEVEL = 6
_SCHEMA: Codec[_Schema] = Codec(_Schema)


# --- the batch ------------------------------------------------------------------------------


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


# --- packing --------------------------------------------------------------------------------


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
            heads.append(_StepHead(
                base=base, refs_extend=refs_extend, new_tokens=len(prompts[k]) - start,
                completion_tokens=len(completions[k]), logprobs=n_logprobs,
                refs=[_Ref(image_index.setdefault(r.id, len(image_index)), r.offset, r.length, r.grid_thw)
                      for r in refs]))
        all_heads.append(heads)
        all_rests.append([_StepRest(**{name: getattr(s, name) for name in _STEP_NAMES}) for s in traj.steps])
        traj_rests.append(_TrajRest(**{name: getattr(traj, name) for name in _TRAJ_NAMES}))

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
            pixels.append(_Pixels(feats.pixel_values, feats.grid_thw, feats.merge_size))
    meta = _META.encode(_Meta(trajectories=traj_rests, heads=all_heads, rests=all_rests))
    body = _BODY.encode(_Body(
        version=FORMAT_VERSION, step_fields=_STEP_NAMES, trajectory_fields=_TRAJ_NAMES,
        image_ids=image_ids, pixels=pixels, tokens=tokens, logprobs=logprobs,
        meta_size=len(meta), meta=zlib.compress(meta, _ZLIB_LEVEL)))
    return b"".join((_FRAME.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)), body))


# --- unpacking ------------------------------------------------------------------------------


def _read_frame(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) < _FRAME.size:
        raise CodecError(f"packed batch is truncated ({len(view)} bytes, the frame alone is {_FRAME.size})")
    magic, version, crc, length = _FRAME.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("not a packed batch (bad magic)")
    if version != FORMAT_VERSION:
        raise CodecError(f"packed batch format {version} is not supported (this is {FORMAT_VERSION})")
    body = view[_FRAME.size:]
    if len(body) != length:
        raise CodecError(f"packed batch body is {len(body)} bytes, the frame says {length} (truncated?)")
    if zlib.crc32(body) != crc:
        raise CodecError("packed batch checksum mismatch (corrupted)")
    return body


def _check_schema(body: memoryview) -> None:
    schema = _SCHEMA.decode(body)
    if schema.version != FORMAT_VERSION:
        raise CodecError(f"packed body format {schema.version} is not supported")
    for what, got, ours in (("Step", schema.step_fields, _STEP_NAMES),
                            ("Trajectory", schema.trajectory_fields, _TRAJ_NAMES)):
        if got != ours:
            raise CodecError(f"packed batch was written with {what} fields {got}, this version has {ours}")


def _meta(body: _Body, max_bytes: int) -> Any:
    """The inflated metadata; the declared size bounds the output (no zlib bombs): at most `max_bytes`
    and `META_INFLATION` times the compressed size (or 1 MiB)."""
    bound = min(max_bytes, max(_META_FLOOR, META_INFLATION * len(body.meta)))
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
    return _META.decode(raw)


def _images(body: _Body) -> dict[str, ImageFeatures]:
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


def _check_heads(heads: list[_StepHead], t: int, n_images: int) -> int:
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
    body = _BODY.decode(body_view)
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
    tokens: list[int] = body.tokens.tolist()
    logprobs: list[float] = body.logprobs.tolist()
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
