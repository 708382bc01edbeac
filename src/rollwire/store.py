"""Rollouts on disk: JSONL rows, hash-addressed image blobs, msgpack trajectory shards.

```
RUN_DIR/
  run.json                   the run's manifest: model fingerprint, sampling, environment, seed
  rollouts.jsonl             one honest-JSON row per finished rollout (the commit record)
  blobs/ab/<id>.jpg          each unique image once: the original as given, its encoded file as it
                               is (.jpg, .png, .webp, ...); a PIL image as uncompressed TIFF
                               (lossless, ~1 ms; a palette image as PNG); older runs hold .png
  blobs/ab/<id>.features     ...and its uint8 features, for training (codec msgpack + CRC)
  shards/shard-00000.bin     length + CRC framed records, one packed trajectory each
  rollouts-<w>.jsonl         ...the rows of writer `w` when several write at once (Ray workers),
  shards/shard-<w>-00000.bin    each with its own row and shard files; readers merge them
```

A rollout is committed by its JSONL row, written (and flushed) only after its blobs and its
shard record are on disk, so a crash leaves at most uncommitted leftovers: a torn shard tail,
a partial last line, orphan blobs. Reopening truncates the partial line; rerunning skips the
ids committed without error and runs failed ones again (the newer row supersedes the older;
readers return the newest). The reader checks every row, frame and blob and refuses anything
corrupt or hostile with a `StoreError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import os
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rollwire.errors import ManifestMismatchError, RollwireError, StoreError, UnknownImageError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.images import ImageLimits, load_image, read_source, to_rgb
from rollwire.messages import ImageSource
from rollwire.rollout.types import Trajectory
from rollwire.transport.codec import decode, encode_parts
from rollwire.transport.packing import pack, unpack

ROWS = "rollouts.jsonl"
MANIFEST = "run.json"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32
_MAGIC = b"RWT1"
_BLOB_MAGIC = b"RWF1"
_SHARD_NAME = re.compile(r"shard-(?:[A-Za-z0-9_]{1,32}-)?[0-9]{5,9}\.bin")
_WORKER = re.compile(r"[A-Za-z0-9_]{1,32}")
_WORKER_ROWS = re.compile(r"rollouts-([A-Za-z0-9_]{1,32})\.jsonl")
# PIL images are archived as uncompressed TIFF, which holds these modes exactly and costs a copy (PNG
# costs 0.1-0.9 s of zlib and filtering per 1024² image, the rollouts' CPU); palettes go as PNG.
_TIFF_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr", "LAB", "PA"})
_PNG_MODES = frozenset({"P"})
# An encoded original keeps its file's bytes, named by its real format (the formats rollwire decodes).
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff",
               "PPM": "ppm", "TGA": "tga", "ICO": "ico", "AVIF": "avif", "QOI": "qoi", "JPEG2000": "jp2"}
_ORIGINAL_EXTS = tuple(dict.fromkeys(("png", "tiff", *_EXTENSIONS.values())))
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_IOV_MAX = 512  # pieces a writev takes at once (Linux allows 1024)
# Archived originals passed the rollout's image limits when first seen; a lossless copy can be
# larger encoded, so only PIL's own bomb guard applies when one is read back.
_ARCHIVE_LIMITS = ImageLimits(max_encoded_bytes=2**40, max_pixels=2**40)


def _os_error(exc: OSError, what: str) -> StoreError:
    """An OS failure as a StoreError that says what could not be done and why, in words."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ELOOP: "it is a symlink (refused)"}.get(
        exc.errno or 0, exc.strerror or str(exc))
    return StoreError(f"cannot {what}: {why}")


def _real_dir(path: Path) -> Path:
    """`path` as a real directory (created if missing); a symlink or a file there is refused."""
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _os_error(exc, f"create {path}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} must be a directory inside the run directory, not a symlink or a file")
    return path


