"""Loading images from every source kind, limits, RGB conversion and content hashes."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from rollwire.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageSourceError,
    ImageTooLargeError,
    RemoteImageNotAllowedError,
    RollwireError,
)
from rollwire.images import DEFAULT_LIMITS, ImageLimits, decode_image, image_hash, load_image, to_rgb


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, (width, height),
                           rng.integers(0, 256, height * width * channels, dtype=np.uint8).tobytes())


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int, idat: bytes = b"\x78\x9c garbage") -> bytes:
    """A PNG declaring a size, with a bogus (undecodable) pixel stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture
def picture() -> Image.Image:
    return noise(37, 23, seed=1)


# --- every source kind ----------------------------------------------------------------------


def test_pil_source_is_checked_and_returned(picture: Image.Image) -> None:
    loaded = load_image(picture)
    assert np.array_equal(pixels(loaded), pixels(picture))


def test_bytes_sources(picture: Image.Image) -> None:
    data = encode(picture)
    for source in (data, bytearray(data), memoryview(data)):
        assert np.array_equal(pixels(load_image(source)), pixels(picture))  # type: ignore[arg-type]


def test_path_sources(tmp_path: Path, picture: Image.Image) -> None:
    path = tmp_path / "a picture.png"
    picture.save(path)
    sources: list[str | Path] = [
        path, str(path), path.as_uri(), "file://localhost" + path.as_uri()[len("file://"):],
    ]
    assert "%20" in path.as_uri()  # the URL form is percent-encoded and must be decoded
    for source in sources:
        assert np.array_equal(pixels(load_image(source)), pixels(picture)), source


def test_data_urls(picture: Image.Image) -> None:
    b64 = base64.b64encode(encode(picture)).decode()
    variants = [
        f"data:image/png;base64,{b64}",
        f"DATA:IMAGE/PNG;BASE64,{b64}",
        f"data:image/png;base64,{b64.rstrip('=')}",  # padding dropped
        "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
        f"data:image/png;base64,{base64.urlsafe_b64encode(encode(picture)).decode()}",
        f"data:;base64,{b64}",
    ]
    for url in variants:
        assert np.array_equal(pixels(load_image(url)), pixels(picture)), url[:40]


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64", "data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes",
     "data:image/png;base64,@@@@", "data:image/png;base64,"],
)
def test_bad_data_urls(url: str) -> None:
    with pytest.raises(ImageSourceError):
        load_image(url)


@pytest.mark.parametrize("source", ["", "   ", b"", None, 42, ["x"]])
def test_empty_or_unsupported_sources(source: object) -> None:
    with pytest.raises(ImageSourceError):
        load_image(source)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "s3://bucket/a.png", "gs://b/a.png"])
def test_unknown_scheme(url: str) -> None:
    with pytest.raises(ImageSourceError):
        load_image(url)


def test_file_url_with_remote_host() -> None:
    with pytest.raises(ImageSourceError):
        load_image("file://otherhost/etc/a.png")


def test_missing_file(tmp_path: Path) -> None:
    for source in (tmp_path / "nope.png", str(tmp_path / "nope.png"), (tmp_path / "nope.png").as_uri(),
                   str(tmp_path / "nope.png" / "deeper.png")):
        with pytest.raises(ImageNotFoundError) as info:
            load_image(source)
        assert isinstance(info.value, FileNotFoundError)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError):
        load_image(tmp_path)


