"""Trajectory shards: `shards/shard[-<w>]-NNNNN.bin`, append-only, one packed trajectory per
record, each framed by a magic, its length and its CRC32. A write that fails may leave a torn tail;
the next record then starts a fresh shard, so a committed row never points past a torn one."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rollwire.errors import StoreError
from rollwire.store.files import open_regular, os_error, write_all

_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32
_MAGIC = b"RWT1"
_SHARD_NAME = re.compile(r"shard-(?:[A-Za-z0-9_]{1,32}-)?[0-9]{5,9}\.bin")


class ShardAppender:
    """Appends framed records to one writer's shards (`prefix` is `shard-` or `shard-<w>-`), starting
    a new shard every `shard_bytes` and after a failed write; never after a torn tail."""

    def __init__(self, folder: Path, prefix: str, shard_bytes: int) -> None:
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        names = [p.name.removeprefix(prefix).removesuffix(".bin") for p in folder.glob(f"{prefix}*.bin")]
        self._index = max((int(n) for n in names if n.isdigit()), default=-1) + 1
        self._shard: tuple[int, str] | None = None  # (fd, name)
        self._size = 0

    def append(self, record: bytes) -> tuple[str, int]:
        """Write and fsync one record; (shard name, offset of its frame)."""
        if self._shard is None or self._size >= self.shard_bytes:
            self.close()
            name = f"{self.prefix}{self._index:05d}.bin"
            self._index += 1
            fd = open_regular(self.folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "write")
            self._shard, self._size = (fd, name), os.fstat(fd).st_size
        fd, name = self._shard
        offset = self._size
        try:
            write_all(fd, _FRAME.pack(_MAGIC, len(record), zlib.crc32(record)) + record)
            os.fsync(fd)
        except OSError as exc:
            self.close()  # its tail may be torn: the next record starts a fresh shard
            raise os_error(exc, f"write {self.folder / name}") from None
        self._size += _FRAME.size + len(record)
        return name, offset

    def close(self) -> None:
        if self._shard is not None:
            with contextlib.suppress(OSError):
                os.close(self._shard[0])
            self._shard = None


def read_record(root: Path, row: Mapping[str, Any]) -> bytes:
    """The record a row points at (`shard`, `offset`, `length`), its frame and CRC checked; a row
    pointing anywhere hostile (another folder, past the end, a symlink) is a StoreError."""
    rid = row["id"]
    shard, offset, want = row.get("shard"), row.get("offset"), row.get("length")
    if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
        raise StoreError(f"row {rid!r} names shard {str(shard)[:80]!r}, not a shard of shards/")
    for name, value in (("offset", offset), ("length", want)):
        if type(value) is not int or value < 0:
            raise StoreError(f"row {rid!r} has {name} {str(value)[:40]!r}, not a non-negative integer")
    assert isinstance(offset, int) and isinstance(want, int)
    path = root / "shards" / shard
    if not os.path.lexists(path):
        raise StoreError(f"shard {shard} of rollout {rid} is missing")
    fd = open_regular(path, os.O_RDONLY, "read")
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
        raise os_error(exc, f"read {path}") from None
    finally:
        os.close(fd)
    if len(record) != length:
        raise StoreError(f"{shard} at {offset}: truncated frame for rollout {rid}")
    if zlib.crc32(record) != crc:
        raise StoreError(f"{shard} at {offset}: corrupted record (CRC mismatch) for {rid}")
    return record
