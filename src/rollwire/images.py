"""Load images from any source a chat message may name, check limits, convert to RGB, hash.

Every failure is a typed `ImageError`; no PIL or OS exception escapes. Decoding is bounded:
the encoded size is checked before reading, the declared pixel count before decoding, and the
whole image is decoded here (truncated files fail now, not later in the processor).
Nothing here can block forever: only regular files are opened (a FIFO or `/dev/stdin` is
refused before it is read), and a remote fetch has one total deadline. Paths can be confined
to `ImageLimits.allowed_roots`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import blake3
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
    RemoteImageTimeoutError,
    UnsupportedImageModeError,
)
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
        return _fetch_remote(source, limits), source[:100]
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


_HASH_CONTEXT = "rollwire 2026 image id v2"  # BLAKE3 key-derivation context: ids of nothing else collide


def image_hash(rgb_image: Image.Image, fingerprint: str) -> str:
    """Hex id (128 bits) over the RGB pixel bytes, the size and the preprocessing fingerprint.

    BLAKE3: collision-resistant like the blake2b it replaces (an id is what vLLM trusts as the
    image's content), and about 6x faster on a 1024² image. The packed RGB bytes are streamed into
    the hash a cache-sized chunk at a time (`_rgb_chunks`), not made whole first: the same digest
    as hashing `rgb_image.tobytes()`, without its full-size allocation and second copy.
    """
    if rgb_image.mode != "RGB":
        raise ImageError(f"image_hash needs an RGB image (call to_rgb first), got mode {rgb_image.mode!r}")
    width, height = rgb_image.size
    fp = fingerprint.encode()
    hasher = blake3.blake3(derive_key_context=_HASH_CONTEXT)
    hasher.update(struct.pack("<QQQ", width, height, len(fp)))
    hasher.update(fp)
    for chunk in _rgb_chunks(rgb_image):
        hasher.update(chunk)
    return hasher.hexdigest(length=16)


_CHUNK_BYTES = 1 << 18  # packed bytes per chunk: stays in the core's cache between PIL's pack and the hash


def _rgb_chunks(rgb_image: Image.Image) -> Iterator[bytes]:
    """`rgb_image.tobytes()` in pieces, in order: PIL's raw encoder (what `tobytes` runs) without
    the join; if that private API is not there, `tobytes()` in one piece."""
    width, height = rgb_image.size
    if width == 0 or height == 0:
        return
    try:
        encoder = Image._getencoder("RGB", "raw", ("RGB", 0, 1))
        encoder.setimage(rgb_image.im, (0, 0, width, height))
    except (AttributeError, TypeError, ValueError, OSError):
        yield rgb_image.tobytes()
        return
    try:
        bufsize = max(_CHUNK_BYTES, width * 4)  # a chunk holds at least one row, as tobytes asks
        while True:
            _, status, data = encoder.encode(bufsize)
            yield data
            if status:
                break
        if status < 0:
            raise ImageError(f"cannot read the pixels of a {width}x{height} image (PIL encoder error {status})")
    finally:
        encoder.cleanup()


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


def _fetch_remote(url: str, limits: ImageLimits) -> bytes:
    """The body at `url`, cut at `remote_timeout` for the whole fetch.

    httpx's timeouts bound each read, so a server trickling one byte a second would never trip
    them; the fetch therefore runs as a task under one `asyncio.timeout`, on a private event loop
    (in a short-lived thread when the caller is itself inside a running loop).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_fetch(url, limits)
    result: list[bytes] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(_run_fetch(url, limits))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="rollwire-image-fetch", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _run_fetch(url: str, limits: ImageLimits) -> bytes:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_fetch_within_deadline(url, limits))
    finally:
        loop.close()  # does not wait for a resolver thread still stuck in getaddrinfo


async def _fetch_within_deadline(url: str, limits: ImageLimits) -> bytes:
    try:
        async with asyncio.timeout(limits.remote_timeout):
            return await _fetch_body(url, limits)
    except TimeoutError:
        raise RemoteImageTimeoutError(
            f"{url[:100]}: fetch exceeded its total deadline of {limits.remote_timeout}s"
        ) from None


async def _fetch_body(url: str, limits: ImageLimits) -> bytes:
    import httpx

    cap = limits.max_encoded_bytes
    buf = bytearray()
    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout, follow_redirects=True,
                                     max_redirects=5) as client, client.stream("GET", url) as response:
            if response.status_code in (404, 410):
                raise ImageNotFoundError(f"remote image not found (HTTP {response.status_code}): {url[:100]}")
            if response.status_code >= 400:
                raise ImageSourceError(f"remote image request failed (HTTP {response.status_code}): "
                                       f"{url[:100]}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise ImageTooLargeError(f"{url[:100]}: declares {declared} bytes, over the limit of {cap}")
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > cap:
                    raise ImageTooLargeError(f"{url[:100]}: more than {cap} bytes")
    except httpx.TimeoutException:
        raise TimeoutError from None  # reported by the caller as the total deadline
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise ImageSourceError(f"cannot fetch {url[:100]}: {type(exc).__name__}: {exc}") from None
    return bytes(buf)
