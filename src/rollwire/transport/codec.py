"""msgpack on msgspec, with numpy arrays and torch tensors as raw-byte extensions; never pickle.

An array travels as a msgpack Ext whose payload is a small header and the raw C-order bytes:

    code 1 (numpy.ndarray) or 2 (torch.Tensor)
    u8  format version (1)
    u8  n, then n bytes: the dtype name in ASCII ("float32", "bfloat16", ...; see ALLOWED_DTYPES)
    u8  ndim (<= MAX_NDIM), then ndim x u64 little-endian dimensions
    the elements, little-endian, C order (bfloat16: its raw 16-bit payload)

Decoding checks the code, the dtype against the allow-list, the shape and that the byte length
equals prod(shape) * itemsize before anything is allocated. numpy arrays are decoded without a
copy: they are views of the input buffer (read-only for `bytes`; a `bytearray` input gives
writable views aliasing it) and keep the whole buffer alive; they may be unaligned. torch has no
read-only tensors, so tensors are decoded with one copy. torch is imported only to decode a
tensor (encoding sees a tensor only if torch is already imported). Encoding copies a large
array's bytes once, straight into the output (msgspec writes a marker, `bytes.join` splices the
array in), so it runs at memcpy speed; the bytes are the same as msgspec's own Ext encoding.
Anything else msgspec does
not natively support is refused with `CodecError`: there is no pickle fallback.

Hostile input gets a `CodecError` and nothing else. Output is bounded by the input: every
decoded object takes at least one input byte, arrays are views of it (tensors: one copy), and
an array's element count (empty dimensions counted as 1) is at most 2**48. Nesting is bounded
by the interpreter's recursion limit (msgspec's own check), deeper input is a `CodecError`.
"""

from __future__ import annotations

import functools
import importlib
import math
import secrets
import struct
import sys
from typing import Any, Generic, TypeVar, overload

import msgspec
import numpy as np

from rollwire.errors import CodecError

__all__ = [
    "ALLOWED_DTYPES",
    "EXT_NDARRAY",
    "EXT_TENSOR",
    "MAX_NDIM",
    "Codec",
    "codec_for",
    "decode",
    "enc_hook",
    "encode",
    "encode_parts",
    "ext_hook",
]

T = TypeVar("T")

EXT_NDARRAY = 1
EXT_TENSOR = 2
FORMAT_VERSION = 1
MAX_NDIM = 32
_MAX_DIM = 2**48  # no real dimension is larger; keeps shape arithmetic far from numpy's limits

ALLOWED_DTYPES: tuple[str, ...] = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
    "float16", "float32", "float64", "bfloat16",
)
# Little-endian numpy dtypes by name; bfloat16 is resolved on use (ml_dtypes for numpy, torch).
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES if name != "bfloat16"
}
_ITEMSIZE = {**{name: dt.itemsize for name, dt in _NUMPY_DTYPES.items()}, "bfloat16": 2}
_DIMS = struct.Struct("<Q")


# --- encoding -------------------------------------------------------------------------------

# Arrays of at least this many payload bytes are spliced into the output (one copy of their bytes);
# smaller ones go inside a msgspec Ext (two copies, of little).
_SPLICE_MIN = 1 << 16
_EXT32 = struct.Struct(">BIb")  # msgpack ext 32: 0xc9, payload length, type code


def _header(dtype_name: str, shape: tuple[int, ...]) -> bytes:
    name = dtype_name.encode("ascii")
    return b"".join((bytes((FORMAT_VERSION, len(name))), name, bytes((len(shape),)),
                     *(_DIMS.pack(d) for d in shape)))


def _flat_bytes(arr: np.ndarray) -> tuple[tuple[int, ...], memoryview]:
    """Shape and raw little-endian C-order bytes of `arr` (a view unless it must be reordered)."""
    shape = tuple(int(d) for d in arr.shape)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"array has {len(shape)} dimensions; at most {MAX_NDIM} are encoded")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return shape, np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


