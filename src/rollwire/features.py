"""Qwen-VL image features (bit-exact with the HF PIL processor) and the content-addressed store.

Features are kept as uint8 patch rows: resized and patchified, neither rescaled nor normalised
(what vLLM wants on the wire). `ImageFeatures.normalized` gives the float pixels the HF
processor returns by default. The feature store is the only place pixels live; everything
else refers to an image by its id (a hash of its RGB pixels, size and `VisionConfig`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from PIL import Image

from rollwire.errors import (
    EmptyImageError,
    FeatureError,
    ImageError,
    ImageSizeUnsupportedError,
    UnknownImageError,
)
from rollwire.images import DEFAULT_LIMITS, ImageLimits, image_hash, load_image, to_rgb
from rollwire.messages import ImageSource

if TYPE_CHECKING:
    import torch

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "FeatureStore",
    "ImageFeatures",
    "PixelFormat",
    "StoreStats",
    "VisionConfig",
    "compute_features",
    "process_image",
    "smart_resize",
]

# How pixels travel: uint8 patch rows (what vLLM 0.32 wants) or normalised floats.
PixelFormat: TypeAlias = Literal["uint8", "float32", "bfloat16"]

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
        kwargs: dict[str, Any] = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                    "rescale_factor", "resample"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise FeatureError(f"{where}: invalid value: {exc}") from None

    @property
    def factor(self) -> int:
        """Resized height and width are multiples of this."""
        return self.patch_size * self.merge_size

    @property
    def row_size(self) -> int:
        """Values per patch row: channels * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def fingerprint(self) -> str:
        """A short stable string over every field (part of each image id)."""
        return _fingerprint(self)


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
    laid out (C, T, P, P) with the single frame repeated over T.
    """
    if image.mode != "RGB":
        raise ImageError(f"process_image needs an RGB image (call to_rgb first), got mode {image.mode!r}")
    width, height = image.size
    new_h, new_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    try:
        resized = image.resize((new_w, new_h), resample=config.resample)
    except (ValueError, OSError, MemoryError) as exc:
        raise ImageError(f"cannot resize image {width}x{height} to {new_w}x{new_h}: {exc}") from None
    pixels = np.asarray(resized)  # (H, W, 3) uint8
    if pixels.dtype != np.uint8 or pixels.shape != (new_h, new_w, 3):
        raise ImageError(f"resized image has unexpected layout {pixels.dtype} {pixels.shape}")
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = new_h // p, new_w // p
    # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p), as HF orders it.
    patches = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    rows = np.ascontiguousarray(patches).reshape(grid_h * grid_w, 3 * t * p * p)
    rows.flags.writeable = False
    return rows, (1, grid_h, grid_w)


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """One image's uint8 patch rows (read-only), its grid and its content id."""

    id: str
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    merge_size: int

    def __post_init__(self) -> None:
        pv = self.pixel_values
        grid = tuple(int(g) for g in self.grid_thw)
        if not isinstance(pv, np.ndarray) or pv.dtype != np.uint8 or pv.ndim != 2:
            raise FeatureError(f"image {self.id[:12]}: pixel_values must be a 2-D uint8 array")
        if len(grid) != 3 or min(grid) <= 0 or pv.shape[0] != math.prod(grid):
            raise FeatureError(
                f"image {self.id[:12]}: grid {self.grid_thw} does not match {pv.shape[0]} rows")
        m = self.merge_size
        if m <= 0 or grid[1] % m or grid[2] % m:
            raise FeatureError(f"image {self.id[:12]}: grid {grid} is not a multiple of merge size {m}")
        if pv.flags.writeable:
            pv = pv.view()
            pv.flags.writeable = False
        object.__setattr__(self, "pixel_values", pv)
        object.__setattr__(self, "grid_thw", grid)

    @property
    def num_tokens(self) -> int:
        """Image pad tokens this image takes in the prompt."""
        return math.prod(self.grid_thw) // (self.merge_size * self.merge_size)

    @property
    def nbytes(self) -> int:
        return int(self.pixel_values.nbytes)

    def normalized(self, config: VisionConfig, dtype: Any = np.float32) -> np.ndarray:
        """Rescaled and normalised float rows, equal to the HF processor's default output.

        Computed through a per-channel 256-entry table built with the processor's own float
        steps (float64 rescale, float32 subtract and divide), so float32 results match exactly.
        """
        out_dtype = np.dtype(dtype)
        if out_dtype.kind != "f":
            raise FeatureError(
                f"normalized() needs a float dtype, got {out_dtype} (for bfloat16 use normalized_torch)")
        pv = self.pixel_values
        if pv.shape[1] != config.row_size:
            raise FeatureError(f"image {self.id[:12]}: rows have {pv.shape[1]} values but the config "
                               f"implies {config.row_size}")
        table = _normalize_table(config.image_mean, config.image_std, config.rescale_factor)
        out = np.empty(pv.shape, dtype=np.float32)
        per_channel = pv.shape[1] // 3
        for c in range(3):
            cols = slice(c * per_channel, (c + 1) * per_channel)
            out[:, cols] = table[c][pv[:, cols]]
        return out if out_dtype == np.float32 else out.astype(out_dtype)

    def normalized_torch(self, config: VisionConfig, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`normalized` as a torch tensor in `dtype` (e.g. torch.bfloat16); imports torch lazily."""
        try:
            import torch
        except ImportError:
            raise FeatureError("normalized_torch needs torch installed") from None
        tensor = torch.from_numpy(self.normalized(config))
        return tensor if dtype is None or dtype == torch.float32 else tensor.to(dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageFeatures):
            return NotImplemented
        return (self.id == other.id and self.grid_thw == other.grid_thw
                and self.merge_size == other.merge_size
                and np.array_equal(self.pixel_values, other.pixel_values))

    def __hash__(self) -> int:
        return hash(self.id)


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...], rescale: float) -> np.ndarray:
    values = np.arange(256, dtype=np.uint8)
    scaled = (values.astype(np.float64) * rescale).astype(np.float32)
    mean32, std32 = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    table = (scaled[None, :] - mean32[:, None]) / std32[:, None]  # float32 throughout, as HF
    table.flags.writeable = False
    return table


def compute_features(rgb_image: Image.Image, config: VisionConfig) -> ImageFeatures:
    """Hash and process an RGB image (no store involved)."""
    image_id = image_hash(rgb_image, config.fingerprint())
    rows, grid = process_image(rgb_image, config)
    return ImageFeatures(image_id, rows, grid, config.merge_size)


@dataclass(frozen=True)
class StoreStats:
    items: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    oversized: int  # processed items larger than max_bytes: returned, not stored


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    result: ImageFeatures | None = None


class FeatureStore:
    """Content-addressed image features, bounded by bytes (LRU), safe to share between threads.

    `get_or_process` decodes and hashes every time (that is how the id is known) and processes
    only on a miss; concurrent requests for the same new image process it once (one miss, the
    others count as hits). `get` and `put` do not count.
    """

    def __init__(self, config: VisionConfig | None = None, *, max_bytes: int = 4 * 2**30,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        if max_bytes < 0:
            raise FeatureError(f"max_bytes must be >= 0, got {max_bytes}")
        self.config = config if config is not None else VisionConfig()
        self.max_bytes = max_bytes
        self.limits = limits
        self._fingerprint = self.config.fingerprint()
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._oversized = 0

    def get_or_process(self, source: ImageSource, *, limits: ImageLimits | None = None) -> ImageFeatures:
        rgb = to_rgb(load_image(source, limits or self.limits))
        image_id = image_hash(rgb, self._fingerprint)
        while True:
            with self._lock:
                found = self._items.get(image_id)
                if found is not None:
                    self._items.move_to_end(image_id)
                    self._hits += 1
                    return found
                pending = self._pending.get(image_id)
                owner = pending is None
                if pending is None:
                    pending = self._pending[image_id] = _Pending()
                    self._misses += 1
            if owner:
                break
            pending.done.wait()
            if pending.result is not None:  # oversized results are not stored but still shared
                with self._lock:
                    self._hits += 1
                return pending.result
            # the owner failed: try again (and fail the same way, with our own exception)
        try:
            rows, grid = process_image(rgb, self.config)
            features = ImageFeatures(image_id, rows, grid, self.config.merge_size)
            with self._lock:
                self._insert(features)
                pending.result = features
        finally:
            with self._lock:
                self._pending.pop(image_id, None)
            pending.done.set()
        return features

    def put(self, features: ImageFeatures) -> None:
        """Store features computed elsewhere (e.g. received from a peer) under their id."""
        config = self.config
        if features.merge_size != config.merge_size or features.pixel_values.shape[1] != config.row_size:
            raise FeatureError(f"image {features.id[:12]}: features do not match this store's VisionConfig")
        with self._lock:
            existing = self._items.get(features.id)
            if existing is not None:
                if existing.grid_thw != features.grid_thw:
                    raise FeatureError(f"image {features.id[:12]}: id already stored with grid "
                                       f"{existing.grid_thw}, got {features.grid_thw}")
                self._items.move_to_end(features.id)
                return
            self._insert(features)

    def get(self, image_id: str) -> ImageFeatures:
        with self._lock:
            found = self._items.get(image_id)
            if found is None:
                raise UnknownImageError(f"image {image_id!r} is not in the feature store")
            self._items.move_to_end(image_id)
            return found

    def __contains__(self, image_id: object) -> bool:
        with self._lock:
            return image_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        """Drop every stored image (the counters stay)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(items=len(self._items), bytes=self._bytes, max_bytes=self.max_bytes,
                              hits=self._hits, misses=self._misses, evictions=self._evictions,
                              oversized=self._oversized)

    def _insert(self, features: ImageFeatures) -> None:  # caller holds the lock
        if features.nbytes > self.max_bytes:
            self._oversized += 1
            return
        self._items[features.id] = features
        self._bytes += features.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._evictions += 1
