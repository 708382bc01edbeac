"""Load images from any source a chat message may name, check limits, convert to RGB.

Every failure is a typed `ImageError`; no PIL or OS exception escapes. Decoding is bounded:
the encoded size is checked before reading, the declared pixel count before decoding, and the
whole image is decoded here (truncated files fail now, not later in the processor).
Nothing here can block forever: only regular files are opened (a FIFO or `/dev/stdin` is
refused before it is read), and a remote fetch has one total deadline. Paths can be confined
to `ImageLimits.allowed_roots`. The remote fetch is `image_fetch.py`; the image id, re-exported
here, is `image_hash.py`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from PIL import Image, ImageOps

from rollwire.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageNotRegularFileError,
    ImagePathNotAllowedError,
    ImageSourceError,
    ImageTooLargeError,
    RemoteImageNotAllowedError,
    UnsupportedImageModeError,
)
from rollwire.image_fetch import fetch_remote
from rollwire.image_hash import image_hash
from rollwire.messages import ImageSource

__all__ = [
    "DEFAULT_LIMITS",
    "ImageLimits",
    "decode_image",
    "image_hash",
    "load_encoded",
    "load_image",
    "read_source",
    "to_rgb",
]

# Raster formats rollwire decodes. Exotic PIL plugins (EPS runs Ghostscript, FITS, GRIB, ...) are
# refused: they widen the attack surface and no chat client sends them.
_WANTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "AVIF", "QOI",
                   "JPEG2000")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what `load_image` accepts; remote loading is off unless asked for.

    `allowed_roots`: when set, a path or file:// URL is read only if it resolves (symlinks
    followed) inside one of these folders; None (the default for the Python API) reads any
    path the process can read, as `open` would. The command line sets it to the messages
    file's folder. `remote_timeout` is one deadline for the whole fetch (connect, headers and
    body). PIL's own bomb guard (2 x `Image.MAX_IMAGE_PIXELS`, ~179 M pixels) still applies
    above `max_pixels`.
    """

    max_encoded_bytes: int = 64 * 2**20
    max_pixels: int = 64 * 2**20  # decoded width * height
    allow_remote: bool = False
    remote_timeout: float = 10.0  # seconds, for the whole download
    allowed_roots: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_encoded_bytes <= 0 or self.max_pixels <= 0 or not self.remote_timeout > 0:
            raise ImageError(f"image limits must be positive: {self}")
        if self.allowed_roots is not None:
            object.__setattr__(self, "allowed_roots", _resolve_roots(self.allowed_roots))


DEFAULT_LIMITS = ImageLimits()


def load_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A fully decoded PIL image from a PIL image, encoded bytes, a path, or a file/data/http(s) URL.

    Encoded sources get their EXIF orientation applied (as `transformers.image_utils.load_image`
    does); a PIL image is taken as given, like the HF processor takes it.
    """
    return load_encoded(source, limits)[0]


def load_encoded(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[Image.Image, bytes | None]:
    """`load_image`, and the encoded bytes it decoded (None for a PIL image): the original file as the
    user gave it, to archive or send as it is instead of encoding the pixels again."""
    if isinstance(source, Image.Image):
        return _checked_pil(source, limits), None
    data, what = _read_source(source, limits)
    return decode_image(data, limits, what=what), data


def read_source(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes an image source names (bytes, a path, a file/data/http(s) URL), within the
    limits and not decoded; `ImageSourceError` for a PIL image or anything else."""
    return _read_source(source, limits)[0]