class _Splicer:
    """One encode's large arrays. Each is written as a marker (`msgspec.Raw`: a per-call random
    token and the array's index), and `pieces` cuts the output at the markers and puts the array's
    ext frame, header and raw bytes (a view) there, so `bytes.join` copies the array's bytes once."""

    def __init__(self, splice: bool = True) -> None:
        self.splice = splice
        self.token = secrets.token_bytes(16) if splice else b""
        self.arrays: list[tuple[bytes, memoryview]] = []  # (ext frame + header, raw bytes)

    def ext(self, code: int, arr: np.ndarray, dtype_name: str) -> Any:
        shape, raw = _flat_bytes(arr)
        header = _header(dtype_name, shape)
        if not self.splice or raw.nbytes < _SPLICE_MIN:
            return msgspec.msgpack.Ext(code, b"".join((header, raw)))
        self.arrays.append((_EXT32.pack(0xC9, len(header) + raw.nbytes, code) + header, raw))
        return msgspec.Raw(self.token + _DIMS.pack(len(self.arrays) - 1))

    def hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self.ext(EXT_NDARRAY, obj, _numpy_dtype_name(obj.dtype))
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":  # numpy scalars as plain numbers
            _numpy_dtype_name(obj.dtype)
            return obj.item()
        torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
        if torch is not None and isinstance(obj, torch.Tensor):
            return _encode_tensor(obj, self)
        raise CodecError(f"cannot encode an object of type {type(obj).__module__}.{type(obj).__qualname__} "
                         "(only msgspec-native types, numpy arrays and torch tensors; no pickle)")

    def pieces(self, out: bytes) -> list[bytes | memoryview]:
        """msgspec's output with each marker replaced by its array's frame and raw bytes (views)."""
        if not self.arrays:
            return [out]
        if out.count(self.token) != len(self.arrays):  # the token is random: only a bug gets here
            raise CodecError("internal error: array markers do not match the arrays encoded")
        view, pos = memoryview(out), 0
        pieces: list[bytes | memoryview] = []
        for k, (frame, raw) in enumerate(self.arrays):
            marker = self.token + _DIMS.pack(k)
            at = out.index(marker, pos)
            pieces += (view[pos:at], frame, raw)
            pos = at + len(marker)
        pieces.append(view[pos:])
        return pieces


def _numpy_dtype_name(dtype: np.dtype[Any]) -> str:
    name = dtype.name
    if dtype.fields is not None or dtype.subdtype is not None or name not in _ITEMSIZE:
        raise CodecError(f"numpy dtype {dtype} is not allowed on the wire (allowed: {', '.join(ALLOWED_DTYPES)})")
    return name


def _encode_tensor(tensor: Any, splicer: _Splicer) -> Any:
    torch = sys.modules["torch"]
    if tensor.layout != torch.strided:
        raise CodecError(f"torch tensor with layout {tensor.layout} is not encodable (dense tensors only)")
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise CodecError(f"torch dtype {tensor.dtype} is not allowed on the wire "
                         f"(allowed: {', '.join(ALLOWED_DTYPES)})")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    arr = t.view(torch.int16).numpy() if name == "bfloat16" else t.numpy()
    return splicer.ext(EXT_TENSOR, arr, name)


def enc_hook(obj: Any) -> Any:
    """msgspec `enc_hook`: numpy arrays and scalars, torch tensors; anything else is a CodecError.
    Used alone it puts each array inside an Ext; `Codec.encode` splices large ones in with one copy."""
    return _INLINE.hook(obj)


# --- decoding -------------------------------------------------------------------------------


