"""Files inside a run directory, safely: regular files only (a planted symlink or FIFO is refused),
atomic writes (temporary file, fsync, rename), writes without joining pieces in memory, and OS
failures as `StoreError`s that say in words what could not be done."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from rollwire.errors import StoreError

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_IOV_MAX = 512  # pieces a writev takes at once (Linux allows 1024)
TEMP = re.compile(r"\.[^/]+\.\d+\.\d+\.tmp")  # what `atomic_write` names its temporary files

Buffers = bytes | Sequence[bytes | memoryview]


def os_error(exc: OSError, what: str) -> StoreError:
    """An OS failure as a StoreError that says what could not be done and why, in words."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ELOOP: "it is a symlink (refused)"}.get(
        exc.errno or 0, exc.strerror or str(exc))
    return StoreError(f"cannot {what}: {why}")


def real_dir(path: Path) -> Path:
    """`path` as a real directory (created if missing); a symlink or a file there is refused."""
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise os_error(exc, f"create {path}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} must be a directory inside the run directory, not a symlink or a file")
    return path


def open_regular(path: Path, flags: int, what: str) -> int:
    """Open a file that is not a symlink and, if it exists, is a regular file (no FIFO can block)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, f"{what} {path}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path} must be a regular file, not a symlink, folder or device")
    try:
        return os.open(path, flags | NOFOLLOW, 0o644)
    except OSError as exc:
        raise os_error(exc, f"{what} {path}") from None


def write_all(fd: int, data: Buffers) -> None:
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


def atomic_write(path: Path, data: Buffers) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see all or nothing."""
    StagedFile(path, data).sync()


class StagedFile:
    """An atomic write in two halves: the bytes go to a temporary file now (handed to the kernel,
    no fsync), `sync` makes them durable and renames the file into place. Until then nothing is at
    `path`, so a crash in between leaves only a temporary file (removed by the next writer), never
    a torn file under a blob's name. `sync` is safe from any thread, once or many times."""

    def __init__(self, path: Path, data: Buffers) -> None:
        self.path = path
        self.nbytes = len(data) if isinstance(data, bytes) else sum(memoryview(p).nbytes for p in data)
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._lock = threading.Lock()
        self._error: StoreError | None = None
        self._fd = -1
        try:
            self._fd = open_regular(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "write")
            write_all(self._fd, data)
        except OSError as exc:
            self.abandon()
            raise os_error(exc, f"write {path.parent.name}/{path.name}") from None
        except BaseException:
            self.abandon()
            raise

    @property
    def failed(self) -> bool:
        return self._error is not None

    def sync(self) -> None:
        """fsync, then rename into place (a no-op once done); a failure is a StoreError, every time."""
        with self._lock:
            if self._fd >= 0:
                try:
                    os.fsync(self._fd)
                    os.close(self._fd)
                    self._fd = -1
                    os.replace(self._tmp, self.path)
                except OSError as exc:
                    self._error = os_error(exc, f"write {self.path.parent.name}/{self.path.name}")
                    self.abandon()
            if self._error is not None:
                raise self._error

    def abandon(self) -> None:
        """Drop the write: close and remove the temporary file (nothing was at `path`)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def remove_leftover_temps(root: Path) -> None:
    """Temporary files of a writer that was killed mid-write (this writer holds the run's lock, so
    no other writer is using them); only regular files named as `atomic_write` names them."""
    for folder in (root, root / "blobs", *sorted((root / "blobs").glob("??"))):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()


def lexists(path: Path) -> bool:
    """Whether something is at `path`; a symlink there (planted to redirect writes) is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} must be a regular file, not a symlink, folder or device")
    return True


def read_file(path: Path) -> bytes:
    """A regular file's bytes (a symlink or FIFO there is refused)."""
    fd = open_regular(path, os.O_RDONLY, "read")
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as exc:
        raise os_error(exc, f"read {path}") from None
