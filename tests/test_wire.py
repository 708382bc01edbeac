"""The vLLM wire encoder: round trips, bfloat16 bits, and decoders that refuse malformed payloads."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
import pytest

from conftest import make_image
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.wire import (
    WireError,
    decode_image_kwargs,
    encode_image_kwargs,
    features_payload,
    generate_body,
    sampling_payload,
)
from rollwire.features import FeatureStore, VisionConfig
from rollwire.render.types import ImageRef


@pytest.fixture()
def store() -> FeatureStore:
    return FeatureStore(VisionConfig.qwen2_vl())


def test_uint8_and_float_round_trip(store: FeatureStore) -> None:
    f = store.get_or_process(make_image(100, 80))
    pixels, grid, dtype = decode_image_kwargs(encode_image_kwargs(f, store, "uint8"))
    assert dtype == "uint8" and grid == f.grid_thw == (1, 6, 8)
    np.testing.assert_array_equal(pixels, f.pixel_values)
    pixels, _, dtype = decode_image_kwargs(encode_image_kwargs(f, store, "float32"))
    assert dtype == "float32"
    np.testing.assert_array_equal(pixels, f.normalized(store.config))


def test_bfloat16_bits_match_torch(store: FeatureStore) -> None:
    torch = pytest.importorskip("torch")
    f = store.get_or_process(make_image(56, 56))
    pixels, _, dtype = decode_image_kwargs(encode_image_kwargs(f, store, "bfloat16"))
    expected = torch.from_numpy(f.normalized(store.config)).to(torch.bfloat16).float().numpy()
    assert dtype == "bfloat16"
    np.testing.assert_array_equal(pixels, expected)


def test_layout_is_the_one_vllm_032_reads(store: FeatureStore) -> None:
    f = store.get_or_process(make_image(56, 56))
    obj = msgspec.msgpack.decode(base64.b64decode(encode_image_kwargs(f, store, "uint8")))
    pv = obj["pixel_values"]
    assert pv["data"][0] == "uint8" and pv["data"][1] == [16, 1176]
    assert pv["field"] == ["flat", {"keep_on_cpu": False, "slices": [[[0, 16, None]]], "dim": 0}]
    assert obj["image_grid_thw"]["field"] == ["batched", {"keep_on_cpu": True}]
    assert obj["image_grid_thw"]["data"][1] == [3]


def test_features_payload_sends_each_image_once_and_ids_only_on_request(store: FeatureStore) -> None:
    a = store.get_or_process(make_image(56, 56, seed=1))
    b = store.get_or_process(make_image(28, 28, seed=2))
    refs = [ImageRef(a.id, 3, 4, a.grid_thw), ImageRef(b.id, 10, 4, b.grid_thw), ImageRef(a.id, 20, 4, a.grid_thw)]
    payload, nbytes = features_payload(refs, store, pixel_format="uint8")
    items = payload["kwargs_data"]["image"]
    assert items[0] == items[2] and items[0] is not None and nbytes == len(items[0]) + len(items[1])
    assert payload["mm_hashes"]["image"] == [a.id, b.id, a.id]
    assert payload["mm_placeholders"]["image"][1] == {"offset": 10, "length": 4}
    payload, nbytes = features_payload(refs, store, pixel_format="uint8", by_id_only={a.id})
    assert payload["kwargs_data"]["image"][0] is None and payload["kwargs_data"]["image"][2] is None
    assert nbytes == len(payload["kwargs_data"]["image"][1])


def test_sampling_payload_always_has_max_tokens_and_bans_ids() -> None:
    out = sampling_payload(SamplingParams(max_tokens=5, banned_token_ids=(151655,), stop_token_ids=(7,), seed=3))
    assert out["max_tokens"] == 5 and out["logit_bias"] == {"151655": -100.0}
    assert out["stop_token_ids"] == [7] and out["seed"] == 3 and out["logprobs"] == 0
    body = msgspec.json.decode(generate_body(GenerateRequest(prompt_token_ids=[1, 2], sampling=SamplingParams(
        max_tokens=2)), model="m", features=None))
    assert body["token_ids"] == [1, 2] and body["sampling_params"]["max_tokens"] == 2 and "features" not in body


def _item(dtype: str, shape: list[int], data: bytes) -> str:
    grid = np.array([1, 2, 2], dtype=np.int64).tobytes()
    obj = {"pixel_values": {"data": [dtype, shape, msgspec.msgpack.Ext(3, data)]},
           "image_grid_thw": {"data": ["int64", [3], msgspec.msgpack.Ext(3, grid)]}}
    return base64.b64encode(msgspec.msgpack.encode(obj)).decode()


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("!!!", "not base64 msgpack"),
        (_item("object", [4, 2], b"\0" * 8), "dtype 'object' is not allowed"),
        (_item("uint8", [4, 2], b"\0" * 7), "7 bytes for shape [4, 2]"),
        (_item("uint8", [10**9, 10**9], b"\0" * 8), "bytes for shape"),
        (_item("uint8", [2**32, 2**32], b""), "bad shape"),
        (_item("uint8", [2**62], b""), "bad shape"),
        (_item("uint8", [3, 2], b"\0" * 6), "implies 4 rows"),
        (base64.b64encode(msgspec.msgpack.encode({"x": 1})).decode(), "lacks pixel_values"),
    ],
)
def test_decoder_refuses_malformed_items(item: str, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decode_image_kwargs(item)
    assert needle in str(info.value)