def _parse(data: memoryview) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, raw bytes) of an array payload, every field checked."""
    size = len(data)
    if size < 3:
        raise CodecError("array extension is truncated")
    if data[0] != FORMAT_VERSION:
        raise CodecError(f"array extension has format version {data[0]}, expected {FORMAT_VERSION}")
    n = data[1]
    pos = 2 + n
    if pos + 1 > size:
        raise CodecError("array extension is truncated")
    try:
        name = bytes(data[2:pos]).decode("ascii")
    except UnicodeDecodeError:
        raise CodecError("array extension has a non-ASCII dtype name") from None
    if name not in _ITEMSIZE:
        raise CodecError(f"array dtype {name!r} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    ndim = data[pos]
    pos += 1
    if ndim > MAX_NDIM:
        raise CodecError(f"array has {ndim} dimensions; at most {MAX_NDIM} are accepted")
    if pos + 8 * ndim > size:
        raise CodecError("array extension is truncated")
    shape = tuple(_DIMS.unpack_from(data, pos + 8 * i)[0] for i in range(ndim))
    pos += 8 * ndim
    if math.prod(max(d, 1) for d in shape) > _MAX_DIM:  # an empty array's other dims count too
        raise CodecError(f"array shape {shape} has an implausible size")
    expected = math.prod(shape) * _ITEMSIZE[name]
    if expected != size - pos:
        raise CodecError(f"array {name}{list(shape)} needs {expected} bytes, the extension holds {size - pos}")
    return name, shape, data[pos:]


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name != "bfloat16":
        return _NUMPY_DTYPES[name]
    try:
        ml_dtypes = importlib.import_module("ml_dtypes")
    except ImportError:
        raise CodecError("a numpy bfloat16 array needs ml_dtypes installed to decode") from None
    return np.dtype(ml_dtypes.bfloat16)


def _decode_tensor(name: str, shape: tuple[int, ...], raw: memoryview) -> Any:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise CodecError("the payload holds a torch tensor but torch is not installed") from None
    dtype = getattr(torch, name)
    try:
        if len(raw) == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    except (RuntimeError, ValueError) as exc:  # torch's own limits on shapes and strides
        raise CodecError(f"tensor {name}{list(shape)} cannot be built: {exc}") from None


def ext_hook(code: int, data: memoryview) -> Any:
    """msgspec `ext_hook`: arrays (zero-copy numpy views) and tensors; unknown codes are a CodecError."""
    if code == EXT_NDARRAY:
        name, shape, raw = _parse(data)
        return np.frombuffer(raw, dtype=_numpy_dtype(name)).reshape(shape)
    if code == EXT_TENSOR:
        name, shape, raw = _parse(data)
        return _decode_tensor(name, shape, raw)
    raise CodecError(f"unknown msgpack extension code {code}")


# --- codecs ---------------------------------------------------------------------------------


_INLINE = _Splicer(splice=False)


class Codec(Generic[T]):
    """A reusable encoder and a decoder typed to `type` (msgspec validates while it decodes)."""

    def __init__(self, type: Any = Any) -> None:
        self.type = type
        try:
            self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type, ext_hook=ext_hook)
        except TypeError as exc:
            raise CodecError(f"cannot build a decoder for {type!r}: {exc}") from None

    def encode(self, obj: Any) -> bytes:
        """msgpack bytes of `obj`; a large array's bytes are copied once, into the output."""
        return b"".join(self.encode_parts(obj))

    def encode_parts(self, obj: Any) -> list[bytes | memoryview]:
        """`encode(obj)` as pieces whose concatenation is its bytes; a large array is a view of its
        own memory, not copied, so a file writer hands the pieces to `os.writev` (one copy, by the
        kernel, without the GIL). The views alias the arrays: write them before changing those."""
        splicer = _Splicer()
        try:
            return splicer.pieces(msgspec.msgpack.Encoder(enc_hook=splicer.hook).encode(obj))
        except CodecError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode: {exc}") from None
        except RecursionError:
            raise CodecError("cannot encode: the value is nested too deeply") from None

    def decode(self, data: bytes | bytearray | memoryview) -> T:
        try:
            return self._decoder.decode(data)
        except CodecError:
            raise
        except (msgspec.DecodeError, TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot decode as {getattr(self.type, '__name__', self.type)}: {exc}") from None
        except RecursionError:  # msgspec's depth check (Py_EnterRecursiveCall), raised cleanly
            raise CodecError(f"cannot decode as {getattr(self.type, '__name__', self.type)}: "
                             "nested deeper than the recursion limit") from None


@functools.lru_cache(maxsize=128)
def codec_for(type: Any) -> Codec[Any]:
    """The shared `Codec` for `type` (built once per type)."""
    return Codec(type)


_ANY: Codec[Any] = Codec()


def encode(obj: Any) -> bytes:
    return _ANY.encode(obj)


def encode_parts(obj: Any) -> list[bytes | memoryview]:
    return _ANY.encode_parts(obj)


@overload
def decode(data: bytes | bytearray | memoryview) -> Any: ...
@overload
def decode(data: bytes | bytearray | memoryview, type: type[T]) -> T: ...
@overload
def decode(data: bytes | bytearray | memoryview, type: Any) -> Any: ...
def decode(data: bytes | bytearray | memoryview, type: Any = Any) -> Any:
    """Decode `data`, validated as `type` (rollwire structs come back as themselves)."""
    return (_ANY if type is Any else codec_for(type)).decode(data)
