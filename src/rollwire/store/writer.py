"""`RunWriter`: appends finished rollouts to a run directory. A rollout is committed by its row,
written and fsynced after its blobs and its shard record are on disk; a failed write leaves the
directory as it was. One writer per directory, or several named workers with their own files."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from rollwire.errors import RollwireError, StoreError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.messages import ImageSource
from rollwire.rollout.types import Trajectory
from rollwire.store.archive import BlobWriter
from rollwire.store.blobs import read_original
from rollwire.store.files import open_regular, os_error, real_dir, remove_leftover_temps, write_all
from rollwire.store.manifest import settle_manifest
from rollwire.store.rows import ROWS, WORKER, done_ids, honest_json, trajectory_row
from rollwire.store.shards import ShardAppender
from rollwire.transport.packing import pack


class RunWriter:
    """Appends finished rollouts to a run directory; one writer per directory at a time.

    Every file it writes is a regular file inside the run directory: a symlink planted at
    `rollouts.jsonl`, `shards/`, `blobs/` or any blob is refused (`StoreError`), so nothing is
    written elsewhere. OS failures (read-only directory, full disk) are `StoreError`s; a failed
    write leaves the directory as it was (the row file is cut back, the torn shard abandoned).

    `manifest` (see `rollwire.rollout.runner.run_manifest`) is written to `run.json` on the first
    run; a later run with other `settings` is refused with `ManifestMismatchError`.
    """

    def __init__(self, run_dir: str | Path, features: FeatureStore, *, shard_bytes: int = 256 << 20,
                 manifest: Mapping[str, Any] | None = None, worker: str | None = None) -> None:
        if worker is not None and not (isinstance(worker, str) and WORKER.fullmatch(worker)):
            raise StoreError(f"worker name {str(worker)[:40]!r} must be 1-32 letters, digits or _")
        self.root = Path(run_dir)
        self.features = features
        self.shard_bytes = shard_bytes
        self.worker = worker
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"create the run directory {self.root}") from None
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not a directory")
        real_dir(self.root / "shards")
        self._rows_name = ROWS if worker is None else f"rollouts-{worker}.jsonl"
        self._lock_fd = self._own_lock_fd = -1
        try:
            alone = self._take_locks()
            self.manifest = settle_manifest(self.root, manifest)
            self.done_ids, self._committed = done_ids(self.root, self._rows_name, repair_all=alone)
            if alone:
                remove_leftover_temps(self.root)
                if worker is not None:  # let the other workers in now that the directory is repaired
                    fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            self._rows_fd = open_regular(self.root / self._rows_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                         "write")
        except BaseException:
            self._release_locks()
            raise
        self._lock = threading.Lock()
        self._blobs = BlobWriter(self.root, features)
        # PIL imports its ~40 plugins on the first TIFF save or format check (0.1-0.6 s holding the GIL
        # and the import lock): here, once, not in a worker thread while rollouts run.
        Image.init()
        self._shards = ShardAppender(self.root / "shards", "shard-" if worker is None else f"shard-{worker}-",
                                     shard_bytes)

    def _take_locks(self) -> bool:
        """Lock the run (and this worker's files); True when no other writer is in the directory.

        A single writer holds `.lock` exclusively. A worker holds `.lock-<worker>` exclusively and
        `.lock` shared, exclusively only while it is alone (then it repairs every row file and
        removes the temporary files of killed writers: nobody else can be writing them)."""
        self._lock_fd = open_regular(self.root / ".lock", os.O_RDWR | os.O_CREAT, "lock")
        if self.worker is not None:
            self._own_lock_fd = open_regular(self.root / f".lock-{self.worker}", os.O_RDWR | os.O_CREAT, "lock")
            try:
                fcntl.flock(self._own_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StoreError(f"{self.root} is being written by another writer named {self.worker!r}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if self.worker is None:
                raise StoreError(f"{self.root} is being written by another process") from None
        deadline = time.monotonic() + 30.0  # another worker may hold it exclusively for a moment
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False
            except OSError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.root} is being written by a single (non-worker) writer") from None
                time.sleep(0.05)

    def _release_locks(self) -> None:
        for fd in (self._own_lock_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._own_lock_fd = -1

    def write(
        self,
        trajectory: Trajectory,
        originals: Mapping[str, Any] | None = None,
        features: Mapping[str, ImageFeatures] | None = None,
    ) -> None:
        """Blobs, then the shard record, then the row: the row commits the rollout.

        Images archived while the rollout ran (`archive_image`) are on disk already; others are
        written from `originals` and from `features` or the feature store (recomputed from the
        original when the store evicted them). A rollout already committed without error is
        skipped; a failed one is written again and its newer row supersedes the old one.
        """
        with self._lock:
            if self._rows_fd < 0:
                raise StoreError(f"{self.root} is closed")
            if trajectory.id in self.done_ids:
                return
            row = trajectory_row(trajectory)
            honest_json(row)  # a row that cannot be written is refused before anything is
            for image_id in trajectory.image_ids:
                self._blobs.settle(image_id)  # blobs staged while it ran: durable before its row
                self._blobs.write_blobs(image_id, (originals or {}).get(image_id), (features or {}).get(image_id))
            try:
                record = pack([trajectory], self.features, include_pixels=False)
            except StoreError:
                raise
            except RollwireError as exc:
                raise StoreError(f"rollout {trajectory.id} cannot be packed: {exc}") from None
            shard, offset = self._shards.append(record)
            row.update({"shard": shard, "offset": offset, "length": len(record)})
            line = (honest_json(row) + "\n").encode("utf-8")
            self._commit(line)
            if trajectory.error is None:
                self.done_ids.add(trajectory.id)

    def archive_image(self, image_id: str, image: ImageSource, features: ImageFeatures) -> str:
        """Write an image's original and features (a rollout saw it first; see
        `rollwire.rollout.ImageArchive`), unless they are on disk; the path of the original.
        The bytes are written now and made durable in the background: they are in place at that
        path before any rollout using them is committed, or after `flush()`; `restore_image` reads
        them at once. Safe to call from many threads while rollouts run: blobs are written atomically."""
        if self._rows_fd < 0:
            raise StoreError(f"{self.root} is closed")
        if features.id != image_id:
            raise StoreError(f"features of image {features.id[:12]} handed in to archive {image_id[:12]}")
        return str(self._blobs.write_blobs(image_id, image, features, stage=True))

    def restore_image(self, image_id: str) -> Image.Image:
        """An archived original, decoded (to recompute the features of an evicted image; any format
        this or an older writer archived)."""
        self._blobs.settle(image_id)
        return read_original(self.root, image_id)

    def flush(self) -> None:
        """Every image archived so far durable and in place (a staged write that failed: `StoreError`)."""
        self._blobs.flush()

    def _commit(self, line: bytes) -> None:
        """Append one row; on failure cut the file back so no partial row is left behind."""
        try:
            write_all(self._rows_fd, line)
            os.fsync(self._rows_fd)
        except OSError as exc:
            try:
                os.ftruncate(self._rows_fd, self._committed)
            except OSError:
                os.close(self._rows_fd)
                self._rows_fd = -1  # the file may end in a partial row: stop; reopening repairs it
            raise os_error(exc, f"write {self.root / self._rows_name}") from None
        self._committed += len(line)

    def close(self) -> None:
        with self._lock:
            self._blobs.close()
            self._shards.close()
            if self._rows_fd >= 0:
                os.close(self._rows_fd)
                self._rows_fd = -1
            self._release_locks()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
