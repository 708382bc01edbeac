"""The text and JSON a message or a tool spec may hold: valid Unicode, plain JSON, bounded depth.

Shared by the message parser and the tool spec check; each error names the message index and field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rollwire.errors import MessageError

__all__ = ["MAX_JSON_DEPTH", "check_json", "check_text"]

# Bounds nesting of tool arguments and tool specs (JSON has no natural depth; templates recurse).
MAX_JSON_DEPTH = 64


def check_text(text: str, index: int | None, field: str) -> str:
    """`text`, when it encodes as UTF-8; a lone surrogate (from JSON `"\\ud800"`) would pass here and
    crash the tokenizer or the codec later, so it is refused with its position."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MessageError(f"text holds a lone surrogate {text[exc.start]!r} at character {exc.start} "
                               "(not valid Unicode; it cannot be encoded)", index=index, field=field) from None
    return text


def check_json(value: Any, index: int | None, field: str, error: type[MessageError] = MessageError) -> str:
    """`value` as JSON text: plain JSON types only, finite numbers, valid Unicode, bounded depth."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # depth first, without recursion
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"nested deeper than {MAX_JSON_DEPTH} levels", index=index, field=field)
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise error(f"not JSON-serialisable: {exc}", index=index, field=field) from None
    try:
        return check_text(text, index, field)
    except MessageError as exc:
        raise error(exc.reason, index=index, field=field) from None
