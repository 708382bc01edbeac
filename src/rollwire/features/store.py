"""The content-addressed feature store, the only place pixels live, and one image's features.

Everything else refers to an image by its id: a hash of its RGB pixels, its size and the
processor's fingerprint (the settings that shape its features). The store works with any
`ImageProcessor`; it is bounded by bytes and safe to share between threads.

An in-flight request pins the images it must send (they are not evicted while it runs) and makes
the others reloadable: one the store evicted is recomputed on `get` from the source the request
names (its archived original), so callers never keep features of their own to put back.

With `keep_encoded`, an image that came as encoded bytes keeps them beside its features (counted in
the byte bound, evicted with them): `encoded(id)` is the original a content_parts request can send.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rollwire.errors import FeatureError, ImageReloadError, UnknownImageError
from rollwire.features.processor import ImageProcessor
from rollwire.images import DEFAULT_LIMITS, ImageLimits, image_hash, load_encoded, load_image, to_rgb
from rollwire.messages import ImageSource

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureStore", "ImageFeatures", "StoreStats", "compute_features"]


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

    def normalized(self, config: ImageProcessor, dtype: Any = np.float32) -> np.ndarray:
        """Rescaled and normalised float rows, equal to the HF processor's default output."""
        out_dtype = np.dtype(dtype)
        if out_dtype.kind != "f":
            raise FeatureError(
                f"normalized() needs a float dtype, got {out_dtype} (for bfloat16 use normalized_torch)")
        if self.pixel_values.shape[1] != config.row_size:
            raise FeatureError(f"image {self.id[:12]}: rows have {self.pixel_values.shape[1]} values but the "
                               f"processor makes {config.row_size}")
        out = config.normalize(self.pixel_values)
        return out if out_dtype == np.float32 else out.astype(out_dtype)

    def normalized_torch(self, config: ImageProcessor, dtype: torch.dtype | None = None) -> torch.Tensor:
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


def compute_features(rgb_image: Image.Image, config: ImageProcessor) -> ImageFeatures:
    """Hash and process an RGB image (no store involved)."""
    image_id = image_hash(rgb_image, config.fingerprint())
    rows, grid = config.process(rgb_image)
    return ImageFeatures(image_id, rows, grid, config.merge_size)


Reload = Callable[[str], ImageSource]  # image id -> its source, to recompute evicted features from
# Reloaded images passed the caller's limits when first seen; only PIL's own bomb guard applies again.
_RELOAD_LIMITS = ImageLimits(max_encoded_bytes=2**40, max_pixels=2**40)


