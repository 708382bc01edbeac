"""The features fast path: a view of PIL's own pixel memory, the RGBX patchify, the streamed image
id; each against an independent reference (numpy's copy of the pixels, HF's patch formula, BLAKE3
over `tobytes()`, the HF processor). The patchify and the id run on both their paths: the compiled
shuffles (`pixels.simd()`, where this CPU has AVX-512 VBMI) and numpy / PIL."""

from __future__ import annotations

import gc
import io
import struct
import warnings

import blake3
import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rollwire.errors import ImageError
from rollwire.features import VisionConfig, pixels, process_image
from rollwire.features.pixels import rgbx_pixels
from rollwire.features.qwen_vl import patchify_rgbx
from rollwire.images import image_hash, load_image, to_rgb


@pytest.fixture(params=["simd", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test that takes it runs with the compiled extension (shuffles and view) and without it."""
    if request.param == "simd":
        if pixels.simd() is None:
            pytest.skip("no compiled shuffles here (not built, or no AVX-512 VBMI or AVX2): see tests/test_simd.py")
    else:
        monkeypatch.setattr(pixels, "COMPILED", None)  # no shuffles, and rgbx_pixels by ctypes
    return str(request.param)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def hf_rows(pixels: np.ndarray, p: int, m: int, t: int) -> np.ndarray:
    """The HF Qwen2-VL processor's patch formula, written out: (C, H, W) frames repeated over T."""
    chw = pixels.transpose(2, 0, 1)[None].repeat(t, axis=0)  # (T, C, H, W)
    gh, gw = pixels.shape[0] // p, pixels.shape[1] // p
    x = chw.reshape(1, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * t * p * p)


def test_view_is_the_images_pixels_whatever_made_the_image(path: str) -> None:
    base = noise(96, 64, seed=1)
    made = {
        "fromarray": base,
        "resize": base.resize((84, 56), Image.Resampling.BICUBIC),
        "png": load_image(encoded(base, "PNG")),
        "jpeg": load_image(encoded(base, "JPEG")),
        "crop": base.crop((3, 5, 70, 60)),
        "transpose": base.transpose(Image.Transpose.ROTATE_90),
        "from L": to_rgb(base.convert("L")),
        "from RGBA": to_rgb(base.convert("RGBA")),
        "from P": to_rgb(base.convert("P")),
    }
    for name, image in made.items():
        view = rgbx_pixels(image)
        assert view is not None, name
        assert view.shape == (image.height, image.width, 4) and view.dtype == np.uint8
        assert np.array_equal(view[:, :, :3], np.asarray(image)), name
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0, 0] = 1


def test_view_outlives_the_image_it_was_taken_from(path: str) -> None:
    image = noise(280, 196, seed=2).resize((252, 168), Image.Resampling.BICUBIC)
    expected = np.asarray(image).copy()
    view = rgbx_pixels(image)
    assert view is not None
    del image
    gc.collect()
    churn = [np.full((168, 252, 4), 7, dtype=np.uint8) for _ in range(40)]  # would reuse freed memory
    assert np.array_equal(view[:, :, :3], expected)
    del churn


def test_no_view_where_pil_cannot_give_one(path: str) -> None:
    assert rgbx_pixels(Image.new("L", (8, 8))) is None
    assert rgbx_pixels(Image.new("RGBA", (8, 8))) is None
    big = Image.new("RGB", (2112, 2112))  # 17.8 MB: more than one of PIL's 16 MiB memory blocks
    assert rgbx_pixels(big) is None


@pytest.mark.parametrize(("p", "m", "t"), [(14, 2, 2), (16, 2, 2), (14, 1, 1), (14, 2, 3), (5, 3, 2)])
@pytest.mark.parametrize(("gh", "gw"), [(1, 1), (2, 3), (7, 5), (36, 60)])
def test_patchify_rgbx_is_hfs_patch_layout(p: int, m: int, t: int, gh: int, gw: int, path: str) -> None:
    rng = np.random.default_rng(gh * 100 + gw)
    rgbx = rng.integers(0, 256, (gh * p * m, gw * p * m, 4), dtype=np.uint8)  # pad bytes random: ignored
    rows = patchify_rgbx(rgbx, p, m, t)
    assert rows.dtype == np.uint8 and not rows.flags.writeable
    assert np.array_equal(rows, hf_rows(rgbx[:, :, :3], p, m, t))


def test_patchify_rgbx_takes_a_strided_view_and_rejects_a_bad_shape(path: str) -> None:
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (56, 112, 4), dtype=np.uint8)
    half = wide[:, 56:]  # rows not contiguous
    assert np.array_equal(patchify_rgbx(half, 14, 2, 2), hf_rows(half[:, :, :3], 14, 2, 2))
    with pytest.raises(ImageError):
        patchify_rgbx(wide[:, :, :3], 14, 2, 2)
    with pytest.raises(ImageError):
        patchify_rgbx(wide[:50], 14, 2, 2)


def test_process_without_a_view_is_still_the_hf_rows() -> None:
    """An image larger than one PIL memory block has no view: the copy path gives the same rows."""
    config = VisionConfig.qwen3_vl()
    image = noise(2112, 2112, seed=4)  # kept as it is (a multiple of 32 within max_pixels)
    assert rgbx_pixels(image) is None
    rows, grid = process_image(image, config)
    hf = Qwen2VLImageProcessorPil(size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
                                  patch_size=16, temporal_patch_size=2, merge_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf(image, do_rescale=False, do_normalize=False)
    assert grid == tuple(int(g) for g in expected["image_grid_thw"][0])
    assert np.array_equal(rows.astype(np.float32), expected["pixel_values"])


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (17, 1), (640, 480), (256, 257), (1500, 1100), (70000, 2),
                                  (2, 70000)])
def test_image_id_is_blake3_over_the_packed_rgb_bytes(size: tuple[int, int], path: str) -> None:
    """Streamed in chunks (rows wider than a chunk included), the id is what it was: BLAKE3 keyed by
    the id context over (width, height, len(fp)), fp and `tobytes()`."""
    image = noise(*size, seed=5)
    fp = b"qwenvl1-0123456789abcdef"
    hasher = blake3.blake3(derive_key_context="rollwire 2026 image id v2")
    hasher.update(struct.pack("<QQQ", size[0], size[1], len(fp)) + fp + image.tobytes())
    assert image_hash(image, fp.decode()) == hasher.hexdigest(length=16)


def test_image_id_ignores_pils_pad_byte(path: str) -> None:
    """PIL's fourth byte of an RGB pixel is 255 from `fromarray` and 0 from `resize`; the compiled pack
    reads PIL's memory with it, so the same pixels must still give one id."""
    image = noise(300, 229, seed=6)  # 68,700 pixels: more than one chunk of the pack
    # a box filter doubling the width, then halving it, gives the pixels back exactly, written by the resampler
    resized = image.resize((600, 229), Image.Resampling.BOX).resize((300, 229), Image.Resampling.BOX)
    assert np.array_equal(np.asarray(resized), np.asarray(image))
    pads = {int(rgbx_pixels(im)[0, 0, 3]) for im in (image, resized)}  # type: ignore[index]
    assert pads == {0, 255}
    assert image_hash(image, "fp") == image_hash(resized, "fp")
