"""Reading a command's input files safely: JSON messages files and the folders images may come from."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from rollwire.errors import MessagesFileError

MAX_MESSAGES_FILE_BYTES = 64 * 2**20
MAX_MESSAGES_FILE_DEPTH = 100  # JSON nesting; a real conversation is under 10 deep


def read_json_file(path: Path, *, max_bytes: int = MAX_MESSAGES_FILE_BYTES,
                   max_depth: int = MAX_MESSAGES_FILE_DEPTH) -> Any:
    """The JSON value in `path`: a regular file (a FIFO is refused, not waited on) of at most
    `max_bytes`, UTF-8, nested at most `max_depth` deep. Every failure is a `MessagesFileError`."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise MessagesFileError(f"messages file {path} is {kind}")
        if info.st_size > max_bytes:
            raise MessagesFileError(f"messages file {path} has {info.st_size} bytes, over the limit of {max_bytes}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise MessagesFileError(f"messages file {path} is not a regular file")
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise MessagesFileError(f"messages file {path} does not exist") from None
    except OSError as exc:
        raise MessagesFileError(f"cannot read messages file {path}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise MessagesFileError(f"messages file {path} has more than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MessagesFileError(f"messages file {path} is not UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MessagesFileError(f"messages file {path} is not JSON: {exc}") from None
    except RecursionError:
        raise MessagesFileError(f"messages file {path} is nested too deeply to parse") from None
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise MessagesFileError(f"messages file {path} is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return data


def load_messages_file(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and optional tools) from JSON: a list of messages or {"messages", "tools"}.

    Relative image paths are taken relative to the file's folder. The messages are checked
    when rendered; the tools here (`parse_tools`).
    """
    from rollwire.messages import parse_tools

    data = read_json_file(path)
    tools = None
    if isinstance(data, dict):
        tools = parse_tools(data.get("tools"))
        data = data.get("messages")
    if not isinstance(data, list):
        raise MessagesFileError(f"{path}: expected a list of messages or an object with 'messages'")
    base = path.resolve().parent
    for message in data:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            for key in ("image", "path"):
                src = part.get(key)
                if (isinstance(src, str) and "://" not in src and not src.startswith("data:")
                        and not Path(src).is_absolute()):
                    part[key] = str(base / src)
    return data, tools


def image_limits(messages_file: Path, image_roots: list[Path] | None, any_image_path: bool) -> Any:
    """What the CLI reads images under: the messages file's folder and any `--image-root`,
    or anywhere with `--any-image-path`."""
    from rollwire.images import ImageLimits

    if any_image_path:
        return ImageLimits()
    return ImageLimits(allowed_roots=(str(messages_file.resolve().parent), *map(str, image_roots or ())))


IMAGE_ROOT_HELP = "Also read images under this folder (repeatable); by default only the messages file's folder."
ANY_IMAGE_PATH_HELP = "Read images from any path the process can read (no folder confinement)."

