"""Features blobs: version 2 keeps one frame of rows that repeat it (Qwen-VL's still images), reads
back the very rows; version 1 blobs still read; hostile version-2 headers are refused."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from rollwire.features import ImageFeatures
from rollwire.render import create_renderer
from rollwire.store import StoreError, decode_features, encode_features
from rollwire.transport.codec import encode_parts


@pytest.fixture(scope="module")
def qwen_features(tiny: Callable[[str], Path]) -> tuple[ImageFeatures, tuple[int, int] | None]:
    store = create_renderer(tiny("qwen2_vl")).feature_store
    assert store is not None
    return store.get_or_process(make_image(200, 150, "RGB", 7)), getattr(store.config, "repeated_frames", None)


def _bytes(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def test_a_qwen_blob_keeps_one_frame_and_reads_back_the_same_rows(
        qwen_features: tuple[ImageFeatures, tuple[int, int] | None]) -> None:
    features, repeated = qwen_features
    assert repeated == (3, 2)
    v2 = _bytes(encode_features(features, repeated))
    v1 = _bytes(encode_features(features))
    assert v2[:4] == b"RWF2" and v1[:4] == b"RWF1"
    assert len(v2) < 0.52 * len(v1)  # the repeated frame is gone: half the pixel bytes
    for blob in (v1, v2):
        got = decode_features(blob, features.id)
        assert got == features and got.pixel_values.shape == features.pixel_values.shape
        assert not got.pixel_values.flags.writeable


def test_rows_whose_frames_differ_are_kept_whole() -> None:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (16, 3 * 2 * 14 * 14), dtype=np.uint8)  # frames differ: a video-like patch
    features = ImageFeatures("ab" * 16, rows, (1, 4, 4), 2)
    blob = _bytes(encode_features(features, (3, 2)))
    assert blob[:4] == b"RWF1"
    assert decode_features(blob, features.id) == features


def _v2_blob(image_id: str, pixels: np.ndarray, **extra: object) -> bytes:
    pieces = encode_parts({"id": image_id, "grid_thw": [1, 4, 4], "merge_size": 2, **extra, "pixel_values": pixels})
    payload = b"".join(bytes(p) for p in pieces)
    return b"RWF2" + struct.pack("<I", zlib.crc32(payload)) + payload


@pytest.mark.parametrize(("extra", "match"), [
    ({"channels": 3, "frames": 10**6}, "does not fit"),  # would expand to gigabytes
    ({"channels": 3, "frames": 1}, "does not fit"),
    ({"channels": 5, "frames": 2}, "does not fit"),  # 588 values do not split into 5 channels
    ({"channels": 3}, "malformed"),
    ({"channels": "3", "frames": [2]}, "malformed"),
])
def test_a_hostile_version_2_header_is_refused(extra: dict[str, object], match: str) -> None:
    pixels = np.zeros((16, 3 * 14 * 14), dtype=np.uint8)
    with pytest.raises(StoreError, match=match):
        decode_features(_v2_blob("cd" * 16, pixels, **extra), "cd" * 16)
