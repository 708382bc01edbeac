"""Writing a run's image blobs: what is missing of an image's original and features, atomically.
A PIL image is archived as a lossless copy, an encoded one as its file's bytes (checked to still
be the image that was rendered); features come from the caller, the feature store, or (evicted)
are recomputed from the original.

An image a rollout sees first is staged: its bytes are written at once, and flusher threads
make them durable (fsync) and rename them into place while the rollout goes on, instead of the
rollout's turn waiting for the disk. The rollout's row is written only after its staged blobs are
(`settle`), so the run's crash safety is unchanged: a committed row's blobs are on disk, and a
crash before that leaves only temporary files, which the next writer removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from rollwire.errors import RollwireError, StoreError, UnknownImageError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.images import read_source
from rollwire.messages import ImageSource
from rollwire.store.blobs import (
    ARCHIVE_LIMITS,
    archive_image,
    blob_dir,
    encode_features,
    encoded_extension,
    find_original,
)
from rollwire.store.files import StagedFile, lexists, real_dir

_STAGED_BYTES = 256 << 20  # staged bytes not yet durable past which a stager waits for the flushers
_FLUSHERS = 4  # fsyncs in flight at once (the file system commits concurrent ones together)


class BlobWriter:
    """Writes image blobs under `root/blobs/`; safe to call from many threads (every blob is
    written atomically, so two writers of one image both leave the same whole file)."""

    def __init__(self, root: Path, features: FeatureStore) -> None:
        self.root = root
        self.features = features
        self._staged: dict[Path, StagedFile] = {}  # blob path -> its staged write (failed ones stay)
        self._staged_originals: dict[str, Path] = {}  # image id -> its staged original's path
        self._queue: queue.SimpleQueue[StagedFile | None] = queue.SimpleQueue()
        self._flushers: list[threading.Thread] = []
        self._pending_bytes = 0
        self._cond = threading.Condition()  # guards the maps, the flusher and `_pending_bytes`

    def write_blobs(self, image_id: str, original: Any, features: ImageFeatures | None, *,
                    stage: bool = False) -> Path | None:
        """Write what is missing of an image's blobs; the original's path (None: not archived).
        `stage=True`: durable later (by a flusher thread, or `settle`), not before this returns."""
        folder = real_dir(real_dir(self.root / "blobs") / blob_dir(self.root, image_id).name)
        feats = folder / f"{image_id}.features"
        archived = self._staged_original(image_id) or find_original(folder, image_id)
        blob = None  # the original's (extension, bytes), made before anything is written
        if archived is None and original is not None:
            blob = (archive_image(original) if isinstance(original, Image.Image)
                    else self._encoded_original(image_id, original))
        if not self._is_staged(feats) and not lexists(feats):
            features = features or self._features_of(image_id, original)
            repeated = getattr(self.features.config, "repeated_frames", None)  # Qwen-VL: one frame kept
            self._write(StagedFile(feats, encode_features(features, repeated)), stage)
        if blob is None:
            return archived
        archived = folder / f"{image_id}.{blob[0]}"
        self._write(StagedFile(archived, blob[1]), stage, image_id)
        return archived

    def settle(self, image_id: str) -> None:
        """Make the image's staged blobs durable and in place now (before a row that uses them is
        written); a staged write that failed is a StoreError here, for every rollout using it."""
        feats = blob_dir(self.root, image_id) / f"{image_id}.features"
        with self._cond:
            original = self._staged_originals.get(image_id)
            staged = [self._staged.get(feats), None if original is None else self._staged.get(original)]
        for file in filter(None, staged):
            file.sync()
            self._forget(file)

    def flush(self) -> None:
        """Make every staged blob durable and in place; the first failure is raised (after all are tried)."""
        with self._cond:
            staged = list(self._staged.values())
        errors = []
        for file in staged:
            try:
                file.sync()
                self._forget(file)
            except StoreError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the flushers once they have made every staged blob durable (one that fails stays an
        orphan never written: no committed row uses it, `settle` saw to that)."""
        with self._cond:
            flushers, self._flushers = self._flushers, []
            self._cond.notify_all()
        for _ in flushers:
            self._queue.put(None)
        for flusher in flushers:
            flusher.join()
        with contextlib.suppress(StoreError):
            self.flush()

    def _write(self, file: StagedFile, stage: bool, image_id: str | None = None) -> None:
        if not stage:
            file.sync()
            return
        with self._cond:
            old = self._staged.get(file.path)
            if old is not None and not old.failed:  # another thread staged it meanwhile: one is enough
                file.abandon()
                return
            self._staged[file.path] = file
            if image_id is not None:
                self._staged_originals[image_id] = file.path
            self._pending_bytes += file.nbytes
            if not self._flushers:
                self._flushers = [threading.Thread(target=self._flush_forever, name=f"rollwire-blob-flusher-{i}",
                                                   daemon=True) for i in range(_FLUSHERS)]
                for flusher in self._flushers:
                    flusher.start()
            self._queue.put(file)
            self._cond.wait_for(lambda: self._pending_bytes <= _STAGED_BYTES or not self._flushers)

    def _flush_forever(self) -> None:
        while (file := self._queue.get()) is not None:
            try:
                file.sync()
                self._forget(file)
            except StoreError:
                pass  # kept with its error: `settle` raises it for the rollouts that use this image
            finally:
                with self._cond:
                    self._pending_bytes -= file.nbytes
                    self._cond.notify_all()

    def _forget(self, file: StagedFile) -> None:
        with self._cond:
            if self._staged.get(file.path) is file:
                del self._staged[file.path]
                image_id = file.path.name.split(".")[0]
                if self._staged_originals.get(image_id) == file.path:
                    del self._staged_originals[image_id]

    def _is_staged(self, path: Path) -> bool:
        with self._cond:
            file = self._staged.get(path)
            return file is not None and not file.failed

    def _staged_original(self, image_id: str) -> Path | None:
        with self._cond:
            path = self._staged_originals.get(image_id)
            file = None if path is None else self._staged.get(path)
            return path if file is not None and not file.failed else None

    def _encoded_original(self, image_id: str, source: ImageSource) -> tuple[str, bytes]:
        """(extension of its real format, the bytes) of an image given encoded: the file as it is,
        not decoded and encoded again. A file or URL is read again, so it is checked to still hold
        the image that was rendered (bytes and data URLs cannot have changed)."""
        remote = isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))
        # The image passed the renderer's limits (and path roots) when first seen; a remote one is
        # fetched again within the feature store's limits.
        limits = (dataclasses.replace(self.features.limits, allow_remote=True, allowed_roots=None) if remote
                  else ARCHIVE_LIMITS)
        try:
            data = read_source(source, limits)
            ext = encoded_extension(data)
            if not (isinstance(source, bytes) or (isinstance(source, str) and source[:5].lower() == "data:")):
                got = self.features.image_id(data, limits=ARCHIVE_LIMITS)
                if got != image_id:
                    raise StoreError(f"image {image_id[:12]}: its source changed since it was rendered (it now "
                                     f"hashes to {got[:12]}); the run cannot archive what the model saw")
        except RollwireError as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"image {image_id[:12]}: its original cannot be read again to archive it: {exc}") from None
        return ext, data

    def _features_of(self, image_id: str, original: Any) -> ImageFeatures:
        """The store's features, or (it evicted them) the same features recomputed from the original."""
        try:
            return self.features.get(image_id)
        except UnknownImageError:
            if original is None:
                raise StoreError(f"image {image_id[:12]}: its features were evicted from the feature store and "
                                 "no original was handed in to recompute them") from None
        features = self.features.get_or_process(original, limits=ARCHIVE_LIMITS)
        if features.id != image_id:
            raise StoreError(f"image {image_id[:12]}: its original hashes to {features.id[:12]}")
        return features