# --- broken data ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  b"\xff\xd8\xff\xe0" + b"\x00" * 10])
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    full = encode(noise(128, 96, seed=2), fmt)
    assert load_image(full).size == (128, 96)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageDecodeError):
        load_image(path)
    with pytest.raises(ImageDecodeError):
        load_image(full[: len(full) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_lazily_opened_truncated_pil_image(tmp_path: Path) -> None:
    full = encode(noise(128, 96, seed=2), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    lazy = Image.open(path)  # header fine, pixels not read yet
    with pytest.raises(ImageDecodeError):
        load_image(lazy)
    lazy.close()


def test_exotic_formats_are_refused() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # PIL alone would accept (and run Ghostscript)
    with pytest.raises(ImageDecodeError):
        load_image(eps)


def test_zero_size_image() -> None:
    for size in [(0, 5), (5, 0), (0, 0)]:
        with pytest.raises(EmptyImageError):
            load_image(Image.new("RGB", size))


def test_zero_size_png_header_is_rejected() -> None:
    with pytest.raises(ImageError):
        load_image(png_header_only(0, 5))


# --- limits ---------------------------------------------------------------------------------


def test_decompression_bomb_declared_size() -> None:
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(ImageTooLargeError):
        load_image(bomb)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 25 M pixels declared over a garbage pixel stream: decoding would fail with a decode error,
    # so getting ImageTooLargeError proves the size was checked first.
    header_only = png_header_only(5000, 5000)
    with pytest.raises(ImageTooLargeError):
        load_image(header_only, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageDecodeError):
        load_image(header_only, ImageLimits(max_pixels=100_000_000))


def test_pixel_limit_real_image(tmp_path: Path) -> None:
    image = Image.new("L", (2000, 1500), 7)
    path = tmp_path / "big.png"
    image.save(path)
    with pytest.raises(ImageTooLargeError):
        load_image(path, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageTooLargeError):
        load_image(image, ImageLimits(max_pixels=1_000_000))
    assert load_image(path, ImageLimits(max_pixels=3_000_000)).size == (2000, 1500)


def test_encoded_byte_limit(tmp_path: Path, picture: Image.Image) -> None:
    data = encode(picture)
    limits = ImageLimits(max_encoded_bytes=len(data) - 1)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (data, path, url):
        with pytest.raises(ImageTooLargeError):
            load_image(source, limits)
        load_image(source, ImageLimits(max_encoded_bytes=len(data)))


def test_invalid_limits() -> None:
    with pytest.raises(ImageError):
        ImageLimits(max_pixels=0)
    assert DEFAULT_LIMITS.max_pixels == 64 * 2**20 and DEFAULT_LIMITS.allow_remote is False


# --- remote ---------------------------------------------------------------------------------


def test_remote_url_not_allowed_by_default() -> None:
    for url in ("http://example.com/a.png", "https://example.com/a.png", "HTTPS://EXAMPLE.COM/A.PNG"):
        with pytest.raises(RemoteImageNotAllowedError):
            load_image(url)


@pytest.fixture
def http_server(picture: Image.Image) -> Iterator[str]:
    body = encode(picture)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/stream.png":  # no Content-Length: only the streamed cap can stop it
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(b"\x00" * 65536)
                except OSError:
                    pass
            elif self.path == "/boom":
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_loading_when_allowed(http_server: str, picture: Image.Image,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    limits = ImageLimits(allow_remote=True, remote_timeout=5.0)
    assert np.array_equal(pixels(load_image(f"{http_server}/ok.png", limits)), pixels(picture))
    with pytest.raises(ImageNotFoundError):
        load_image(f"{http_server}/missing.png", limits)
    with pytest.raises(ImageSourceError):
        load_image(f"{http_server}/boom", limits)
    small = ImageLimits(allow_remote=True, max_encoded_bytes=100_000, remote_timeout=5.0)
    with pytest.raises(ImageTooLargeError):
        load_image(f"{http_server}/stream.png", small)
    with pytest.raises(ImageTooLargeError):
        load_image(f"{http_server}/ok.png", ImageLimits(allow_remote=True, max_encoded_bytes=10))
    with pytest.raises(ImageSourceError):
        load_image("http://127.0.0.1:9/unreachable.png", ImageLimits(allow_remote=True, remote_timeout=2.0))


# --- resources and orientation -------------------------------------------------------------


def test_no_file_handles_left_open(tmp_path: Path) -> None:
    paths = []
    for k in range(10):
        path = tmp_path / f"{k}.png"
        noise(20, 20, seed=k).save(path)
        paths.append(path)
    before = len(os.listdir("/proc/self/fd"))
    loaded = [load_image(p) for p in paths] + [load_image(Image.open(p)) for p in paths]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(im.size == (20, 20) for im in loaded)


def test_exif_orientation_applied_to_encoded_sources() -> None:
    image = noise(40, 20, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    data = encode(image, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert load_image(data).size == (20, 40)


def test_errors_are_one_hierarchy() -> None:
    for source in (b"junk", "ftp://x/y", "/definitely/not/here.png"):
        with pytest.raises(RollwireError):
            load_image(source)
    with pytest.raises(ImageSourceError):
        decode_image(b"")


# --- to_rgb ---------------------------------------------------------------------------------


def test_to_rgb_composites_alpha_on_white() -> None:
    rgba = Image.frombytes("RGBA", (3, 1), bytes([10, 20, 30, 0, 10, 20, 30, 255, 0, 0, 0, 128]))
    out = pixels(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2].tolist() == [127, 127, 127]
    assert to_rgb(rgba).mode == "RGB"


def test_to_rgb_palette_transparency() -> None:
    image = Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    assert pixels(to_rgb(image))[0].tolist() == [[200, 0, 0], [0, 200, 0]]
    image.info["transparency"] = 1  # index 1 transparent -> white
    assert pixels(to_rgb(image))[0].tolist() == [[200, 0, 0], [255, 255, 255]]


def test_to_rgb_modes_give_rgb() -> None:
    for mode in ("1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I", "F"):
        assert to_rgb(Image.new(mode, (4, 3))).mode == "RGB"
    rgb = noise(4, 3)
    assert to_rgb(rgb) is rgb  # plain RGB passes through (the processor's convert is a copy)


# --- hashing --------------------------------------------------------------------------------


def test_hash_same_pixels_any_container(tmp_path: Path) -> None:
    image = noise(64, 48, seed=5)
    ids = {image_hash(to_rgb(image), "fp")}
    for fmt in ("PNG", "BMP", "TIFF", "PPM", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        ids.add(image_hash(to_rgb(load_image(encode(image, fmt, **kwargs))), "fp"))
    opaque = image.copy()
    opaque.putalpha(255)
    ids.add(image_hash(to_rgb(load_image(encode(opaque))), "fp"))  # RGBA fully opaque: same pixels
    assert len(ids) == 1
    assert len(next(iter(ids))) == 32 and int(next(iter(ids)), 16) >= 0


def test_hash_depends_on_pixels_size_and_fingerprint() -> None:
    data = np.random.default_rng(6).integers(0, 256, 2 * 6 * 3, dtype=np.uint8).tobytes()
    a = Image.frombytes("RGB", (2, 6), data)
    b = Image.frombytes("RGB", (6, 2), data)
    c = Image.frombytes("RGB", (3, 4), data)
    assert len({image_hash(a, "fp"), image_hash(b, "fp"), image_hash(c, "fp")}) == 3
    assert image_hash(a, "fp") != image_hash(a, "fp2")
    assert image_hash(a, "fp") == image_hash(a.copy(), "fp")
    changed = a.copy()
    changed.putpixel((1, 5), (0, 0, 0) if a.getpixel((1, 5)) != (0, 0, 0) else (1, 1, 1))
    assert image_hash(changed, "fp") != image_hash(a, "fp")


def test_hash_needs_rgb() -> None:
    with pytest.raises(ImageError):
        image_hash(Image.new("RGBA", (2, 2)), "fp")


def test_hash_timing_sanity() -> None:
    image = noise(1024, 1024, seed=7)
    image_hash(image, "fp")
    start = time.perf_counter()
    for _ in range(5):
        image_hash(image, "fp")
    print(f"image_hash 1024x1024: {(time.perf_counter() - start) / 5 * 1000:.2f} ms")


def test_load_encoded_returns_the_bytes_it_decoded_for_each_kind_of_source(tmp_path):
    from rollwire.images import load_encoded

    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (10, 200, 30)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    for source in (jpeg, path, str(path), path.as_uri(), url):
        image, data = load_encoded(source)
        assert data == jpeg and image.size == (9, 7) and image.format == "JPEG"
    pil = Image.new("RGB", (3, 3))
    assert load_encoded(pil) == (pil, None)
