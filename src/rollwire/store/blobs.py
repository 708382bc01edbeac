"""Image blobs: each unique image once, under `blobs/<first 2 hex>/<id>.<ext>` (its original) and
`<id>.features` (its uint8 features, codec msgpack behind a magic and a CRC). A PIL image is kept
as uncompressed TIFF (lossless, ~1 ms; a palette image as PNG), an encoded file as its own bytes.

A features blob is version 1 (`RWF1`: the rows as they are) or version 2 (`RWF2`: rows whose
(C, T, P, P) layout repeats one frame T times, as Qwen-VL's processors make for a still image,
keep that frame once, with C and T; reading repeats it again). Both are read."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rollwire.errors import RollwireError, StoreError
from rollwire.features import ImageFeatures
from rollwire.images import ImageLimits, load_image, to_rgb
from rollwire.store.files import lexists, read_file
from rollwire.transport.codec import decode, encode_parts

_BLOB_MAGIC = b"RWF1"  # rows as they are
_FRAMES_MAGIC = b"RWF2"  # one frame of rows that repeat it (`repeated_frames`)
_MAX_FRAMES = 16  # a blob's frame count beyond this is hostile (Qwen-VL's is 2)
# PIL images are archived as uncompressed TIFF, which holds these modes exactly and costs a copy (PNG
# costs 0.1-0.9 s of zlib and filtering per 1024² image, the rollouts' CPU); palettes go as PNG.
_TIFF_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr", "LAB", "PA"})
_PNG_MODES = frozenset({"P"})
# An encoded original keeps its file's bytes, named by its real format (the formats rollwire decodes).
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff",
               "PPM": "ppm", "TGA": "tga", "ICO": "ico", "AVIF": "avif", "QOI": "qoi", "JPEG2000": "jp2"}
_ORIGINAL_EXTS = tuple(dict.fromkeys(("png", "tiff", *_EXTENSIONS.values())))
# Archived originals passed the rollout's image limits when first seen; a lossless copy can be
# larger encoded, so only PIL's own bomb guard applies when one is read back.
ARCHIVE_LIMITS = ImageLimits(max_encoded_bytes=2**40, max_pixels=2**40)


def blob_dir(root: Path, image_id: str) -> Path:
    """The folder of an image's blobs; an id that is not a hex content hash is refused."""
    if (not isinstance(image_id, str) or not 2 <= len(image_id) <= 128
            or not all(c in "0123456789abcdef" for c in image_id)):
        raise StoreError(f"image id {str(image_id)[:80]!r} is not a hex content hash")
    return root / "blobs" / image_id[:2]


def encode_features(features: ImageFeatures,
                    repeated_frames: tuple[int, int] | None = None) -> list[bytes | memoryview]:
    """A features blob (magic, CRC, codec payload) as pieces to write in order: the pixels are a view,
    not a copy (joining 6 MB holds the GIL and faults in fresh pages: ~15-30 ms an image).

    `repeated_frames` (the processor's (channels, frames), e.g. `VisionConfig.repeated_frames`): when
    every frame of the rows equals the first, the blob keeps the first only (version 2, half the
    bytes at two frames); rows whose frames differ are kept whole (version 1)."""
    fields = {"id": features.id, "grid_thw": list(features.grid_thw), "merge_size": features.merge_size}
    magic, pixels = _BLOB_MAGIC, np.ascontiguousarray(features.pixel_values)
    one = _one_frame(pixels, repeated_frames)
    if one is not None and repeated_frames is not None:
        magic, pixels = _FRAMES_MAGIC, one
        fields |= {"channels": repeated_frames[0], "frames": repeated_frames[1]}
    pieces = encode_parts({**fields, "pixel_values": pixels})
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return [magic + struct.pack("<I", crc), *pieces]


