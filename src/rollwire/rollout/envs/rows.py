"""Dataset rows for the `dataset` environment: read JSONL, Parquet or a Hugging Face dataset, and
turn one row into prompt messages (images checked, kept as their encoded bytes) and an answer.

A row's prompt is `prompt` (a list of messages or a string), `messages` (a chat; a final
assistant message is the answer when there is no answer column) or `question` (a string), as
verifiers, TRL and verl name them. Images come from an `images` (or `image`) column: paths
(relative to the data file), URLs, data URLs, `{"bytes", "path"}` records (how a Hugging Face
`Image` feature is stored in Parquet) or PIL images (a decoded `datasets` Image feature). They
fill, in order, `<image>` markers in message text (verl) or image parts without a source (TRL),
else they go before the text of the first user message. Every problem is a `DatasetError`
naming the row and the column.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from rollwire.errors import DatasetError, ImageError
from rollwire.images import ImageLimits, load_encoded
from rollwire.messages import ImagePart, ImageSource, TextPart

IMAGE_MARKER = "<image>"
PROMPT_KEYS = ("prompt", "messages", "question")


@dataclass(frozen=True)
class Prompt:
    """One row, ready to roll out: messages (images as PIL images), the answer, extra info."""

    messages: list[dict[str, Any]]
    answer: Any
    info: dict[str, Any]


def load_rows(path: str, *, split: str = "train") -> Sequence[Mapping[str, Any]]:
    """The rows of a `.jsonl` / `.json` / `.parquet` file, a `datasets` directory (`save_to_disk`),
    or (`hf:owner/name`) a Hugging Face hub dataset. Files are read once per process and version."""
    if path.startswith("hf:"):
        return _hf_dataset(path.removeprefix("hf:"), split)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DatasetError(f"dataset {path}: {exc.strerror or exc}") from None
    return _cached_rows(str(Path(path).resolve()), split, info.st_mtime_ns, info.st_size)


def data_fingerprint(path: str, rows: Any) -> str | None:
    """A hash of what the rows were read from: the file's bytes, or a `datasets` fingerprint."""
    if isinstance(getattr(rows, "_fingerprint", None), str):
        return f"datasets:{rows._fingerprint}"
    if path.startswith("hf:") or not os.path.isfile(path):
        return None
    info = os.stat(path)
    return _file_hash(str(Path(path).resolve()), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


@functools.lru_cache(maxsize=8)
def _cached_rows(path: str, split: str, mtime_ns: int, size: int) -> Sequence[Mapping[str, Any]]:
    if os.path.isdir(path):
        return _hf_dataset(path, split, from_disk=True)
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"dataset {path}: reading Parquet needs pyarrow "
                               "(pip install 'rollwire[datasets]')") from None
        try:
            return list(pq.read_table(path).to_pylist())
        except Exception as exc:  # pyarrow's own errors: a corrupt or foreign file
            raise DatasetError(f"dataset {path} is not readable Parquet: {exc}") from None
    if suffix in (".jsonl", ".json"):
        return _json_rows(path)
    raise DatasetError(f"dataset {path}: unknown format {suffix!r} (expected .jsonl, .json, .parquet, a datasets "
                       "directory, or hf:owner/name)")


def _json_rows(path: str) -> list[Mapping[str, Any]]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {path} cannot be read as UTF-8 text: {exc}") from None
    if Path(path).suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"dataset {path} is not JSON: {exc}") from None
        if not isinstance(rows, list):
            raise DatasetError(f"dataset {path}: a .json dataset is a list of rows")
    else:
        rows = []
        for k, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"dataset {path}, line {k + 1}: not JSON: {exc}") from None
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetError(f"dataset {path}: row {k} is a {type(row).__name__}, not an object")
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    return rows


