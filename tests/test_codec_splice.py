"""The single-copy encode: large arrays spliced into the output give the very bytes msgspec's own
Ext encoding gives (the format in transport/codec.py's docstring, built here by hand)."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest

from rollwire.errors import CodecError
from rollwire.transport.codec import decode, encode


def reference_ext(arr: np.ndarray, code: int = 1, name: str | None = None) -> msgspec.msgpack.Ext:
    """The documented payload: version 1, dtype name, ndim, u64 dims, little-endian C-order bytes."""
    name = name or arr.dtype.name
    le = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<")))
    header = bytes((1, len(name))) + name.encode() + bytes((arr.ndim,)) + b"".join(struct.pack("<Q", d)
                                                                                  for d in arr.shape)
    return msgspec.msgpack.Ext(code, header + le.tobytes())


def reference(obj: object) -> bytes:
    def hook(o: object) -> object:
        assert isinstance(o, np.ndarray)
        return reference_ext(o)

    return msgspec.msgpack.encode(obj, enc_hook=hook)


RNG = np.random.default_rng(7)
BIG = RNG.standard_normal((300, 1176)).astype(np.float32)  # 1.4 MB: spliced
SMALL = RNG.integers(0, 256, (10, 10), dtype=np.uint8)  # inlined in an Ext


@pytest.mark.parametrize("obj", [
    BIG,
    {"a": [BIG, b"x" * 10, SMALL], "b": {"c": BIG[::2], "d": "text"}},
    [BIG.astype(">f4"), np.ones(70_000, dtype=np.uint8)[::2], np.zeros((0, 5), np.float32), BIG.T],
], ids=["one", "nested", "reordered"])
def test_spliced_bytes_equal_the_documented_format(obj: object) -> None:
    data = encode(obj)
    assert data == reference(obj)
    assert isinstance(data, bytes)


def test_round_trip_of_many_large_arrays() -> None:
    arrays = [RNG.integers(0, 256, (70_000 + k,), dtype=np.uint8) for k in range(5)]
    out = decode(encode({"xs": arrays, "tail": "end"}))
    assert out["tail"] == "end"
    for a, b in zip(arrays, out["xs"], strict=True):
        assert np.array_equal(a, b)


def test_payload_is_the_array_plus_32_bytes() -> None:
    # ext32 frame (6 B) + version, name length, "float32", ndim, two u64 dims (26 B)
    assert len(encode(BIG)) == BIG.nbytes + 32


def test_tensor_is_spliced_too() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(100_000, dtype=torch.float32).reshape(1000, 100)
    data = encode(t)
    ext = msgspec.msgpack.Ext(2, reference_ext(t.numpy()).data)
    assert data == msgspec.msgpack.encode(ext)
    assert torch.equal(decode(data), t)


def test_unencodable_object_is_still_refused() -> None:
    with pytest.raises(CodecError, match="cannot encode an object"):
        encode({"big": BIG, "bad": object()})