def _read_source(source: ImageSource, limits: ImageLimits) -> tuple[bytes, str]:
    """`read_source`, and how an error names the source (a path as it is, a URL cut short)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "image bytes"
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        if not isinstance(path, str):
            raise ImageSourceError(f"image path must be text, got {type(path).__name__}")
        return _read_path(path, limits), path
    if not isinstance(source, str):
        raise ImageSourceError(f"unsupported image source type {type(source).__name__}")
    if not source.strip():
        raise ImageSourceError("empty image source")
    lowered = source[:16].lower()
    if lowered.startswith("data:"):
        return _data_url_bytes(source, limits), "data URL"
    if lowered.startswith("file://"):
        path = _file_url_path(source)
        return _read_path(path, limits), path
    if lowered.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise RemoteImageNotAllowedError(
                f"remote image URLs are disabled (ImageLimits.allow_remote=False): {source[:100]}"
            )
        return fetch_remote(source, limits), source[:100]
    scheme, sep, _ = source.partition("://")
    if sep and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ImageSourceError(f"unsupported image URL scheme {scheme!r}")
    return _read_path(source, limits), source


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, what: str = "image") -> Image.Image:
    """Decode encoded image bytes fully, checking the declared size before decoding pixels."""
    if not data:
        raise ImageSourceError(f"{what}: no bytes")
    if len(data) > limits.max_encoded_bytes:
        raise ImageTooLargeError(f"{what}: {len(data)} encoded bytes exceed the limit of "
                                 f"{limits.max_encoded_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{what}: not a readable image (unknown format or corrupt header)") from None
    except Exception as exc:  # PIL plugins raise many types on malformed headers
        raise ImageDecodeError(f"{what}: cannot read image header: {exc}") from None
    _check_size(image.size, limits, what)
    try:
        image.load()  # full decode: truncated data fails here
        ImageOps.exif_transpose(image, in_place=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from None
    except Exception as exc:
        raise ImageDecodeError(f"{what}: cannot decode image: {exc}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as the HF Qwen-VL processor converts (`transformers.image_transforms.convert_to_rgb`).

    Images with an alpha band or a `transparency` entry are composited onto white; everything else
    goes through PIL's `convert("RGB")`, which clips 16/32-bit and float values to 0..255 (it does
    not rescale). Modes PIL cannot convert (e.g. "La") fail in the processor and raise
    `UnsupportedImageModeError` here. May return `image` itself when it is already plain RGB.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if image.mode == "RGB":
            return image
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageModeError(f"cannot convert image mode {image.mode!r} to RGB: {exc}") from None


# --- helpers --------------------------------------------------------------------------------


_formats_cache: tuple[str, ...] | None = None


def _allowed_formats() -> tuple[str, ...]:
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
    return _formats_cache


def _check_size(size: tuple[int, int], limits: ImageLimits, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"{what}: image has zero size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"{what}: {width}x{height} = {width * height} pixels exceed the limit of "
                                 f"{limits.max_pixels}")


def _checked_pil(image: Image.Image, limits: ImageLimits) -> Image.Image:
    _check_size(image.size, limits, "PIL image")
    try:
        image.load()  # a lazily opened image decodes now (and drops its file handle)
    except Exception as exc:
        raise ImageDecodeError(f"PIL image: cannot decode: {exc}") from None
    return image


def _resolve_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(roots, (str, bytes, os.PathLike)):
        roots = (roots,)  # one folder given bare
    out: list[str] = []
    for root in roots:
        if not isinstance(root, (str, os.PathLike)) or not isinstance(os.fspath(root), str):
            raise ImageError(f"allowed_roots must hold folder paths, got {type(root).__name__}")
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ImageError(f"allowed root {os.fspath(root)!r} is not a folder")
        out.append(real)
    return tuple(out)


def _confined(path: str, roots: tuple[str, ...]) -> str:
    """The resolved path when it lies inside one of `roots`; else ImagePathNotAllowedError."""
    real = os.path.realpath(path)
    for root in roots:
        if os.path.commonpath((root, real)) == root:
            return real
    raise ImagePathNotAllowedError(
        f"image path {path[:200]!r} resolves outside the allowed folders ({', '.join(roots)})"
    )


# O_NONBLOCK: should the file turn into a FIFO between the stat and the open, the open does not wait.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _check_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    raise ImageNotRegularFileError(f"image path is {kind}, not a regular file: {path[:200]}")


def _read_path(path: str, limits: ImageLimits) -> bytes:
    """The file's bytes: only a regular file (checked before opening and again on the open file),
    inside `allowed_roots` when set, at most `max_encoded_bytes`."""
    cap = limits.max_encoded_bytes
    flags = _OPEN_FLAGS
    try:
        if limits.allowed_roots is not None:
            target = _confined(path, limits.allowed_roots)
            flags |= getattr(os, "O_NOFOLLOW", 0)  # resolved already: a symlink now is a swap
        else:
            target = path
        _check_regular(os.stat(target).st_mode, path)
        fd = os.open(target, flags)
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            _check_regular(info.st_mode, path)
            size = info.st_size
            # Read what fstat says is there (+1, to see growth), never a buffer of the limit's size:
            # with a large limit (an archive's), f.read(cap + 1) would allocate that much.
            data = f.read(min(size, cap) + 1) if size <= cap else b""
            while size < len(data) <= cap and (more := f.read(min(1 << 24, cap + 1 - len(data)))):
                data += more  # the file grew since fstat (or reports no size, as /proc files do)
    except ImageError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise ImageNotFoundError(f"image file not found: {path}") from None
    except OSError as exc:
        raise ImageSourceError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageSourceError(f"invalid image path {path[:100]!r}: {exc}") from None
    if size > cap or len(data) > cap:
        raise ImageTooLargeError(f"{path}: file has {max(size, len(data))} bytes, over the limit of {cap}")
    return data


def _file_url_path(url: str) -> str:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageSourceError(f"file URL names a remote host {parsed.netloc!r}: {url[:100]}")
    path = url2pathname(unquote(parsed.path))
    if not path:
        raise ImageSourceError(f"file URL has no path: {url[:100]}")
    return path


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageSourceError("data URL has no ',' separating header and data")
    params = [p.strip().lower() for p in header[len("data:"):].split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise ImageSourceError(f"data URL media type {media_type!r} is not an image")
    if "base64" not in params[1:]:
        raise ImageSourceError("only base64 data URLs are supported (expected ';base64,')")
    payload = "".join(payload.split())
    if not payload:
        raise ImageSourceError("data URL carries no data")
    if len(payload.rstrip("=")) * 3 // 4 > limits.max_encoded_bytes:  # exact decoded size, checked first
        raise ImageTooLargeError(f"data URL decodes to more than {limits.max_encoded_bytes} bytes")
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            return base64.b64decode(payload, altchars=b"-_", validate=True)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageSourceError(f"data URL is not valid base64: {exc}") from None
