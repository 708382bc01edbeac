"""`RunReader`: a run directory read back (rows, trajectories with their features, images), every
row, frame and blob checked; anything corrupt or hostile is a `StoreError`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from rollwire.errors import StoreError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.rollout.types import Trajectory
from rollwire.store.blobs import blob_dir, decode_features, find_original, read_original
from rollwire.store.files import read_file
from rollwire.store.manifest import MANIFEST, load_manifest
from rollwire.store.rows import ROWS, read_rows, row_files
from rollwire.store.shards import read_record
from rollwire.transport.packing import unpack


class RunReader:
    """Reads a run directory back: rows, trajectories (with their features), images.

    Anything hostile in the directory (a row that is not an object, an offset past the shard, a
    shard path leaving `shards/`, a symlink, bytes that are not UTF-8) is a `StoreError`.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        if not row_files(self.root):
            raise StoreError(f"{self.root} has no {ROWS}")

    def manifest(self) -> dict[str, Any] | None:
        """The run's `run.json` (settings and about), or None for a run written without one."""
        path = self.root / MANIFEST
        if not os.path.lexists(path):
            return None
        return load_manifest(path)

    def rows(self, *, all_rows: bool = False) -> Iterator[dict[str, Any]]:
        """The newest row of each rollout over every row file (the single writer's, then each
        worker's), in that order (a resume's retry supersedes the failed row); `all_rows=True`
        yields every row, each with `"superseded": bool`."""
        return read_rows(self.root, all_rows=all_rows)

    def trajectory(self, row: Mapping[str, Any]) -> Trajectory:
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), str):
            raise StoreError(f"a rollout row must be a mapping with a string id, got {type(row).__name__}")
        rid = row["id"]
        record = read_record(self.root, row)
        try:
            batch = unpack(record)
        except Exception as exc:  # typed or not (deep nesting, ...), a bad record is a StoreError
            raise StoreError(f"{row['shard']} at {row['offset']}: {type(exc).__name__}: {exc}"[:300]) from None
        if len(batch.trajectories) != 1 or batch.trajectories[0].id != rid:
            raise StoreError(f"{row['shard']} at {row['offset']} holds another rollout than {rid}")
        return batch.trajectories[0]

    def trajectories(self) -> Iterator[Trajectory]:
        for row in self.rows():
            yield self.trajectory(row)

    def features(self, image_id: str) -> ImageFeatures:
        path = blob_dir(self.root, image_id) / f"{image_id}.features"
        if not os.path.lexists(path):
            raise StoreError(f"features blob of image {image_id} is missing")
        return decode_features(read_file(path), image_id)

    def load_features(self, store: FeatureStore, trajectory: Trajectory) -> None:
        """Put the trajectory's image features into `store` (for building training samples)."""
        for image_id in trajectory.image_ids:
            if image_id not in store:
                store.put(self.features(image_id))

    def image(self, image_id: str) -> Image.Image:
        """The archived original, decoded (its file as given: JPEG, PNG, ...; TIFF or PNG for a PIL image)."""
        return read_original(self.root, image_id)

    def original_path(self, image_id: str) -> Path:
        """Where the archived original is (its extension names its format), to copy or serve it as it is."""
        path = find_original(blob_dir(self.root, image_id), image_id)
        if path is None:
            raise StoreError(f"original image {image_id} is not archived")
        return path
