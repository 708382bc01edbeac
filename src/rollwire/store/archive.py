"""Writing a run's image blobs: what is missing of an image's original and features, atomically.
A PIL image is archived as a lossless copy, an encoded one as its file's bytes (checked to still
be the image that was rendered); features come from the caller, the feature store, or (evicted)
are recomputed from the original."""

from __future__ import annotations

import dataclasses
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
from rollwire.store.files import atomic_write, lexists, real_dir


class BlobWriter:
    """Writes image blobs under `root/blobs/`; safe to call from many threads (every blob is
    written atomically, so two writers of one image both leave the same whole file)."""

    def __init__(self, root: Path, features: FeatureStore) -> None:
        self.root = root
        self.features = features

    def write_blobs(self, image_id: str, original: Any, features: ImageFeatures | None) -> Path | None:
        """Write what is missing of an image's blobs; the original's path (None: not archived)."""
        folder = real_dir(real_dir(self.root / "blobs") / blob_dir(self.root, image_id).name)
        feats = folder / f"{image_id}.features"
        archived = find_original(folder, image_id)
        blob = None  # the original's (extension, bytes), made before anything is written
        if archived is None and original is not None:
            blob = (archive_image(original) if isinstance(original, Image.Image)
                    else self._encoded_original(image_id, original))
        if not lexists(feats):
            atomic_write(feats, encode_features(features or self._features_of(image_id, original)))
        if blob is None:
            return archived
        archived = folder / f"{image_id}.{blob[0]}"
        atomic_write(archived, blob[1])
        return archived

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
