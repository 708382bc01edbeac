"""Gemma 4 images on vLLM's wire: an encoded item carries what the HF processor batches for the
model (pixels zero-padded to max_patches, (x, y) positions with -1 padding), decodes back to the
image's rows and grid in every pixel format, and a malformed item is a WireError."""

from __future__ import annotations

import base64
import warnings
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import make_image
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs
from rollwire.errors import WireError
from rollwire.features import FeatureStore
from rollwire.features.gemma4 import Gemma4Vision

pytest.importorskip("transformers.models.gemma4")
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

CONFIG = Gemma4Vision(max_soft_tokens=70)


def fields(item: str) -> dict[str, np.ndarray]:
    obj = msgspec.msgpack.decode(base64.b64decode(item))
    dtypes = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8, "bfloat16": np.uint16}
    return {k: np.frombuffer(v["data"][2].data, dtypes[v["data"][0]]).reshape(v["data"][1]) for k, v in obj.items()}


def rebuild(item: str, **arrays: np.ndarray) -> str:
    """The item with some arrays replaced (their dtype and shape written as they are)."""
    obj = msgspec.msgpack.decode(base64.b64decode(item))
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        obj[name]["data"] = [arr.dtype.name, list(arr.shape), msgspec.msgpack.Ext(3, arr.tobytes())]
    return base64.b64encode(msgspec.msgpack.encode(obj)).decode()


@pytest.mark.parametrize("size", [(336, 432), (27, 29), (2000, 50), (769, 767)])
def test_item_equals_the_hf_batch_and_round_trips(size: tuple[int, int]) -> None:
    store = FeatureStore(CONFIG)
    image = make_image(*size, "RGB", 3)
    feat = store.get_or_process(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf: Any = Gemma4ImageProcessorPil(max_soft_tokens=70)(images=[image], return_tensors="np")
    item = encode_image_kwargs(feat, store, "float32")
    sent = fields(item)
    assert sent["pixel_values"].shape == (630, 768) and sent["pixel_position_ids"].dtype == np.int64
    np.testing.assert_array_equal(sent["pixel_values"], hf["pixel_values"][0])
    np.testing.assert_array_equal(sent["pixel_position_ids"], hf["image_position_ids"][0])
    for fmt in ("uint8", "float32", "bfloat16"):
        pixels, grid, dtype_name = decode_image_kwargs(encode_image_kwargs(feat, store, fmt), CONFIG)
        assert grid == feat.grid_thw and dtype_name == fmt
        want = feat.pixel_values if fmt == "uint8" else feat.normalized(CONFIG)
        np.testing.assert_allclose(pixels, want, atol=1e-2 if fmt == "bfloat16" else 0)


def test_malformed_items_are_wire_errors() -> None:
    store = FeatureStore(CONFIG)
    image = make_image(336, 432, "RGB", 4)
    feat = store.get_or_process(image)
    item = encode_image_kwargs(feat, store, "float32")
    good = fields(item)
    pos, px = good["pixel_position_ids"], good["pixel_values"]
    swapped = pos.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    dirty = px.copy()
    dirty[-1, 0] = 0.5
    gap = pos.copy()
    gap[3] = -1
    hostile = {
        "positions out of order": {"pixel_position_ids": swapped},
        "non-zero padding": {"pixel_values": dirty},
        "a hole in the grid": {"pixel_position_ids": gap},
        "unpadded pixels": {"pixel_values": px[:567]},
        "positions not int64": {"pixel_position_ids": pos.astype(np.float32)},
        "no patch at all": {"pixel_position_ids": np.full_like(pos, -1)},
        "positions of another grid": {"pixel_position_ids": np.roll(pos, 1, axis=1)},
    }
    for what, arrays in hostile.items():
        with pytest.raises(WireError):
            decode_image_kwargs(rebuild(item, **arrays), CONFIG)
            pytest.fail(what)