def _open_regular(path: Path, flags: int, what: str) -> int:
    """Open a file that is not a symlink and, if it exists, is a regular file (no FIFO can block)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _os_error(exc, f"{what} {path}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path} must be a regular file, not a symlink, folder or device")
    try:
        return os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as exc:
        raise _os_error(exc, f"{what} {path}") from None


Buffers = bytes | Sequence[bytes | memoryview]


def _write_all(fd: int, data: Buffers) -> None:
    """Write `data` (bytes, or pieces written in order with `os.writev`: the kernel copies them,
    without the GIL, so a large blob is never joined in memory first)."""
    if isinstance(data, bytes):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return
    pieces = [view for piece in data if (view := memoryview(piece).cast("B")).nbytes]
    while pieces:
        written = os.writev(fd, pieces[:_IOV_MAX])
        while written:
            if written >= pieces[0].nbytes:
                written -= pieces.pop(0).nbytes
            else:
                pieces[0], written = pieces[0][written:], 0


def _atomic_write(path: Path, data: Buffers) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = _open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "write")
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise _os_error(exc, f"write {path.parent.name}/{path.name}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_TEMP = re.compile(r"\.[^/]+\.\d+\.\d+\.tmp")  # what _atomic_write names its temporary files


def _remove_leftover_temps(root: Path) -> None:
    """Temporary files of a writer that was killed mid-write (this writer holds the run's lock, so
    no other writer is using them); only regular files named as `_atomic_write` names them."""
    for folder in (root, root / "blobs", *sorted((root / "blobs").glob("??"))):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()


def _lexists(path: Path) -> bool:
    """Whether something is at `path`; a symlink there (planted to redirect writes) is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} must be a regular file, not a symlink, folder or device")
    return True