def _hf_dataset(name: str, split: str, *, from_disk: bool = False) -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"dataset {name}: Hugging Face datasets need the datasets package "
                           "(pip install 'rollwire[datasets]')") from None
    try:
        data = datasets.load_from_disk(name) if from_disk else datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets' own errors (not found, no network, a bad directory)
        raise DatasetError(f"dataset {name}: {type(exc).__name__}: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DatasetError(f"dataset {name} has no split {split!r} (splits: {', '.join(data)})")
        data = data[split]
    if len(data) == 0:
        raise DatasetError(f"dataset {name} has no rows")
    return data


def row_prompt(row: Mapping[str, Any], index: int, *, limits: ImageLimits, root: str | None = None,
               prompt_key: str | None = None, answer_key: str = "answer", images_key: str | None = None,
               system_prompt: str | None = None) -> Prompt:
    """Row `index` as prompt messages (images checked by decoding them; see `_image`), answer and info."""
    where = f"row {index}"
    key = prompt_key or next((k for k in PROMPT_KEYS if row.get(k) is not None), None)
    if key is None or row.get(key) is None:
        raise DatasetError(f"{where}: no prompt (expected a column {' / '.join(PROMPT_KEYS)}, or set prompt_key); "
                           f"columns: {', '.join(map(str, row))}")
    value, answer = row[key], row.get(answer_key)
    if isinstance(value, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": value}]
    elif isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        messages = [dict(m) for m in value]
    else:
        raise DatasetError(f"{where}: column {key!r} must be a string or a list of messages, "
                           f"got {type(value).__name__}")
    if answer is None and messages and messages[-1].get("role") == "assistant":
        answer = _text(messages.pop()["content"])
    if not messages:
        raise DatasetError(f"{where}: the prompt has no messages")
    if system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    images = _images_column(row, images_key, where)
    messages = _place_images(messages, [_image(v, limits, root, f"{where}, image {k}") for k, v in enumerate(images)],
                             where, lambda src, what: _image(src, limits, root, f"{where}, {what}"))
    info = row.get("info")
    return Prompt(messages, answer, dict(info) if isinstance(info, Mapping) else {})


def _images_column(row: Mapping[str, Any], key: str | None, where: str) -> list[Any]:
    for name in ((key,) if key else ("images", "image")):
        value = row.get(name)
        if value is None:
            continue
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if key:
        raise DatasetError(f"{where}: no column {key!r}")
    return []


def _place_images(messages: list[dict[str, Any]], images: list[ImageSource], where: str,
                  load: Callable[[Any, str], ImageSource]) -> list[dict[str, Any]]:
    """Images into `<image>` markers or source-less image parts, in order; else before the first user text."""
    pending = list(images)
    placed = 0
    out = []
    for k, message in enumerate(messages):
        content = message.get("content")
        parts: list[Any]
        if isinstance(content, str) and IMAGE_MARKER in content:
            pieces = content.split(IMAGE_MARKER)
            parts = [TextPart(pieces[0])] if pieces[0] else []
            for piece in pieces[1:]:
                parts.append(_take(pending, where))
                placed += 1
                if piece:
                    parts.append(TextPart(piece))
            message = {**message, "content": tuple(parts)}
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                    source = part.get("image") or part.get("path") or _url(part.get("image_url"))
                    parts.append(_take(pending, where) if source is None else
                                 ImagePart(load(source, f"messages[{k}].content[{j}]")))
                    placed += source is None
                elif isinstance(part, Mapping) and part.get("type") == "text":
                    parts.append(TextPart(str(part.get("text") or "")))
                else:
                    parts.append(part)
            message = {**message, "content": tuple(parts)}
        out.append(message)
    if pending and placed:
        raise DatasetError(f"{where}: {placed} image markers but {placed + len(pending)} images")
    if pending:
        first = next((m for m in out if m.get("role") == "user"), None)
        if first is None:
            raise DatasetError(f"{where}: images but no user message to put them in")
        content = first.get("content")
        rest = (TextPart(content),) if isinstance(content, str) else tuple(content or ())
        first["content"] = (*(ImagePart(i) for i in pending), *rest)
    return out


def _take(pending: list[ImageSource], where: str) -> ImagePart:
    if not pending:
        raise DatasetError(f"{where}: more image markers than images")
    return ImagePart(pending.pop(0))


def _url(value: Any) -> Any:
    return value.get("url") if isinstance(value, Mapping) else value


def _image(value: Any, limits: ImageLimits, root: str | None, where: str) -> ImageSource:
    """An image from a dataset cell: a path, URL, data URL, bytes, `{"bytes", "path"}` or a PIL image.

    Decoded here, so a bad cell is this row's `DatasetError`; what the prompt carries is the encoded
    bytes when there are some (the original, which the run directory archives and content_parts
    sends as it is; a PIL image would be re-encoded), else the PIL image."""
    source = value
    if isinstance(value, Mapping):
        source = value.get("bytes") or value.get("path") or value.get("image") or _url(value.get("url"))
    if isinstance(source, str) and root is not None and "://" not in source and not source.startswith("data:") \
            and not os.path.isabs(source):
        source = os.path.join(root, source)
    if not isinstance(source, (str, bytes, Image.Image)):
        raise DatasetError(f"{where}: not an image (a path, URL, bytes or PIL image): {type(value).__name__}")
    try:
        image, data = load_encoded(source, limits)
    except ImageError as exc:
        raise DatasetError(f"{where}: {type(exc).__name__}: {exc}") from None
    return image if data is None else data


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, Mapping))
    return str(content)
