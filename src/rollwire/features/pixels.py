"""A read-only numpy view of an RGB PIL image's own pixel memory, without a copy.

`np.asarray(image)` goes through `image.tobytes()`: PIL keeps RGB as 4 bytes a pixel (RGBX), so
that is a full conversion into new memory, and the patchify then copies the pixels again.
Pillow >= 11.2 exports an image through the Arrow C data interface (`Image.__arrow_c_array__`:
a fixed-size list of 4 uint8 per pixel over PIL's own buffer); `rgbx_pixels` reads the buffer's
address from it (ctypes, a stable ABI) and views it as (H, W, 4), so the patchify is the one copy.
The view keeps the export alive, and the export keeps PIL's memory alive.

When the export is not there or not that layout (an older Pillow, an image too large for one
memory block, any other surprise) `rgbx_pixels` says None and the caller takes `np.asarray`: the
same values, one copy more.

`COMPILED` is the extension `rollwire.features._simd` when it is built (`ROLLWIRE_SIMD=0` turns it
off; `=avx2` or `=none` picks a lower level of its shuffles): its `rgbx_memory` does the same walk
of the export in C. `simd()` is that module when its byte shuffles that read the memory run at a
level (AVX-512 VBMI or AVX2: `level()`, what the CPU has unless lowered), else None.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["COMPILED", "rgbx_pixels", "simd"]


def _compiled() -> Any | None:
    """The extension, at the level `ROLLWIRE_SIMD` names if any: 0 (off: numpy, PIL and ctypes), none
    (its view of PIL's memory, no shuffles), avx2 or avx512vbmi (at most what the CPU runs)."""
    setting = os.environ.get("ROLLWIRE_SIMD", "").strip().lower()
    if setting == "0":
        return None
    try:
        from rollwire.features import _simd as compiled  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler, not x86-64): the numpy, PIL and ctypes paths
        return None
    if setting not in ("", "1"):
        try:
            compiled.use(setting)
        except ValueError as exc:
            raise ImportError(f"ROLLWIRE_SIMD={setting}: {exc}") from None
    return compiled


COMPILED: Any | None = _compiled()  # the extension, built and on: its `rgbx_memory` runs on any CPU


def simd() -> Any | None:
    """The extension when its byte shuffles run at some level now (`COMPILED.level()`), else None."""
    compiled = COMPILED
    return compiled if compiled is not None and compiled.level() is not None else None


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [  # the Arrow C data interface, as specified (arrow.apache.org/docs/format/CDataInterface)
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def rgbx_pixels(image: Image.Image) -> np.ndarray | None:
    """A read-only (H, W, 4) uint8 view of an RGB image's memory (R, G, B and a pad byte of no set
    value), or None when it cannot be had. The caller must not change the image while it holds it."""
    if image.mode != "RGB" or not hasattr(image, "__arrow_c_array__"):
        return None
    if COMPILED is not None:  # the same walk of the export, in C
        width, height = image.size
        memory = COMPILED.rgbx_memory(image, width, height)
        return None if memory is None else np.frombuffer(memory, dtype=np.uint8).reshape(height, width, 4)
    try:
        schema_capsule, array_capsule = image.__arrow_c_array__()
    except (ValueError, TypeError, AttributeError, NotImplementedError):  # e.g. rows not in one block
        return None
    try:
        schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
        array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    except (ValueError, TypeError):
        return None
    width, height = image.size
    n = width * height
    if (schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C"
            or array.length != n or array.offset != 0 or array.null_count != 0 or array.n_children != 1):
        return None
    child = array.children[0].contents
    if child.n_buffers != 2 or child.offset != 0 or child.length != 4 * n or child.null_count != 0:
        return None
    address = child.buffers[1]
    if not address or n == 0:
        return None
    buffer: Any = (ctypes.c_uint8 * (4 * n)).from_address(address)
    buffer.keep = (schema_capsule, array_capsule)  # released (and PIL's memory with them) with the last view
    view = np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 4)
    view.flags.writeable = False
    return view
