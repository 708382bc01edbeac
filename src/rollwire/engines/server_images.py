"""`rollwire serve`'s images: the features a client sent, kept by its `mm_hash` so later requests go by id.

Two ways in, as vLLM has them: `features` (the client's `mm_hash`, placeholder range and msgpack
`kwargs_data`, or a null item meaning "use your copy") and `content_parts` (data: URLs processed
here, the prompt's single pad tokens expanded to each image's run). A null item whose hash is
not held answers vLLM's opaque 500 (content_parts: its 400), as does a known hash re-sent with
other pixels. Stricter than vLLM: pixels must be uint8 patch rows of the model's row size. The
cache lives in memory: `reset()` (a stop) and `clear()` (a pause) empty it, as vLLM's does.
Thread-safe: every connection thread of the server calls in.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from rollwire.engines.content_parts import expand
from rollwire.engines.server_requests import bad_request, internal_error
from rollwire.engines.vllm_wire import ContentPart, Features
from rollwire.engines.wire import WireError, decode_image_kwargs
from rollwire.errors import FeatureError, ImageError, UnknownImageError
from rollwire.features import FeatureStore, ImageFeatures, ImageProcessor
from rollwire.render import ImageRef, ModelDir, Renderer, create_renderer

__all__ = ["ServedImages"]


class ServedImages:
    """The image cache of a server for `model` (no store for a text model: `vision` None), at most
    `max_bytes` of features, with the renderer that shares it and counters of what came in."""

    def __init__(self, model: ModelDir, vision: ImageProcessor | None, max_bytes: int) -> None:
        self._model, self._vision, self._max_bytes = model, vision, max_bytes
        self._lock = threading.Lock()  # the store, hash equality checks, the renderer, counters
        self.store = self._new_store()
        self._renderer: Renderer | None = None
        self.received = self.hits = self.misses = 0

    def _new_store(self) -> FeatureStore | None:
        return None if self._vision is None else FeatureStore(self._vision, max_bytes=self._max_bytes)

    def reset(self) -> None:
        """A new, empty store and no renderer: what a restarted server starts with."""
        with self._lock:
            self._renderer, self.store = None, self._new_store()

    def clear(self) -> None:
        """Drop every cached image (later null kwargs_data items miss)."""
        with self._lock:
            if self.store is not None:
                self.store.clear()

    def counts(self) -> tuple[int, int, int]:
        """(images received with pixels, null items served by id, null items missed)."""
        with self._lock:
            return self.received, self.hits, self.misses

    def renderer(self) -> tuple[Renderer, FeatureStore | None]:
        """The renderer on this cache (made on first use) and the store it uses."""
        with self._lock:
            if self._renderer is None:
                self._renderer = create_renderer(self._model, feature_store=self.store)
            return self._renderer, self.store

    def lost_any(self, refs: Sequence[ImageRef]) -> bool:
        """Whether the cache no longer holds one of `refs` (emptied while a request was in flight)."""
        store = self.store
        return store is not None and any(ref.id not in store for ref in refs)

    def refs(self, features: Features | None) -> tuple[ImageRef, ...]:
        """The request's `features` as `ImageRef`s, each image decoded and cached or found by id."""
        if features is None:
            return ()
        kwargs_data = features.kwargs_data or {}
        for name in (*features.mm_hashes, *features.mm_placeholders, *kwargs_data):
            if name != "image":
                raise bad_request(f"features: modality {name!r} is not supported (images only)")
        hashes = features.mm_hashes.get("image", [])
        ranges = features.mm_placeholders.get("image", [])
        items = kwargs_data.get("image", [None] * len(hashes))
        if not len(hashes) == len(ranges) == len(items):
            raise bad_request(f"features: {len(hashes)} mm_hashes, {len(ranges)} mm_placeholders and "
                              f"{len(items)} kwargs_data items for images; they must be equal")
        if hashes and self.store is None:
            raise bad_request(f"{self._model.path.name} is a text-only model; the request has images")
        refs = []
        for k, (mm_hash, rng, item) in enumerate(zip(hashes, ranges, items, strict=True)):
            if not mm_hash:
                raise bad_request(f"features: mm_hashes[{k}] is empty")
            feats = self._image(k, mm_hash, item)
            refs.append(ImageRef(mm_hash, rng.offset, rng.length, feats.grid_thw))
        return tuple(refs)

    def _image(self, k: int, mm_hash: str, item: str | None) -> ImageFeatures:
        """The features of image `k`: decoded from `item` and cached, or (null item) from the cache."""
        if item is None:
            with self._lock:
                store = self.store
                assert store is not None
                try:
                    found = store.get(mm_hash)
                except UnknownImageError:
                    self.misses += 1
                else:
                    self.hits += 1
                    return found
            raise internal_error(f"image {k}: null kwargs_data but hash {mm_hash!r} is not cached")
        assert self.store is not None
        try:
            pixels, grid, dtype = decode_image_kwargs(item, self.store.config)
        except WireError as exc:
            raise bad_request(f"image {k}: {exc}") from None
        if dtype != "uint8":
            raise bad_request(f"image {k}: pixel_values dtype {dtype!r} is not accepted: this server expects "
                              "uint8 patch rows (resized, not normalised), as vLLM 0.32 does by default")
        with self._lock:
            store = self.store
            assert store is not None
            if pixels.shape[1] != store.config.row_size:
                raise bad_request(f"image {k}: pixel rows have {pixels.shape[1]} values; the model takes "
                                  f"{store.config.row_size}")
            try:
                feats = ImageFeatures(id=mm_hash, pixel_values=pixels, grid_thw=grid,
                                      merge_size=store.config.merge_size)
            except FeatureError as exc:
                raise bad_request(f"image {k}: {exc}") from None
            if feats.nbytes > store.max_bytes:
                raise bad_request(f"image {k}: {feats.nbytes} bytes of features exceed the server's image "
                                  f"cache ({store.max_bytes} bytes)")
            self.received += 1
            if mm_hash in store and store.get(mm_hash) != feats:
                raise internal_error(f"image {k}: the client-provided multimodal UUID {mm_hash!r} may have "
                                     "been reused for different content")
            store.put(feats)
        return feats

    def expand(self, token_ids: list[int], parts: list[ContentPart]) -> tuple[list[int], tuple[ImageRef, ...]]:
        """content_parts: each image processed here (or taken from the cache by uuid), and each of
        the prompt's single pad tokens expanded to the image's run, as vLLM does."""
        if self.store is None:
            raise bad_request(f"{self._model.path.name} is a text-only model; the request has images")
        renderer, store = self.renderer()
        assert store is not None
        pad_id = renderer.image_pad_id
        feats: list[ImageFeatures] = []
        for k, part in enumerate(parts):
            if part.type != "image_url":
                raise bad_request(f"content_parts[{k}]: type {part.type!r} is not supported (image_url only)")
            if part.url is None:
                with self._lock:
                    found = store.get(part.uuid) if part.uuid is not None and part.uuid in store else None
                    self.hits, self.misses = self.hits + (found is not None), self.misses + (found is None)
                if found is None:
                    raise bad_request(f"Cache miss for image at index {k} but data is not provided.")
                feats.append(found)
                continue
            if part.url[:5].lower() != "data:":
                raise bad_request(f"content_parts[{k}]: images must be data: URLs (this server fetches no URLs)")
            try:
                got = store.get_or_process(part.url)
            except (ImageError, FeatureError) as exc:
                raise bad_request(f"content_parts[{k}]: {exc}") from None
            if part.uuid is not None:
                got = ImageFeatures(part.uuid, got.pixel_values, got.grid_thw, got.merge_size)
                with self._lock:
                    if part.uuid in store and store.get(part.uuid) != got:
                        raise internal_error(f"image {k}: the client-provided multimodal UUID {part.uuid!r} may "
                                             "have been reused for different content")
                    store.put(got)
                    self.received += 1
            feats.append(got)
        try:
            return expand(token_ids, feats, pad_id=pad_id)  # type: ignore[arg-type]
        except WireError as exc:
            raise bad_request(str(exc)) from None