def honest_json(row: Mapping[str, Any]) -> str:
    """One JSON line; a value JSON cannot hold honestly (NaN, inf, bytes, objects) names its column."""
    for key, value in row.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"column {key!r} is not JSON: {exc}") from None
    return json.dumps(row, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _blob_dir(root: Path, image_id: str) -> Path:
    if (not isinstance(image_id, str) or not 2 <= len(image_id) <= 128
            or not all(c in "0123456789abcdef" for c in image_id)):
        raise StoreError(f"image id {str(image_id)[:80]!r} is not a hex content hash")
    return root / "blobs" / image_id[:2]


def encode_features(features: ImageFeatures) -> list[bytes | memoryview]:
    """A features blob (magic, CRC, codec payload) as pieces to write in order: the pixels are a view,
    not a copy (joining 6 MB holds the GIL and faults in fresh pages: ~15-30 ms an image)."""
    pieces = encode_parts({"id": features.id, "grid_thw": list(features.grid_thw), "merge_size": features.merge_size,
                           "pixel_values": np.ascontiguousarray(features.pixel_values)})
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return [_BLOB_MAGIC + struct.pack("<I", crc), *pieces]


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
    except StoreError:
        raise
    except Exception as exc:  # hostile bytes: codec errors, wrong types, huge numbers, deep nesting
        raise StoreError(f"features blob {image_id} is malformed: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise StoreError(f"features blob {image_id}: pixel_values must be 2-D uint8")
    if t * h * w != pixels.shape[0]:
        raise StoreError(f"features blob {image_id}: grid {[t, h, w]} does not match {pixels.shape[0]} rows")
    return ImageFeatures(id=image_id, pixel_values=pixels, grid_thw=(t, h, w), merge_size=merge)


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
        if worker is not None and not (isinstance(worker, str) and _WORKER.fullmatch(worker)):
            raise StoreError(f"worker name {str(worker)[:40]!r} must be 1-32 letters, digits or _")
        self.root = Path(run_dir)
        self.features = features
        self.shard_bytes = shard_bytes
        self.worker = worker
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"create the run directory {self.root}") from None
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not a directory")
        _real_dir(self.root / "shards")
        self._rows_name = ROWS if worker is None else f"rollouts-{worker}.jsonl"
        self._shard_prefix = "shard-" if worker is None else f"shard-{worker}-"
        self._lock_fd = self._own_lock_fd = -1
        try:
            alone = self._take_locks()
            self.manifest = _settle_manifest(self.root, manifest)
            self.done_ids, self._committed = _done_ids(self.root, self._rows_name, repair_all=alone)
            if alone:
                _remove_leftover_temps(self.root)
                if worker is not None:  # let the other workers in now that the directory is repaired
                    fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            self._rows_fd = _open_regular(self.root / self._rows_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                          "write")
        except BaseException:
            self._release_locks()
            raise
        self._lock = threading.Lock()
        # PIL imports its ~40 plugins on the first TIFF save or format check (0.1-0.6 s holding the GIL
        # and the import lock): here, once, not in a worker thread while rollouts run.
        Image.init()
        names = [p.name.removeprefix(self._shard_prefix).removesuffix(".bin")
                 for p in (self.root / "shards").glob(f"{self._shard_prefix}*.bin")]
        self._shard_index = max((int(n) for n in names if n.isdigit()), default=-1) + 1  # never after a torn tail
        self._shard: tuple[int, str] | None = None  # (fd, name)
        self._shard_size = 0

    def _take_locks(self) -> bool:
        """Lock the run (and this worker's files); True when no other writer is in the directory.

        A single writer holds `.lock` exclusively. A worker holds `.lock-<worker>` exclusively and
        `.lock` shared, exclusively only while it is alone (then it repairs every row file and
        removes the temporary files of killed writers: nobody else can be writing them)."""
        self._lock_fd = _open_regular(self.root / ".lock", os.O_RDWR | os.O_CREAT, "lock")
        if self.worker is not None:
            self._own_lock_fd = _open_regular(self.root / f".lock-{self.worker}", os.O_RDWR | os.O_CREAT, "lock")
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
                self._write_blobs(image_id, (originals or {}).get(image_id), (features or {}).get(image_id))
            try:
                record = pack([trajectory], self.features, include_pixels=False)
            except StoreError:
                raise
            except RollwireError as exc:
                raise StoreError(f"rollout {trajectory.id} cannot be packed: {exc}") from None
            shard, offset = self._append(record)
            row.update({"shard": shard, "offset": offset, "length": len(record)})
            line = (honest_json(row) + "\n").encode("utf-8")
            self._commit(line)
            if trajectory.error is None:
                self.done_ids.add(trajectory.id)

    def archive_image(self, image_id: str, image: ImageSource, features: ImageFeatures) -> str:
        """Write an image's original and features now (a rollout saw it first; see
        `rollwire.rollout.ImageArchive`), unless they are on disk; the path of the original.
        Safe to call from many threads while rollouts run: blobs are written atomically."""
        if self._rows_fd < 0:
            raise StoreError(f"{self.root} is closed")
        if features.id != image_id:
            raise StoreError(f"features of image {features.id[:12]} handed in to archive {image_id[:12]}")
        return str(self._write_blobs(image_id, image, features))

    def restore_image(self, image_id: str) -> Image.Image:
        """An archived original, decoded (to recompute the features of an evicted image; any format
        this or an older writer archived)."""
        return _read_original(self.root, image_id)

    def _commit(self, line: bytes) -> None:
        """Append one row; on failure cut the file back so no partial row is left behind."""
        try:
            _write_all(self._rows_fd, line)
            os.fsync(self._rows_fd)
        except OSError as exc:
            try:
                os.ftruncate(self._rows_fd, self._committed)
            except OSError:
                os.close(self._rows_fd)
                self._rows_fd = -1  # the file may end in a partial row: stop; reopening repairs it
            raise _os_error(exc, f"write {self.root / self._rows_name}") from None
        self._committed += len(line)

    def _write_blobs(self, image_id: str, original: Any, features: ImageFeatures | None) -> Path | None:
        """Write what is missing of an image's blobs; the original's path (None: not archived)."""
        folder = _real_dir(_real_dir(self.root / "blobs") / _blob_dir(self.root, image_id).name)
        feats = folder / f"{image_id}.features"
        archived = _find_original(folder, image_id)
        blob = None  # the original's (extension, bytes), made before anything is written
        if archived is None and original is not None:
            blob = (archive_image(original) if isinstance(original, Image.Image)
                    else self._encoded_original(image_id, original))
        if not _lexists(feats):
            _atomic_write(feats, encode_features(features or self._features_of(image_id, original)))
        if blob is None:
            return archived
        archived = folder / f"{image_id}.{blob[0]}"
        _atomic_write(archived, blob[1])
        return archived

    def _encoded_original(self, image_id: str, source: ImageSource) -> tuple[str, bytes]:
        """(extension of its real format, the bytes) of an image given encoded: the file as it is,
        not decoded and encoded again. A file or URL is read again, so it is checked to still hold
        the image that was rendered (bytes and data URLs cannot have changed)."""
        remote = isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))
        # The image passed the renderer's limits (and path roots) when first seen; a remote one is
        # fetched again within the feature store's limits.
        limits = (dataclasses.replace(self.features.limits, allow_remote=True, allowed_roots=None) if remote
                  else _ARCHIVE_LIMITS)
        try:
            data = read_source(source, limits)
            ext = _encoded_extension(data)
            if not (isinstance(source, bytes) or (isinstance(source, str) and source[:5].lower() == "data:")):
                got = self.features.image_id(data, limits=_ARCHIVE_LIMITS)
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
        features = self.features.get_or_process(original, limits=_ARCHIVE_LIMITS)
        if features.id != image_id:
            raise StoreError(f"image {image_id[:12]}: its original hashes to {features.id[:12]}")
        return features

    def _append(self, record: bytes) -> tuple[str, int]:
        if self._shard is None or self._shard_size >= self.shard_bytes:
            self._close_shard()
            name = f"{self._shard_prefix}{self._shard_index:05d}.bin"
            self._shard_index += 1
            fd = _open_regular(self.root / "shards" / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "write")
            self._shard, self._shard_size = (fd, name), os.fstat(fd).st_size
        fd, name = self._shard
        offset = self._shard_size
        try:
            _write_all(fd, _FRAME.pack(_MAGIC, len(record), zlib.crc32(record)) + record)
            os.fsync(fd)
        except OSError as exc:
            self._close_shard()  # its tail may be torn: the next record starts a fresh shard
            raise _os_error(exc, f"write {self.root / 'shards' / name}") from None
        self._shard_size += _FRAME.size + len(record)
        return name, offset

    def _close_shard(self) -> None:
        if self._shard is not None:
            with contextlib.suppress(OSError):
                os.close(self._shard[0])
            self._shard = None

    def close(self) -> None:
        with self._lock:
            self._close_shard()
            if self._rows_fd >= 0:
                os.close(self._rows_fd)
                self._rows_fd = -1
            self._release_locks()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def archive_image(image: Image.Image) -> tuple[str, bytes]:
    """(extension, bytes) of a lossless copy of a PIL image: uncompressed TIFF (every mode TIFF holds
    exactly: RGB, RGBA, L, 16-bit, float, CMYK, ...), PNG for palette images. The few in-memory
    modes neither holds (HSV, "La") are kept as the RGB the model saw."""
    buf = io.BytesIO()
    try:
        if image.mode in _PNG_MODES:
            image.save(buf, format="PNG", compress_level=1)
            return "png", buf.getvalue()
        if image.mode in _TIFF_MODES:
            image.save(buf, format="TIFF")
            return "tiff", buf.getvalue()
        to_rgb(image).save(buf, format="TIFF")
    except RollwireError as exc:
        raise StoreError(f"image of mode {image.mode!r} cannot be archived: {exc}") from None
    except Exception as exc:  # PIL encoders raise OSError, ValueError, ...
        raise StoreError(f"image of mode {image.mode!r} cannot be archived: {type(exc).__name__}: {exc}") from None
    return "tiff", buf.getvalue()