@dataclass(frozen=True)
class StoreStats:
    items: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    oversized: int  # processed items larger than max_bytes: returned, not stored
    reloaded: int = 0  # evicted pinned images recomputed from their pin's source


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

    def __init__(self, config: ImageProcessor | None = None, *, max_bytes: int = 4 * 2**30,
                 limits: ImageLimits = DEFAULT_LIMITS, keep_encoded: bool = False) -> None:
        if max_bytes < 0:
            raise FeatureError(f"max_bytes must be >= 0, got {max_bytes}")
        if config is None:
            from rollwire.features.qwen_vl import VisionConfig

            config = VisionConfig()
        self.config: ImageProcessor = config
        self.max_bytes = max_bytes
        self.limits = limits
        self._fingerprint = self.config.fingerprint()
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._oversized = self._reloaded = 0
        self._pins: dict[str, int] = {}  # image id -> in-flight requests that need it
        self._reloads: dict[str, list[Reload]] = {}  # image id -> where pinners can reload it from
        self.keep_encoded = keep_encoded  # keep each image's encoded bytes beside its features
        self._encoded: dict[str, bytes] = {}  # image id -> the bytes it was decoded from (stored items only)

    def get_or_process(self, source: ImageSource, *, limits: ImageLimits | None = None) -> ImageFeatures:
        image, data = load_encoded(source, limits or self.limits)
        rgb = to_rgb(image)
        image_id = image_hash(rgb, self._fingerprint)
        data = data if self.keep_encoded else None
        while True:
            with self._lock:
                found = self._items.get(image_id)
                if found is not None:
                    self._items.move_to_end(image_id)
                    self._hits += 1
                    self._keep(image_id, data)
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
            rows, grid = self.config.process(rgb)
            features = ImageFeatures(image_id, rows, grid, self.config.merge_size)
            with self._lock:
                self._insert(features)
                self._keep(image_id, data)
                pending.result = features
        finally:
            with self._lock:
                self._pending.pop(image_id, None)
            pending.done.set()
        return features

    def image_id(self, source: ImageSource, *, limits: ImageLimits | None = None) -> str:
        """The id `get_or_process` would give `source` (decoded and hashed, not processed)."""
        return image_hash(to_rgb(load_image(source, limits or self.limits)), self._fingerprint)

    def put(self, features: ImageFeatures) -> None:
        """Store features computed elsewhere (e.g. received from a peer) under their id."""
        config = self.config
        if features.merge_size != config.merge_size or features.pixel_values.shape[1] != config.row_size:
            raise FeatureError(f"image {features.id[:12]}: features do not match this store's processor")
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
        """The stored features; a pinned image that was evicted is recomputed from its pin's source."""
        with self._lock:
            found = self._items.get(image_id)
            if found is not None:
                self._items.move_to_end(image_id)
                return found
            reloads = list(self._reloads.get(image_id, ()))
        for reload in reversed(reloads):  # newest pin first; a pinner that cannot say yet is skipped
            try:
                source = reload(image_id)
            except UnknownImageError:
                continue
            return self._reload(image_id, source)
        raise UnknownImageError(f"image {image_id!r} is not in the feature store")

    def _reload(self, image_id: str, source: ImageSource) -> ImageFeatures:
        # The image passed the caller's limits when it was first seen; its archived copy is as large.
        features = self.get_or_process(source, limits=_RELOAD_LIMITS)
        if features.id != image_id:
            raise ImageReloadError(f"image {image_id[:12]} was evicted and, recomputed from its archived "
                                   f"original, hashed to {features.id[:12]}: the archive does not hold it")
        with self._lock:
            self._reloaded += 1
        return features

    def encoded(self, image_id: str) -> bytes | None:
        """The encoded bytes a stored image was decoded from (`keep_encoded`), else None."""
        with self._lock:
            return self._encoded.get(image_id)

    def _keep(self, image_id: str, data: bytes | None) -> None:  # caller holds the lock
        if data is not None and image_id in self._items and image_id not in self._encoded:
            self._encoded[image_id] = data
            self._bytes += len(data)
            self._evict()

    def __contains__(self, image_id: object) -> bool:
        """Whether `get` can return it: stored, or pinned with a source to recompute it from."""
        with self._lock:
            return image_id in self._items or bool(self._reloads.get(image_id))  # type: ignore[call-overload]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        """Drop every stored image (the counters stay)."""
        with self._lock:
            self._items.clear()
            self._encoded.clear()
            self._bytes = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(items=len(self._items), bytes=self._bytes, max_bytes=self.max_bytes,
                              hits=self._hits, misses=self._misses, evictions=self._evictions,
                              oversized=self._oversized, reloaded=self._reloaded)

    @contextlib.contextmanager
    def pinned(self, image_ids: Iterable[str], *, reload: Reload | None = None) -> Iterator[None]:
        """While the block runs, these images are never evicted (an in-flight request needs them);
        the byte bound holds for the unpinned rest (pinned bytes may exceed it). With `reload`,
        they are also `reloadable` (an image evicted before the pin is recomputed when asked for)."""
        ids = list(dict.fromkeys(image_ids))
        with contextlib.ExitStack() as stack:
            if reload is not None:
                stack.enter_context(self.reloadable(ids, reload))
            with self._lock:
                for image_id in ids:
                    self._pins[image_id] = self._pins.get(image_id, 0) + 1
            try:
                yield
            finally:
                with self._lock:
                    for image_id in ids:
                        left = self._pins[image_id] - 1
                        if left:
                            self._pins[image_id] = left
                        else:
                            del self._pins[image_id]
                    self._evict()

    @contextlib.contextmanager
    def reloadable(self, image_ids: Iterable[str], reload: Reload) -> Iterator[None]:
        """While the block runs, `get` recomputes any of these images the store evicted from
        `reload(image_id)`, its source (e.g. its archived original; `UnknownImageError` when the
        caller cannot say yet, and the next newest registration is asked). The recomputed image
        must hash to the same id, else `ImageReloadError`. Nothing is loaded up front: an image a
        request sends by id alone never needs its pixels in memory.
        """
        ids = list(dict.fromkeys(image_ids))
        with self._lock:
            for image_id in ids:
                self._reloads.setdefault(image_id, []).append(reload)
        try:
            yield
        finally:
            with self._lock:
                for image_id in ids:
                    reloads = self._reloads[image_id]
                    reloads.remove(reload)
                    if not reloads:
                        del self._reloads[image_id]

    def _insert(self, features: ImageFeatures) -> None:  # caller holds the lock
        if features.nbytes > self.max_bytes and features.id not in self._pins:
            self._oversized += 1
            return
        self._items[features.id] = features
        self._bytes += features.nbytes
        self._evict()

    def _evict(self) -> None:  # caller holds the lock; oldest unpinned first
        if self._bytes <= self.max_bytes:
            return
        for image_id in [k for k in self._items if k not in self._pins]:
            if self._bytes <= self.max_bytes:
                break
            evicted = self._items.pop(image_id)
            self._bytes -= evicted.nbytes + len(self._encoded.pop(image_id, b""))
            self._evictions += 1
