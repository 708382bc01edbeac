"""The Gemma 4 image processor, bit-exact with transformers' `Gemma4ImageProcessorPil`.

An image is resized (aspect ratio kept, PIL bicubic on the uint8 image) to the largest size whose
sides are multiples of patch * pooling (48) and whose 16x16 patches number at most
`max_soft_tokens * pooling**2`, then cut into rows of 16*16*3 values laid out (P, P, C). The grid
is `(1, patches high, patches wide)` and the merge size is the pooling kernel (3), so an image
takes `patches // 9` soft tokens, the HF `num_soft_tokens_per_image`. The model's forward pass
takes every image padded to `max_patches` rows, with (x, y) patch positions and -1 on the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rollwire.errors import EmptyImageError, FeatureError, ImageError, ImageSizeUnsupportedError
from rollwire.features.processor import WireField, config_from

if TYPE_CHECKING:
    from rollwire.features.store import ImageFeatures

__all__ = ["SUPPORTED_SOFT_TOKENS", "Gemma4Vision", "gemma4_resize"]

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # what the HF processor accepts
# vLLM 0.32's Gemma 4 field config (gemma4_mm.py), as its render endpoint answers it: per image
# `pixel_values` (max_patches, 768) zero-padded and `pixel_position_ids` (HF's image_position_ids)
# (max_patches, 2) int64 (x, y) with -1 on the padding, both batched (the wire table adds pad_rows).
GEMMA4_WIRE = (WireField("pixel_values", "batched", pixels=True), WireField("pixel_position_ids", "batched"))
_BICUBIC = int(Image.Resampling.BICUBIC)


def gemma4_resize(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """(height, width) the HF processor resizes to (transformers' `get_aspect_ratio_preserving_size`)."""
    if height <= 0 or width <= 0:
        raise EmptyImageError(f"image has zero size {width}x{height}")
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling * patch_size
    new_h = math.floor(factor * height / side) * side
    new_w = math.floor(factor * width / side) * side
    if new_h == 0 and new_w == 0:
        raise ImageSizeUnsupportedError(f"image {width}x{height} resizes to 0x0 (the HF processor rejects it)")
    longest = (max_patches // pooling**2) * side
    if new_h == 0:
        new_h, new_w = side, min(math.floor(width / height) * side, longest)
    elif new_w == 0:
        new_h, new_w = min(math.floor(height / width) * side, longest), side
    if new_h * new_w > target_px:
        raise ImageSizeUnsupportedError(
            f"image {width}x{height} resizes to {new_w}x{new_h}, over {max_patches} patches (the HF processor "
            "rejects it)")
    return new_h, new_w


@dataclass(frozen=True)
class Gemma4Vision:
    """The settings of a Gemma 4 `preprocessor_config.json`; this family's `ImageProcessor`."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    rescale_factor: float = 1 / 255
    do_normalize: bool = False  # Gemma 4 takes pixels in [0, 1]
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resample: int = _BICUBIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        object.__setattr__(self, "resample", int(self.resample))
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise FeatureError(f"Gemma4Vision.{name} must be a positive int, got {value!r}")
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise FeatureError(f"Gemma4Vision.max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got "
                               f"{self.max_soft_tokens!r} (the HF processor rejects it too)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise FeatureError("Gemma4Vision.image_mean/image_std need 3 values (std non-zero)")
        if not self.rescale_factor > 0:
            raise FeatureError(f"Gemma4Vision.rescale_factor must be positive, got {self.rescale_factor}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, where: str = "preprocessor config") -> Gemma4Vision:
        """Read a `preprocessor_config.json` as `Gemma4ImageProcessorPil.from_pretrained` does (a
        nested `image_processor` object, as in a processor config, is read too)."""
        if isinstance(cfg.get("image_processor"), dict):
            cfg = cfg["image_processor"]
        for flag in ("do_resize", "do_convert_rgb", "do_rescale"):
            if cfg.get(flag, True) is not True:
                raise FeatureError(f"{where}: {flag}={cfg[flag]!r} is not supported (rollwire needs it true)")
        return config_from(cls, cfg, ("patch_size", "pooling_kernel_size", "max_soft_tokens", "rescale_factor",
                                      "do_normalize", "image_mean", "image_std", "resample"), where)

    @property
    def max_patches(self) -> int:
        """Rows every image is padded to in the model's input."""
        return self.max_soft_tokens * self.pooling_kernel_size**2

    # --- the ImageProcessor protocol ------------------------------------------------------------

    @property
    def merge_size(self) -> int:
        return self.pooling_kernel_size

    @property
    def row_size(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def process(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 rows (P, P, C per patch, patches row-major) and grid (1, h, w) in patches."""
        if image.mode != "RGB":
            raise ImageError(f"the Gemma 4 processor needs an RGB image (call to_rgb first), got mode {image.mode!r}")
        width, height = image.size
        p = self.patch_size
        new_h, new_w = gemma4_resize(height, width, p, self.max_patches, self.pooling_kernel_size)
        if (new_h, new_w) != (height, width):
            try:
                image = image.resize((new_w, new_h), resample=self.resample)
            except (ValueError, OSError, MemoryError) as exc:
                raise ImageError(f"cannot resize image {width}x{height} to {new_w}x{new_h}: {exc}") from None
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.shape != (new_h, new_w, 3):
            raise ImageError(f"resized image has unexpected layout {pixels.dtype} {pixels.shape}")
        gh, gw = new_h // p, new_w // p
        rows = np.ascontiguousarray(pixels.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4)).reshape(gh * gw, -1)
        rows.flags.writeable = False
        return rows, (1, gh, gw)

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows as the HF processor returns them (float64 rescale to float32, then the
        optional float32 normalisation), through a per-channel 256-entry table."""
        table = _table(self.rescale_factor, self.do_normalize, self.image_mean, self.image_std)
        channel = np.arange(rows.shape[1]) % 3  # rows are laid out (P, P, C)
        return table[channel[None, :], rows]

    def model_inputs(self, features: Sequence[ImageFeatures]) -> dict[str, np.ndarray]:
        """`pixel_values` (B, max_patches, 768) float32 zero-padded and `image_position_ids`
        (B, max_patches, 2) int64 (x, y) with -1 on the padding, as the HF processor batches them."""
        n = self.max_patches
        pixels = np.zeros((len(features), n, self.row_size), dtype=np.float32)
        positions = np.full((len(features), n, 2), -1, dtype=np.int64)
        for b, feat in enumerate(features):
            _, gh, gw = feat.grid_thw
            if gh * gw > n or feat.pixel_values.shape[1] != self.row_size:
                raise FeatureError(f"image {feat.id[:12]}: grid {feat.grid_thw} does not fit this processor")
            pixels[b, : gh * gw] = self.normalize(feat.pixel_values)
            positions[b] = _positions(gh, gw, n)
        return {"pixel_values": pixels, "image_position_ids": positions}

    @property
    def wire_fields(self) -> tuple[WireField, ...]:
        pixels, positions = GEMMA4_WIRE
        return dataclasses.replace(pixels, pad_rows=self.max_patches), positions

    def wire_arrays(self, features: ImageFeatures) -> dict[str, np.ndarray]:
        _, gh, gw = features.grid_thw
        return {"pixel_position_ids": _positions(gh, gw, self.max_patches)}

    def from_wire(self, pixels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
        """The grid a received item's positions describe: a row-major (x, y) prefix, then -1 rows
        whose pixels are zero, max_patches rows in all."""
        pos, n = arrays["pixel_position_ids"], self.max_patches
        if pixels.shape != (n, self.row_size) or pos.shape != (n, 2):
            raise FeatureError(f"pixel_values must be ({n}, {self.row_size}) and pixel_position_ids ({n}, 2), got "
                               f"{pixels.shape}, {pos.shape}")
        if pos.dtype != np.int64:
            raise FeatureError(f"pixel_position_ids must be int64, got {pos.dtype}")
        used = int(np.count_nonzero(pos[:, 0] >= 0))
        gh, gw = (int(pos[:used, 1].max()) + 1, int(pos[:used, 0].max()) + 1) if used else (0, 0)
        if used == 0 or gh * gw != used or not np.array_equal(pos, _positions(gh, gw, n)):
            raise FeatureError(f"pixel_position_ids are not a row-major patch grid padded with -1 ({used} used)")
        if np.any(pixels[used:]):
            raise FeatureError(f"pixel_values has non-zero padding rows after the {used} patches")
        return 1, gh, gw

    def unresized_side(self) -> int:
        side = self.patch_size * self.pooling_kernel_size
        return math.floor(math.sqrt(self.max_patches) * self.patch_size / side) * side

    def check_model(self, vision_config: Any) -> None:
        patch = int(vision_config.patch_size)
        pooling = int(getattr(vision_config, "pooling_kernel_size", 3))
        if self.row_size != 3 * patch * patch or self.merge_size != pooling:
            raise FeatureError(
                f"the processor makes rows of {self.row_size} values pooled by {self.merge_size}; the model takes "
                f"{3 * patch * patch} and {pooling}: build it from the model's preprocessor_config.json")


def _positions(gh: int, gw: int, n: int) -> np.ndarray:
    """(n, 2) int64 (x, y) of a gh x gw patch grid, row-major, then -1 rows."""
    out = np.full((n, 2), -1, dtype=np.int64)
    x, y = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
    out[: gh * gw] = np.stack([x, y], axis=-1).reshape(-1, 2)
    return out


@functools.lru_cache(maxsize=64)
def _fingerprint(config: Gemma4Vision) -> str:
    text = json.dumps({"v": 1, **asdict(config)}, sort_keys=True)
    return f"gemma4v1-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


@functools.lru_cache(maxsize=16)
def _table(rescale: float, normalize: bool, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    scaled = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    table = np.broadcast_to(scaled, (3, 256)).copy()
    if normalize:
        table = (table - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]
    table.flags.writeable = False
    return table
