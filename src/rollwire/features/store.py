"""The content-addressed feature store, the only place pixels live.

Everything else refers to an image by its id: a hash of its RGB pixels, its size and the
processor's fingerprint (the settings that shape its features). The store works with any
`ImageProcessor`; it is bounded by bytes and safe to share between threads.

An in-flight request pins the images it must send (they are not evicted while it runs) and makes
the others reloadable: one the store evicted is recomputed on `get` from the source the request
names (its archived original), so callers never keep features of their own to put back. A
`PinLease` pins them from the moment the store hands them to the renderer: while the lease is
`collecting` in a thread, every image the store returns there is pinned to it, atomically with
the lookup, until the lease is released (when the request carrying them has returned).

With `keep_encoded`, an image that came as encoded bytes keeps them beside its features (counted in
the byte bound, evicted with them): `encoded(id)` is the original a content_parts request can send.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from rollwire.errors import FeatureError, ImageReloadError, UnknownImageError
from rollwire.features.image_features import ImageFeatures, compute_features
from rollwire.features.processor import ImageProcessor
from rollwire.images import DEFAULT_LIMITS, ImageLimits, image_hash, load_encoded, load_image, to_rgb
from rollwire.messages import ImageSource

__all__ = ["FeatureStore", "ImageFeatures", "PinLease", "StoreStats", "compute_features"]


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
    pinned: int = 0  # stored images no eviction may take (an in-flight request needs them)
    pinned_bytes: int = 0  # their bytes: the store is over max_bytes by at most this
    peak_bytes: int = 0  # the most bytes it held at once (max_bytes + what was pinned then, at most)
    leases: int = 0  # pin leases not yet released


class PinLease:
    """The pins one request holds on a store, taken as the renderer is handed each image.

    While `collecting()` runs in a thread, every image the store returns in that thread
    (`get_or_process`, `get`) is pinned to the lease under the store's lock, so no other thread
    can evict it between the render and the request. `pin` adds ids, `retain` drops the others
    (what a declined bridge pinned and the full render did not use), `release` drops them all.
    A released lease pins nothing more (a render still running for a cancelled rollout leaks none).
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._ids: set[str] = set()  # guarded by the store's lock
        self.released = False

    @property
    def ids(self) -> frozenset[str]:
        with self.store._lock:
            return frozenset(self._ids)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[PinLease]:
        """For the block, in this thread only: each image the store hands out is pinned to the lease."""
        token = _COLLECTING.set(self)
        try:
            yield self
        finally:
            _COLLECTING.reset(token)

    def pin(self, image_ids: Iterable[str]) -> None:
        with self.store._lock:
            for image_id in image_ids:
                self.store._hold(self, image_id)

    def retain(self, image_ids: Iterable[str]) -> None:
        """Keep only these pins (release the rest)."""
        keep = set(image_ids)
        with self.store._lock:
            self.store._unhold(self, self._ids - keep)

    def release(self) -> None:
        """Drop every pin (idempotent); the byte bound applies to them again."""
        with self.store._lock:
            self.store._unhold(self, set(self._ids))
            if not self.released:
                self.released = True
                self.store._leases -= 1

    def __enter__(self) -> PinLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# The lease collecting in the current thread (set only inside `PinLease.collecting`).
_COLLECTING: contextvars.ContextVar[PinLease | None] = contextvars.ContextVar("rollwire_pin_lease", default=None)


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
        self._peak = self._leases = 0
        self._pins: dict[str, int] = {}  # image id -> in-flight requests that need it
        self._reloads: dict[str, list[Reload]] = {}  # image id -> where pinners can reload it from
        self.keep_encoded = keep_encoded  # keep each image's encoded bytes beside its features
        self._encoded: dict[str, bytes] = {}  # image id -> the bytes it was decoded from (stored items only)

    def get_or_process(self, source: ImageSource, *, limits: ImageLimits | None = None) -> ImageFeatures:
        image, data = load_encoded(source, limits or self.limits)
        rgb = to_rgb(image)
        image_id = image_hash(rgb, self._fingerprint)
        data = data if self.keep_encoded else None
        lease = self._lease()
        while True:
            with self._lock:
                found = self._items.get(image_id)
                if found is not None:
                    self._items.move_to_end(image_id)
                    self._hits += 1
                    if lease is not None:
                        self._hold(lease, image_id)
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
                    if lease is not None:  # evicted since the owner stored it: pinned, it goes back
                        self._hold(lease, image_id)
                        if image_id not in self._items:
                            self._insert(pending.result)
                return pending.result
            # the owner failed: try again (and fail the same way, with our own exception)
        try:
            rows, grid = self.config.process(rgb)
            features = ImageFeatures(image_id, rows, grid, self.config.merge_size)
            with self._lock:
                if lease is not None:
                    self._hold(lease, image_id)
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
        lease = self._lease()
        with self._lock:
            found = self._items.get(image_id)
            if found is not None:
                self._items.move_to_end(image_id)
                if lease is not None:
                    self._hold(lease, image_id)
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
            pinned = [f.nbytes for k, f in self._items.items() if k in self._pins]
            return StoreStats(items=len(self._items), bytes=self._bytes, max_bytes=self.max_bytes,
                              hits=self._hits, misses=self._misses, evictions=self._evictions,
                              oversized=self._oversized, reloaded=self._reloaded, pinned=len(pinned),
                              pinned_bytes=sum(pinned), peak_bytes=self._peak, leases=self._leases)

    def lease(self) -> PinLease:
        """A new, empty pin lease on this store (see `PinLease`); release it when its request returns."""
        with self._lock:
            self._leases += 1
        return PinLease(self)

    def _lease(self) -> PinLease | None:
        """The lease collecting in this thread, if it is one of this store's."""
        lease = _COLLECTING.get()
        return lease if lease is not None and lease.store is self else None

    def _hold(self, lease: PinLease, image_id: str) -> None:  # caller holds the lock
        if not lease.released and image_id not in lease._ids:
            lease._ids.add(image_id)
            self._pins[image_id] = self._pins.get(image_id, 0) + 1

    def _unhold(self, lease: PinLease, image_ids: set[str]) -> None:  # caller holds the lock
        for image_id in image_ids & lease._ids:
            lease._ids.discard(image_id)
            self._unpin(image_id)
        self._evict()

    def _unpin(self, image_id: str) -> None:  # caller holds the lock
        left = self._pins[image_id] - 1
        if left:
            self._pins[image_id] = left
        else:
            del self._pins[image_id]

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
                        self._unpin(image_id)
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
        self._peak = max(self._peak, self._bytes)
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
