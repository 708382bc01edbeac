"""The Qwen-VL image processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), bit-exact with the HF
PIL processor: `smart_resize` to multiples of patch * merge, patch rows laid out (C, T, P, P).

`VisionConfig` holds the settings of `preprocessor_config.json` and is this family's
`ImageProcessor`: its rows are uint8 (what vLLM wants); `normalize` gives the float pixels the HF
processor returns by default; `model_inputs` the `pixel_values` + `image_grid_thw` the model takes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rollwire.errors import EmptyImageError, FeatureError, ImageError, ImageSizeUnsupportedError
from rollwire.features import pixels
from rollwire.features.pixels import rgbx_pixels
from rollwire.features.processor import WireField, config_from

if TYPE_CHECKING:
    from rollwire.features.store import ImageFeatures

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "QWEN_VL_WIRE", "VisionConfig", "patchify", "patchify_rgbx",
           "process_image", "smart_resize"]

# vLLM's Qwen2-VL field factory (shared by Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.xV): pixel rows
# flat, split per image by grid size; the grid batched, kept on the CPU.
QWEN_VL_WIRE = (WireField("pixel_values", "flat", pixels=True),
                WireField("image_grid_thw", "batched", keep_on_cpu=True))

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
_BICUBIC = int(Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class VisionConfig:
    """Everything that shapes an image's features (the HF Qwen2-VL image processor settings)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = _BICUBIC  # a PIL resampling filter

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        object.__setattr__(self, "resample", int(self.resample))
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FeatureError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise FeatureError(f"VisionConfig.min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise FeatureError("VisionConfig.image_mean/image_std need 3 values (std non-zero)")
        if not self.rescale_factor > 0:
            raise FeatureError(f"VisionConfig.rescale_factor must be positive, got {self.rescale_factor}")

    @classmethod
    def qwen2_vl(cls, **overrides: Any) -> VisionConfig:
        """Qwen2-VL / Qwen2.5-VL: the HF processor's defaults (patch 14, CLIP mean/std)."""
        return cls(**overrides)

    @classmethod
    def qwen3_vl(cls, **overrides: Any) -> VisionConfig:
        """Qwen3-VL. transformers reuses the Qwen2-VL image processor for it; the model's shipped
        preprocessor_config sets patch 16, mean/std 0.5 and size 65536..16777216 pixels."""
        base: dict[str, Any] = dict(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                    min_pixels=65536, max_pixels=16777216)
        return cls(**{**base, **overrides})

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> VisionConfig:
        """Read `preprocessor_config.json` the way `Qwen2VLImageProcessorPil.from_pretrained` does."""
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FeatureError(f"no preprocessor_config.json in {model_dir}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FeatureError(f"cannot read {path}: {exc}") from None
        if not isinstance(cfg, dict):
            raise FeatureError(f"{path} is not a JSON object")
        return cls.from_dict(cfg, where=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, where: str = "preprocessor config") -> VisionConfig:
        for flag in ("do_resize", "do_convert_rgb", "do_rescale", "do_normalize"):
            if cfg.get(flag, True) is not True:
                raise FeatureError(f"{where}: {flag}={cfg[flag]!r} is not supported (rollwire needs it true)")
        # Like the HF processor: `size` replaces the default dict; top-level min/max_pixels win over it.
        size = cfg.get("size")
        size = dict(size) if isinstance(size, dict) else (
            {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280} if size is None else {})
        if cfg.get("min_pixels") is not None:
            size["shortest_edge"] = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            size["longest_edge"] = cfg["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise FeatureError(f"{where}: size needs 'shortest_edge' and 'longest_edge' (or min_pixels and "
                               f"max_pixels), got {cfg.get('size')!r}; the HF processor rejects it too")
        return config_from(cls, cfg, ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                      "rescale_factor", "resample"), where,
                           min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])

    @property
    def factor(self) -> int:
        """Resized height and width are multiples of this."""
        return self.patch_size * self.merge_size

    @property
    def row_size(self) -> int:
        """Values per patch row: channels * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def repeated_frames(self) -> tuple[int, int] | None:
        """(channels, frames) of the rows' (C, T, P, P) layout when T > 1: a still image is one frame
        repeated T times, which a features blob keeps once. None when there is nothing repeated."""
        return (3, self.temporal_patch_size) if self.temporal_patch_size > 1 else None

    def fingerprint(self) -> str:
        """A short stable string over every field (part of each image id)."""
        return _fingerprint(self)

    # --- the ImageProcessor protocol ------------------------------------------------------------

    def process(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        return process_image(image, self)

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        """Through a per-channel 256-entry table built with the HF processor's own float steps
        (float64 rescale, float32 subtract and divide), so float32 results match exactly."""
        table = _normalize_table(self.image_mean, self.image_std, self.rescale_factor)
        out = np.empty(rows.shape, dtype=np.float32)
        per_channel = rows.shape[1] // 3
        for c in range(3):
            cols = slice(c * per_channel, (c + 1) * per_channel)
            out[:, cols] = table[c][rows[:, cols]]
        return out

    def model_inputs(self, features: Sequence[ImageFeatures]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.concatenate([self.normalize(f.pixel_values) for f in features]),
                "image_grid_thw": np.array([f.grid_thw for f in features], dtype=np.int64).reshape(-1, 3)}

    def unresized_side(self) -> int:
        return max(self.factor, math.ceil(math.sqrt(self.min_pixels) / self.factor) * self.factor)

    @property
    def wire_fields(self) -> tuple[WireField, ...]:
        return QWEN_VL_WIRE

    def wire_arrays(self, features: ImageFeatures) -> dict[str, np.ndarray]:
        return {"image_grid_thw": np.asarray(features.grid_thw, dtype=np.int64)}

    def from_wire(self, pixels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
        grid = arrays["image_grid_thw"]
        if pixels.ndim != 2 or grid.shape != (3,):
            raise FeatureError(f"pixel_values must be 2-D and image_grid_thw 3 values, got {pixels.shape}, "
                               f"{grid.shape}")
        if grid.dtype != np.int64:
            raise FeatureError(f"image_grid_thw must be int64, got {grid.dtype}")
        t, h, w = (int(v) for v in grid)
        if min(t, h, w) <= 0:
            raise FeatureError(f"image_grid_thw {[t, h, w]} must be positive")
        if t * h * w != pixels.shape[0]:  # Python ints: no overflow
            raise FeatureError(f"grid {[t, h, w]} implies {t * h * w} rows, pixel_values has {pixels.shape[0]}")
        return t, h, w

    def check_model(self, vision_config: Any) -> None:
        patch = int(vision_config.patch_size)
        temporal = int(getattr(vision_config, "temporal_patch_size", 2))
        channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
        merge = int(vision_config.spatial_merge_size)
        if self.row_size != channels * temporal * patch * patch or self.merge_size != merge:
            raise FeatureError(
                f"the processor makes rows of {self.row_size} values with merge size {self.merge_size}; the model "
                f"takes {channels * temporal * patch * patch} and {merge}: build it from the model's "
                "preprocessor_config.json")


@functools.lru_cache(maxsize=64)
def _fingerprint(config: VisionConfig) -> str:
    text = json.dumps({"v": 1, **asdict(config)}, sort_keys=True)
    return f"qwenvl1-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) the HF Qwen-VL processor resizes to: multiples of `factor`, pixel count in
    [min_pixels, max_pixels], aspect ratio kept. Same arithmetic as transformers' `smart_resize`."""
    if height <= 0 or width <= 0:
        raise EmptyImageError(f"image has zero size {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeUnsupportedError(
            f"image {width}x{height}: aspect ratio {ratio:g} exceeds {MAX_ASPECT_RATIO} (the HF processor "
            "rejects it)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def process_image(image: Image.Image, config: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 patch rows and grid (t, h, w) of an RGB image, bit-exact with the HF PIL processor
    run with do_rescale=False, do_normalize=False.

    The processor resizes the uint8 image with PIL (no float round trip), then patchifies to rows
    laid out (C, T, P, P) with the single frame repeated over T. The patchify reads PIL's memory
    in place (`rgbx_pixels`), so the rows are the one copy made after the resize.
    """
    if image.mode != "RGB":
        raise ImageError(f"process_image needs an RGB image (call to_rgb first), got mode {image.mode!r}")
    width, height = image.size
    new_h, new_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    try:  # PIL's resize to the same size is a copy: skip it
        resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), config.resample)
    except (ValueError, OSError, MemoryError) as exc:
        raise ImageError(f"cannot resize image {width}x{height} to {new_w}x{new_h}: {exc}") from None
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    rgbx = rgbx_pixels(resized)
    if rgbx is not None:
        rows = patchify_rgbx(rgbx, p, m, t)
    else:  # no view of PIL's memory: take its bytes (one conversion more), same rows
        pixels = np.asarray(resized)
        if pixels.dtype != np.uint8 or pixels.shape != (new_h, new_w, 3):
            raise ImageError(f"resized image has unexpected layout {pixels.dtype} {pixels.shape}")
        rows = patchify(pixels, p, m, t)
    return rows, (1, new_h // p, new_w // p)


_BAND_BYTES = 1 << 18  # rows written per band: small enough to stay in the core's cache


def patchify(pixels: np.ndarray, p: int, m: int, t: int) -> np.ndarray:
    """Read-only uint8 rows (C, T, P, P) of an (H, W, 3) image, in HF's patch order, written once.

    Band by band (a few merged rows of patches): the first frame is gathered straight from the
    image into the output, then copied to the other frames while the band is still in cache, so
    the output's memory is touched once and no full-size intermediate is made.
    """
    height, width = pixels.shape[:2]
    grid_h, grid_w = height // p, width // p
    # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p), as HF orders it.
    src = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    out = np.empty((grid_h // m, grid_w // m, m, m, 3, t, p, p), dtype=np.uint8)
    step = max(1, _BAND_BYTES // (grid_w * m * 3 * t * p * p))
    for b in range(0, grid_h // m, step):
        band = out[b : b + step]
        band[:, :, :, :, :, 0] = src[b : b + step]
        if t > 1:
            band[:, :, :, :, :, 1:] = band[:, :, :, :, :, :1]
    rows = out.reshape(grid_h * grid_w, 3 * t * p * p)
    rows.flags.writeable = False
    return rows


_SCRATCH_BYTES = 1 << 18  # RGBX pixels per band of `patchify_rgbx`: small enough to stay in the core's cache
_scratch = threading.local()  # each thread's band buffers, reused (the patchify runs on worker threads)


def patchify_rgbx(rgbx: np.ndarray, p: int, m: int, t: int) -> np.ndarray:
    """`patchify` of an (H, W, 4) RGBX image (PIL's own layout: R, G, B, a pad byte): the same rows.

    numpy moves short byte runs slowly (the strided copy of 14-byte runs was the old patchify's
    cost), so each band of merged patch rows goes in wide moves through one small reused buffer:
    each patch row of 4-byte pixels as one `V{4p}` item into patch order (a patch's p*p pixels are
    then contiguous); then each channel out of the 4-byte pixels as one uint32 -> uint8 cast, over a
    view shifted by the channel's byte (`<u4`: its low byte is the first, on any machine), straight
    into the rows, broadcast over the frames. With `pixels.simd()`, the compiled shuffles do it instead:
    at AVX-512 VBMI one permute per patch row and masked stores into every frame, at about the cost of
    one copy; at AVX2 about twice that, still under numpy's.
    """
    height, width = rgbx.shape[:2]
    if rgbx.dtype != np.uint8 or rgbx.ndim != 3 or rgbx.shape[2] != 4 or height % (p * m) or width % (p * m):
        raise ImageError(f"patchify_rgbx needs (H, W, 4) uint8 in multiples of {p * m}, got {rgbx.dtype} "
                         f"{rgbx.shape}")
    if rgbx.strides != (4 * width, 4, 1):
        rgbx = np.ascontiguousarray(rgbx)
    simd = pixels.simd()
    if simd is not None and height and width and p <= simd.MAX_PATCH and t <= simd.MAX_FRAMES:  # a permute a row
        out = np.empty((height * width // (p * p), 3 * t * p * p), dtype=np.uint8)
        simd.patchify_rgbx(rgbx, out, height, width, p, m, t)
        out.flags.writeable = False
        return out
    bands, per_band = height // (p * m), width // p * m  # merged rows of patches; patches in each
    band_pixels, pp = per_band * p * p, p * p
    step = min(bands, max(1, _SCRATCH_BYTES // (4 * band_pixels)))
    tiles_buf, channels = _band_buffers(step * band_pixels)
    item = np.dtype(f"V{4 * p}")  # a patch row of RGBX pixels
    # (H, W*4) bytes -> (bands, m, p, gw/m, m) items -> (bands, gw/m, m, m, p): HF's patch order.
    src = rgbx.reshape(height, width * 4).view(item).reshape(bands, m, p, width // (p * m), m)
    src = src.transpose(0, 3, 1, 4, 2)
    tiles = tiles_buf[: 4 * step * band_pixels].view(item).reshape(step, width // (p * m), m, m, p)
    out = np.empty((bands * per_band, 3, t, pp), dtype=np.uint8)
    for b in range(0, bands, step):
        n = min(step, bands - b)
        lo, hi = b * per_band, (b + n) * per_band
        tiles[:n] = src[b : b + n]
        band = out[lo:hi]  # (patches, 3, t, p*p)
        for c in range(3):  # the low byte of each shifted pixel: channel c, into every frame at once
            np.copyto(band[:, c], channels[c][: n * band_pixels].reshape(hi - lo, 1, pp), casting="unsafe")
    rows = out.reshape(bands * per_band, 3 * t * pp)
    rows.flags.writeable = False
    return rows


def _band_buffers(pixels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """This thread's RGBX tile buffer (+ 4 bytes: the shifted views read up to 3 past the end) and
    the 3 shifted `<u4` views of it, for at least `pixels` pixels."""
    got: tuple[np.ndarray, list[np.ndarray]] | None = getattr(_scratch, "buffers", None)
    if got is None or got[1][0].shape[0] < pixels:
        tiles = np.empty(4 * pixels + 4, dtype=np.uint8)
        channels = [np.frombuffer(tiles, dtype="<u4", offset=c, count=pixels) for c in range(3)]
        got = _scratch.buffers = (tiles, channels)
    return got


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...], rescale: float) -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    scaled = (values.astype(np.float64) * rescale).astype(np.float32)
    mean32, std32 = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    table = (scaled[None, :] - mean32[:, None]) / std32[:, None]  # float32 throughout, as HF
    table.flags.writeable = False
    return table


