"""Rollouts on disk: JSONL rows, hash-addressed image blobs, msgpack trajectory shards.

```
RUN_DIR/
  rollouts.jsonl             one honest-JSON row per finished rollout (the commit record)
  blobs/ab/<id>.png          each unique image once: the original, for viewing
  blobs/ab/<id>.features     ...and its uint8 features, for training (codec msgpack + CRC)
  shards/shard-00000.bin     length + CRC framed records, one packed trajectory each
```

A rollout is committed by its JSONL row, written (and flushed) only after its blobs and its
shard record are on disk, so a crash leaves at most uncommitted leftovers: a torn shard tail,
a partial last line, orphan blobs. Reopening truncates the partial line; rerunning skips the
ids already committed. The reader checks every frame and blob and refuses corruption.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rollwire.errors import RollwireError, StoreError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.images import load_image
from rollwire.rollout.types import Trajectory
from rollwire.transport.codec import decode, encode
from rollwire.transport.packing import pack, unpack

ROWS = "rollouts.jsonl"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32
_MAGIC = b"RWT1"
_BLOB_MAGIC = b"RWF1"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def honest_json(row: Mapping[str, Any]) -> str:
    """One JSON line; a value JSON cannot hold honestly (NaN, inf, bytes, objects) names its column."""
    for key, value in row.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"column {key!r} is not JSON: {exc}") from None
    return json.dumps(row, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _blob_dir(root: Path, image_id: str) -> Path:
    if not image_id or not all(c in "0123456789abcdef" for c in image_id):
        raise StoreError(f"image id {image_id!r} is not a hex content hash")
    return root / "blobs" / image_id[:2]


def encode_features(features: ImageFeatures) -> bytes:
    payload = encode({"id": features.id, "grid_thw": list(features.grid_thw), "merge_size": features.merge_size,
                      "pixel_values": np.ascontiguousarray(features.pixel_values)})
    return _BLOB_MAGIC + struct.pack("<I", zlib.crc32(payload)) + payload


def decode_features(data: bytes, image_id: str) -> ImageFeatures:
    if len(data) < 8 or data[:4] != _BLOB_MAGIC:
        raise StoreError(f"features blob {image_id} is not a rollwire features blob")
    (crc,) = struct.unpack("<I", data[4:8])
    payload = memoryview(data)[8:]
    if zlib.crc32(payload) != crc:
        raise StoreError(f"features blob {image_id} is corrupted (CRC mismatch)")
    try:
        obj = decode(payload)
        if not isinstance(obj, dict) or obj.get("id") != image_id:
            raise StoreError(f"features blob {image_id} holds another image")
        pixels = obj["pixel_values"]
        t, h, w = (int(v) for v in obj["grid_thw"])
        merge = int(obj["merge_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"features blob {image_id} is malformed: {exc}") from None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise StoreError(f"features blob {image_id}: pixel_values must be 2-D uint8")
    if t * h * w != pixels.shape[0]:
        raise StoreError(f"features blob {image_id}: grid {[t, h, w]} does not match {pixels.shape[0]} rows")
    return ImageFeatures(id=image_id, pixel_values=pixels, grid_thw=(t, h, w), merge_size=merge)


class RunWriter:
    """Appends finished rollouts to a run directory; one writer per directory at a time."""

    def __init__(self, run_dir: str | Path, features: FeatureStore, *, shard_bytes: int = 256 << 20) -> None:
        self.root = Path(run_dir)
        self.features = features
        self.shard_bytes = shard_bytes
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise StoreError(f"{self.root} is being written by another process") from None
        self._lock = threading.Lock()
        self.done_ids = _repair_rows(self.root / ROWS)
        indices = [int(p.stem.removeprefix("shard-")) for p in (self.root / "shards").glob("shard-*.bin")
                   if p.stem.removeprefix("shard-").isdigit()]
        self._shard_index = max(indices, default=-1) + 1  # a fresh shard: never append after a torn tail
        self._shard: Any = None
        self._rows = open(self.root / ROWS, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(
        self,
        trajectory: Trajectory,
        originals: Mapping[str, Any] | None = None,
        features: Mapping[str, ImageFeatures] | None = None,
    ) -> None:
        """Blobs, then the shard record, then the row: the row commits the rollout.

        `features` (the rollout's own, see `RolloutResult.features`) are used before the
        feature store, which may have evicted them.
        """
        with self._lock:
            if trajectory.id in self.done_ids:
                return
            for image_id in trajectory.image_ids:
                feats = (features or {}).get(image_id)
                if feats is not None and image_id not in self.features:
                    self.features.put(feats)
                self._write_blobs(image_id, (originals or {}).get(image_id), feats)
            record = pack([trajectory], self.features, include_pixels=False)
            shard, offset = self._append(record)
            row = trajectory_row(trajectory)
            row.update({"shard": shard, "offset": offset, "length": len(record)})
            self._rows.write(honest_json(row) + "\n")
            self._rows.flush()
            os.fsync(self._rows.fileno())
            self.done_ids.add(trajectory.id)

    def _write_blobs(self, image_id: str, original: Any, features: ImageFeatures | None) -> None:
        folder = _blob_dir(self.root, image_id)
        feats = folder / f"{image_id}.features"
        if not feats.exists():
            _atomic_write(feats, encode_features(features or self.features.get(image_id)))
        png = folder / f"{image_id}.png"
        if original is not None and not png.exists():
            image = original if isinstance(original, Image.Image) else load_image(original)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            _atomic_write(png, buf.getvalue())

    def _append(self, record: bytes) -> tuple[str, int]:
        if self._shard is None or self._shard.tell() >= self.shard_bytes:
            if self._shard is not None:
                self._shard.close()
            path = self.root / "shards" / f"shard-{self._shard_index:05d}.bin"
            self._shard_index += 1
            self._shard = open(path, "ab")  # noqa: SIM115 - closed in close()
        offset = self._shard.tell()
        self._shard.write(_FRAME.pack(_MAGIC, len(record), zlib.crc32(record)) + record)
        self._shard.flush()
        os.fsync(self._shard.fileno())
        return Path(self._shard.name).name, offset

    def close(self) -> None:
        with self._lock:
            if self._shard is not None:
                self._shard.close()
                self._shard = None
            self._rows.close()
            self._lock_file.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trajectory_row(t: Trajectory) -> dict[str, Any]:
    prompt_tokens = sum(len(s.prompt_ids) for s in t.steps)
    completion_tokens = sum(len(s.completion_ids) for s in t.steps)
    return {
        "id": t.id, "env": t.env, "prompt_index": t.prompt_index, "sample_index": t.sample_index, "seed": t.seed,
        "reward": t.reward, "rewards": t.rewards, "finish": t.finish,
        "error": None if t.error is None else {"kind": t.error.kind, "message": t.error.message, "step": t.error.step},
        "turns": len(t.steps), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "image_ids": t.image_ids, "messages": t.messages, "tools": t.tools, "metrics": t.metrics,
        "env_info": t.env_info,
    }


def _repair_rows(path: Path) -> set[str]:
    """Committed ids; a partial last line (a crash mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    ids = set()
    for n, line in enumerate(data[:keep].splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoreError(f"{path}:{n} is not a rollout row") from None
    return ids


class RunReader:
    """Reads a run directory back: rows, trajectories (with their features), images."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        if not (self.root / ROWS).is_file():
            raise StoreError(f"{self.root} has no {ROWS}")

    def rows(self) -> Iterator[dict[str, Any]]:
        with open(self.root / ROWS, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    raise StoreError(f"{ROWS}:{n} is truncated")
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StoreError(f"{ROWS}:{n} is not JSON: {exc}") from None

    def trajectory(self, row: Mapping[str, Any]) -> Trajectory:
        try:
            path, offset, want = self.root / "shards" / str(row["shard"]), int(row["offset"]), int(row["length"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"row {row.get('id')!r} does not say where its trajectory is") from None
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                head = f.read(_FRAME.size)
                if len(head) != _FRAME.size:
                    raise StoreError(f"{path.name} is truncated at {offset}")
                magic, length, crc = _FRAME.unpack(head)
                record = f.read(length)
        except FileNotFoundError:
            raise StoreError(f"shard {path.name} of rollout {row['id']} is missing") from None
        if magic != _MAGIC or length != want or len(record) != length:
            raise StoreError(f"{path.name} at {offset}: bad or truncated frame for rollout {row['id']}")
        if zlib.crc32(record) != crc:
            raise StoreError(f"{path.name} at {offset}: corrupted record (CRC mismatch) for {row['id']}")
        try:
            batch = unpack(record)
        except RollwireError as exc:
            raise StoreError(f"{path.name} at {offset}: {exc}") from None
        if len(batch.trajectories) != 1 or batch.trajectories[0].id != row["id"]:
            raise StoreError(f"{path.name} at {offset} holds another rollout than {row['id']}")
        return batch.trajectories[0]

    def trajectories(self) -> Iterator[Trajectory]:
        for row in self.rows():
            yield self.trajectory(row)

    def features(self, image_id: str) -> ImageFeatures:
        path = _blob_dir(self.root, image_id) / f"{image_id}.features"
        try:
            return decode_features(path.read_bytes(), image_id)
        except FileNotFoundError:
            raise StoreError(f"features blob of image {image_id} is missing") from None

    def load_features(self, store: FeatureStore, trajectory: Trajectory) -> None:
        """Put the trajectory's image features into `store` (for building training samples)."""
        for image_id in trajectory.image_ids:
            if image_id not in store:
                store.put(self.features(image_id))

    def image(self, image_id: str) -> Image.Image:
        path = _blob_dir(self.root, image_id) / f"{image_id}.png"
        try:
            return load_image(path)
        except RollwireError as exc:
            raise StoreError(f"original image {image_id}: {exc}") from None