def _encoded_extension(data: bytes) -> str:
    """The file extension of encoded image bytes' real format (read from the header, not decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=list(_EXTENSIONS)) as image:
            fmt = image.format
    except Exception as exc:  # PIL raises many types on a header it cannot read
        raise StoreError(f"image bytes of no format rollwire archives: {type(exc).__name__}: {exc}"[:300]) from None
    if fmt not in _EXTENSIONS:
        raise StoreError(f"image bytes in format {fmt!r}, which rollwire does not archive")
    return _EXTENSIONS[fmt]


def _find_original(folder: Path, image_id: str) -> Path | None:
    """The archived original of `image_id` in its blob folder, whatever its format (None: not archived)."""
    return next((p for p in (folder / f"{image_id}.{ext}" for ext in _ORIGINAL_EXTS) if _lexists(p)), None)


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


def _parse_row(line: bytes, n: int, name: str) -> dict[str, Any]:
    """One row: a JSON object with a string id, or a StoreError naming the line."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise StoreError(f"{name}:{n} is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StoreError(f"{name}:{n} is not JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(row, dict):
        raise StoreError(f"{name}:{n} is a JSON {type(row).__name__}, not a rollout row")
    if not isinstance(row.get("id"), str) or not row["id"]:
        raise StoreError(f"{name}:{n} has no string id")
    return row


def _read_rows(path: Path) -> bytes:
    fd = _open_regular(path, os.O_RDONLY, "read")
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _os_error(exc, f"read {path}") from None


def row_files(root: Path) -> list[Path]:
    """The run's row files in merge order: the single writer's, then each worker's by name."""
    workers = sorted(p for p in root.glob("rollouts-*.jsonl") if _WORKER_ROWS.fullmatch(p.name))
    return [p for p in (root / ROWS, *workers) if os.path.lexists(p)]


def _cut_partial_line(path: Path) -> int:
    """Cut a partial last line (a crash mid-write) off `path`; the bytes kept."""
    data = _read_rows(path)
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        fd = _open_regular(path, os.O_WRONLY, "repair")
        try:
            os.ftruncate(fd, keep)
        except OSError as exc:
            raise _os_error(exc, f"repair {path}") from None
        finally:
            os.close(fd)
    return keep


def _done_ids(root: Path, own: str, *, repair_all: bool) -> tuple[set[str], int]:
    """(ids whose newest row, over every row file, is a success; bytes of `own` kept). `own`'s
    partial last line is cut off (every file's when `repair_all`: no other writer is running);
    another writer's line being written is not read. A failed rollout is not done: a resume runs it again."""
    newest: dict[str, dict[str, Any]] = {}
    kept = 0
    for path in row_files(root):
        if repair_all or path.name == own:
            keep = _cut_partial_line(path)
            kept = keep if path.name == own else kept
            data = _read_rows(path)[:keep]
        else:
            data = _read_rows(path)
            data = data[:data.rfind(b"\n") + 1]
        _merge_rows(newest, (_parse_row(line, n, path.name) for n, line in enumerate(data.splitlines(), 1)))
    return {i for i, row in newest.items() if row.get("error") is None}, kept


def _merge_rows(newest: dict[str, dict[str, Any]], rows: Iterator[dict[str, Any]]) -> None:
    """Keep each id's newest row: a success supersedes any failure (a done id is never run again),
    and among failures (or successes) the later one wins."""
    for row in rows:
        old = newest.get(row["id"])
        if old is None or row.get("error") is None or old.get("error") is not None:
            newest[row["id"]] = row


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _settle_manifest(root: Path, manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Compare `manifest["settings"]` with the run's `run.json` (refusing a difference), or write it."""
    path = root / MANIFEST
    if os.path.lexists(path):
        data = _read_rows(path)
        try:
            old = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise StoreError(f"{path} is not a run manifest: {exc}") from None
        if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
            raise StoreError(f"{path} is not a run manifest (no settings)")
        if manifest is None:
            return old
        ours, theirs = _flat(old["settings"]), _flat(json.loads(honest_json(manifest))["settings"])
        differences = {k: (ours.get(k), theirs.get(k)) for k in sorted(ours.keys() | theirs.keys())
                       if ours.get(k) != theirs.get(k)}
        if differences:
            raise ManifestMismatchError(str(root), differences)
        return old
    if manifest is None:
        return None
    if not isinstance(manifest.get("settings"), Mapping):
        raise StoreError("a run manifest needs a 'settings' mapping")
    _atomic_write(path, (json.dumps(json.loads(honest_json(manifest)), indent=2) + "\n").encode())
    return dict(manifest)


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
        try:
            manifest = json.loads(_read_rows(path).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise StoreError(f"{path} is not a run manifest: {exc}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise StoreError(f"{path} is not a run manifest (no settings)")
        return manifest

    def rows(self, *, all_rows: bool = False) -> Iterator[dict[str, Any]]:
        """The newest row of each rollout over every row file (the single writer's, then each
        worker's), in that order (a resume's retry supersedes the failed row); `all_rows=True`
        yields every row, each with `"superseded": bool`."""
        parsed: list[dict[str, Any]] = []
        for path in row_files(self.root):
            lines = _read_rows(path).split(b"\n")
            if lines[-1]:
                raise StoreError(f"{path.name}:{len(lines)} is truncated")
            parsed.extend(_parse_row(line, n, path.name) for n, line in enumerate(lines[:-1], 1))
        newest: dict[str, dict[str, Any]] = {}
        _merge_rows(newest, iter(parsed))
        for row in parsed:
            if all_rows:
                yield row | {"superseded": newest[row["id"]] is not row}
            elif newest[row["id"]] is row:
                yield row

    def trajectory(self, row: Mapping[str, Any]) -> Trajectory:
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), str):
            raise StoreError(f"a rollout row must be a mapping with a string id, got {type(row).__name__}")
        rid = row["id"]
        shard, offset, want = row.get("shard"), row.get("offset"), row.get("length")
        if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
            raise StoreError(f"row {rid!r} names shard {str(shard)[:80]!r}, not a shard of shards/")
        for name, value in (("offset", offset), ("length", want)):
            if type(value) is not int or value < 0:
                raise StoreError(f"row {rid!r} has {name} {str(value)[:40]!r}, not a non-negative integer")
        assert isinstance(offset, int) and isinstance(want, int)
        path = self.root / "shards" / shard
        if not os.path.lexists(path):
            raise StoreError(f"shard {shard} of rollout {rid} is missing")
        fd = _open_regular(path, os.O_RDONLY, "read")
        try:
            size = os.fstat(fd).st_size
            if offset + _FRAME.size + want > size:
                raise StoreError(f"{shard} is truncated: rollout {rid} needs bytes {offset}..."
                                 f"{offset + _FRAME.size + want} of {size}")
            head = os.pread(fd, _FRAME.size, offset)
            magic, length, crc = _FRAME.unpack(head)
            if magic != _MAGIC or length != want:
                raise StoreError(f"{shard} at {offset}: bad frame for rollout {rid}")
            record = os.pread(fd, length, offset + _FRAME.size)
        except OSError as exc:
            raise _os_error(exc, f"read {path}") from None
        finally:
            os.close(fd)
        if len(record) != length:
            raise StoreError(f"{shard} at {offset}: truncated frame for rollout {rid}")
        if zlib.crc32(record) != crc:
            raise StoreError(f"{shard} at {offset}: corrupted record (CRC mismatch) for {rid}")
        try:
            batch = unpack(record)
        except Exception as exc:  # typed or not (deep nesting, ...), a bad record is a StoreError
            raise StoreError(f"{shard} at {offset}: {type(exc).__name__}: {exc}"[:300]) from None
        if len(batch.trajectories) != 1 or batch.trajectories[0].id != rid:
            raise StoreError(f"{shard} at {offset} holds another rollout than {rid}")
        return batch.trajectories[0]

    def trajectories(self) -> Iterator[Trajectory]:
        for row in self.rows():
            yield self.trajectory(row)

    def features(self, image_id: str) -> ImageFeatures:
        path = _blob_dir(self.root, image_id) / f"{image_id}.features"
        if not os.path.lexists(path):
            raise StoreError(f"features blob of image {image_id} is missing")
        return decode_features(_read_rows(path), image_id)

    def load_features(self, store: FeatureStore, trajectory: Trajectory) -> None:
        """Put the trajectory's image features into `store` (for building training samples)."""
        for image_id in trajectory.image_ids:
            if image_id not in store:
                store.put(self.features(image_id))

    def image(self, image_id: str) -> Image.Image:
        """The archived original, decoded (its file as given: JPEG, PNG, ...; TIFF or PNG for a PIL image)."""
        return _read_original(self.root, image_id)

    def original_path(self, image_id: str) -> Path:
        """Where the archived original is (its extension names its format), to copy or serve it as it is."""
        path = _find_original(_blob_dir(self.root, image_id), image_id)
        if path is None:
            raise StoreError(f"original image {image_id} is not archived")
        return path


def _read_original(root: Path, image_id: str) -> Image.Image:
    path = _find_original(_blob_dir(root, image_id), image_id)
    if path is None:
        raise StoreError(f"original image {image_id} is not archived")
    try:
        return load_image(_read_rows(path), _ARCHIVE_LIMITS)
    except RollwireError as exc:
        raise StoreError(f"original image {image_id}: {exc}") from None
