"""The packed batch's byte format: the frame, the body and its metadata, declared once as structs.

    b"RWPB" | u8 version | u32 crc32(body) | u64 len(body) | body

The body holds a schema line (the Step and Trajectory field names it was written with), the
ids of the batch's unique images with, when pixels are included, each one's uint8 patch rows,
grid and merge size; one token array (int32, or int64 when an id does not fit) and one logprob
array (float32 when every logprob is exactly a float32, as engines produce them, else float64)
that every step slices; and the zlib-compressed metadata: per step a head (base step, token
counts, new image refs as indices into the image table) and its remaining fields, per
trajectory its fields but the steps (mostly text and repeated field names, which compress).
`packing` writes it, `unpacking` reads it (and bounds what a hostile buffer may decode to).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np

from rollwire.rollout.types import Step, Trajectory

from .codec import Codec

__all__ = ["BODY", "DELTA_FIELDS", "FORMAT_VERSION", "FRAME", "MAGIC", "MAX_META_BYTES", "META", "META_FLOOR",
           "META_INFLATION", "SCHEMA", "STEP_NAMES", "TOKENS_PER_BYTE", "TRAJECTORY_NAMES", "ZLIB_LEVEL", "Body",
           "Meta", "PackedPixels", "PackedRef", "Schema", "StepHead", "StepRest", "TrajectoryRest"]

MAGIC = b"RWPB"
FORMAT_VERSION = 1
FRAME = struct.Struct("<4sBIQ")
MAX_META_BYTES = 1 << 30  # default bound on the inflated metadata of one batch
META_INFLATION = 128  # inflated / compressed metadata (real batches: 4-11x; zlib's ceiling: ~1032x)
META_FLOOR = 1 << 20  # small batches may always inflate this far
TOKENS_PER_BYTE = 64  # decoded tokens + image refs per input byte (delta encoding expands prompts)
ZLIB_LEVEL = 6
DELTA_FIELDS = ("prompt_ids", "images", "completion_ids", "completion_logprobs")  # in the heads and arrays


class PackedRef(msgspec.Struct, array_like=True, frozen=True):
    image: int  # index into the batch's image ids
    offset: int
    length: int
    grid_thw: tuple[int, int, int]


class StepHead(msgspec.Struct, array_like=True, frozen=True):
    base: int  # earlier step of the trajectory whose prompt + completion prefixes this prompt, or -1
    refs_extend: bool  # refs follow the base step's images; else they are the whole list
    new_tokens: int  # prompt tokens after the base (the whole prompt when base == -1)
    completion_tokens: int
    logprobs: int  # number of logprobs, -1 for None
    refs: list[PackedRef]


class PackedPixels(msgspec.Struct, array_like=True, frozen=True):
    rows: np.ndarray  # uint8 (patches, row_size)
    grid_thw: tuple[int, int, int]
    merge_size: int


class Schema(msgspec.Struct, array_like=True, frozen=True):
    """What the body starts with; read first so a mismatch gets a clear error."""

    version: int
    step_fields: list[str]
    trajectory_fields: list[str]


_STEP_REST_FIELDS = [f for f in msgspec.structs.fields(Step) if f.name not in DELTA_FIELDS]
_TRAJ_REST_FIELDS = [f for f in msgspec.structs.fields(Trajectory) if f.name != "steps"]
STEP_NAMES = [f.name for f in _STEP_REST_FIELDS]
TRAJECTORY_NAMES = [f.name for f in _TRAJ_REST_FIELDS]
# Step and Trajectory minus the delta-encoded fields, as positional (array_like) structs.
StepRest: Any = msgspec.defstruct("StepRest", [(f.name, f.type) for f in _STEP_REST_FIELDS],
                                  array_like=True, frozen=True, module=__name__)
TrajectoryRest: Any = msgspec.defstruct("TrajectoryRest", [(f.name, f.type) for f in _TRAJ_REST_FIELDS],
                                        array_like=True, frozen=True, module=__name__)
Meta: Any = msgspec.defstruct("PackedMeta", [
    ("trajectories", list[TrajectoryRest]),
    ("heads", list[list[StepHead]]),
    ("rests", list[list[StepRest]]),
], array_like=True, frozen=True, module=__name__)


class Body(msgspec.Struct, array_like=True, frozen=True):
    version: int
    step_fields: list[str]
    trajectory_fields: list[str]
    image_ids: list[str]
    pixels: list[PackedPixels]  # aligned with image_ids, or empty
    tokens: np.ndarray  # int32 or int64: every step's new prompt tokens, then its completion
    logprobs: np.ndarray  # float32 or float64
    meta_size: int
    meta: bytes  # zlib of the msgpack `Meta`: per-step heads and every other field (mostly text)


BODY: Codec[Body] = Codec(Body)
META: Codec[Any] = Codec(Meta)
SCHEMA: Codec[Schema] = Codec(Schema)