def _one_frame(rows: np.ndarray, repeated_frames: tuple[int, int] | None) -> np.ndarray | None:
    """The rows' first frame (contiguous), if every frame equals it; None otherwise."""
    if repeated_frames is None:
        return None
    channels, frames = repeated_frames
    n, size = rows.shape
    if frames < 2 or channels < 1 or size % (channels * frames):
        return None
    laid = rows.reshape(n, channels, frames, size // (channels * frames))
    first = laid[:, :, :1]
    if not np.array_equal(laid[:, :, 1:], np.broadcast_to(first, (n, channels, frames - 1, laid.shape[3]))):
        return None
    return np.ascontiguousarray(first).reshape(n, size // frames)


def decode_features(data: bytes, image_id: str) -> ImageFeatures:
    if len(data) < 8 or data[:4] not in (_BLOB_MAGIC, _FRAMES_MAGIC):
        raise StoreError(f"features blob {image_id} is not a rollwire features blob")
    (crc,) = struct.unpack("<I", data[4:8])
    payload = memoryview(data)[8:]
    if zlib.crc32(payload) != crc:
        raise StoreError(f"features blob {image_id} is corrupted (CRC mismatch)")
    try:
        obj = decode(payload)
        if not isinstance(obj, dict) or obj.get("id") != image_id:
            raise StoreError(f"features blob {image_id} holds another image")
        pixels = obj["pixel_values"]
        t, h, w = (int(v) for v in obj["grid_thw"])
        merge = int(obj["merge_size"])
        repeated = (int(obj["channels"]), int(obj["frames"])) if data[:4] == _FRAMES_MAGIC else None
    except StoreError:
        raise
    except Exception as exc:  # hostile bytes: codec errors, wrong types, huge numbers, deep nesting
        raise StoreError(f"features blob {image_id} is malformed: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise StoreError(f"features blob {image_id}: pixel_values must be 2-D uint8")
    if t * h * w != pixels.shape[0]:
        raise StoreError(f"features blob {image_id}: grid {[t, h, w]} does not match {pixels.shape[0]} rows")
    if repeated is not None:
        pixels = _repeat_frames(pixels, repeated, image_id)
    return ImageFeatures(id=image_id, pixel_values=pixels, grid_thw=(t, h, w), merge_size=merge)


def _repeat_frames(one: np.ndarray, repeated: tuple[int, int], image_id: str) -> np.ndarray:
    """A version-2 blob's rows: its one frame repeated `frames` times in the (C, T, P, P) layout."""
    channels, frames = repeated
    n, size = one.shape
    if not 2 <= frames <= _MAX_FRAMES or channels < 1 or size % channels:
        raise StoreError(f"features blob {image_id}: {channels} channels x {frames} frames does not fit rows of "
                         f"{size} values")
    per = size // channels
    try:
        return np.broadcast_to(one.reshape(n, channels, 1, per), (n, channels, frames, per)).reshape(n, size * frames)
    except MemoryError:
        raise StoreError(f"features blob {image_id}: no memory for its {n} rows x {size * frames} values") from None


def archive_image(image: Image.Image) -> tuple[str, bytes]:
    """(extension, bytes) of a lossless copy of a PIL image: uncompressed TIFF (every mode TIFF holds
    exactly: RGB, RGBA, L, 16-bit, float, CMYK, ...), PNG for palette images. The few in-memory
    modes neither holds (HSV, "La") are kept as the RGB the model saw."""
    buf = io.BytesIO()
    try:
        if image.mode in _PNG_MODES:
            image.save(buf, format="PNG", compress_level=1)
            return "png", buf.getvalue()
        if image.mode in _TIFF_MODES:
            image.save(buf, format="TIFF")
            return "tiff", buf.getvalue()
        to_rgb(image).save(buf, format="TIFF")
    except RollwireError as exc:
        raise StoreError(f"image of mode {image.mode!r} cannot be archived: {exc}") from None
    except Exception as exc:  # PIL encoders raise OSError, ValueError, ...
        raise StoreError(f"image of mode {image.mode!r} cannot be archived: {type(exc).__name__}: {exc}") from None
    return "tiff", buf.getvalue()


def encoded_extension(data: bytes) -> str:
    """The file extension of encoded image bytes' real format (read from the header, not decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=list(_EXTENSIONS)) as image:
            fmt = image.format
    except Exception as exc:  # PIL raises many types on a header it cannot read
        raise StoreError(f"image bytes of no format rollwire archives: {type(exc).__name__}: {exc}"[:300]) from None
    if fmt not in _EXTENSIONS:
        raise StoreError(f"image bytes in format {fmt!r}, which rollwire does not archive")
    return _EXTENSIONS[fmt]


def find_original(folder: Path, image_id: str) -> Path | None:
    """The archived original of `image_id` in its blob folder, whatever its format (None: not archived)."""
    return next((p for p in (folder / f"{image_id}.{ext}" for ext in _ORIGINAL_EXTS) if lexists(p)), None)


def read_original(root: Path, image_id: str) -> Image.Image:
    """The archived original of `image_id`, decoded (any format this or an older writer archived)."""
    path = find_original(blob_dir(root, image_id), image_id)
    if path is None:
        raise StoreError(f"original image {image_id} is not archived")
    try:
        return load_image(read_file(path), ARCHIVE_LIMITS)
    except RollwireError as exc:
        raise StoreError(f"original image {image_id}: {exc}") from None
