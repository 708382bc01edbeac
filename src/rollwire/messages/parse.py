"""Messages from plain dicts (JSON, an environment) or `Message` objects, validated.

`parse_messages` checks each message as thoroughly whether it came as a dict or was built as a
`Message` (with any values), then the rules across messages (`validate_conversation`). Every
problem raises `MessageError` naming the message index and the field. Text must be valid
Unicode (a lone surrogate is refused, not replaced), tool call arguments a JSON object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from rollwire.errors import MessageError, UnknownRoleError
from rollwire.messages.text import check_json, check_text
from rollwire.messages.types import (
    ROLES,
    ContentPart,
    ImagePart,
    ImageSource,
    Message,
    MessageLike,
    Role,
    TextPart,
    ToolCall,
    makes_tool_calls,
)

__all__ = ["parse_message", "parse_messages", "validate_conversation"]


def parse_messages(
    messages: Sequence[MessageLike], *, start_index: int = 0, after_assistant: bool = False,
    previous: Message | None = None,
) -> list[Message]:
    """Validate and convert messages; see `validate_conversation` for the cross-message rules.

    `Message` objects are checked as thoroughly as dicts (they may have been built with any
    values) and returned as they are when valid. `start_index` offsets the indices in error
    messages (used when the messages continue a conversation); `previous` is the message just
    before them, when known; `after_assistant` says they follow an assistant turn whose tool
    calls are not known (a sampled completion not yet parsed).
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise MessageError(f"messages must be a list of messages, got {type(messages).__name__}")
    out = [parse_message(m, index=start_index + i) for i, m in enumerate(messages)]
    validate_conversation(out, start_index=start_index, after_assistant=after_assistant, previous=previous)
    return out


def parse_message(message: MessageLike, *, index: int | None = None) -> Message:
    """One message, checked: a dict is converted; a valid `Message` is returned as it is."""
    if isinstance(message, Message):
        return _checked_message(message, index)
    if not isinstance(message, Mapping):
        raise MessageError(f"a message must be an object, got {type(message).__name__}", index=index)
    role = _role(message.get("role"), index)
    content = _parse_content(message.get("content"), role, index)
    tool_calls = _parse_tool_calls(message.get("tool_calls"), role, index)
    reasoning = _optional_str(message.get("reasoning_content"), "reasoning_content", index)
    tool_call_id = _optional_str(message.get("tool_call_id"), "tool_call_id", index)
    name = _optional_str(message.get("name"), "name", index)
    out = Message(
        role=role,
        content=content,
        tool_calls=tool_calls,
        reasoning_content=reasoning,
        tool_call_id=tool_call_id if role == "tool" else None,
        name=name,
    )
    _check_role_rules(out, index)
    return out


def validate_conversation(
    messages: Sequence[Message], *, start_index: int = 0, after_assistant: bool = False,
    previous: Message | None = None,
) -> None:
    """Cross-message rules: a tool message answers a preceding assistant tool call.

    A tool message must follow an assistant message that made tool calls (possibly through
    other tool messages) with no user or system message between: structured `tool_calls`, or
    a Hermes `<tool_call>` block written in its text (how Qwen2-VL conversations carry them). When it carries a
    `tool_call_id`, that id must be one of that assistant's tool call ids. `previous` (or
    `after_assistant`, tool calls unknown) gives the state before the first message.
    """
    open_ids: set[str] | None = set() if after_assistant else None
    open_calls = after_assistant
    if previous is not None and previous.role == "tool":  # more results of the same calls
        open_calls, open_ids = True, None
    elif previous is not None:
        open_calls = makes_tool_calls(previous)
        open_ids = {c.id for c in previous.tool_calls if c.id is not None} if open_calls else None
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_calls = makes_tool_calls(m)
            open_ids = {c.id for c in m.tool_calls if c.id is not None}
        elif m.role == "tool":
            if not open_calls:
                raise MessageError(
                    "tool message does not follow an assistant tool call",
                    index=start_index + i, field="role",
                )
            if m.tool_call_id is not None and open_ids is not None and open_ids and (
                m.tool_call_id not in open_ids
            ):
                raise MessageError(
                    f"tool_call_id {m.tool_call_id!r} matches no preceding tool call "
                    f"(known: {sorted(open_ids)})",
                    index=start_index + i, field="tool_call_id",
                )
        else:
            open_calls = False
            open_ids = None


# --- helpers --------------------------------------------------------------------------------


def _role(role: Any, index: int | None) -> Role:
    if not isinstance(role, str) or role not in ROLES:
        raise UnknownRoleError(
            f"unknown role {role!r} (expected one of {', '.join(ROLES)})", index=index, field="role"
        )
    return role


def _optional_str(value: Any, field: str, index: int | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return check_text(value, index, field)
    raise MessageError(f"must be a string, got {type(value).__name__}", index=index, field=field)


def _checked_message(m: Message, index: int | None) -> Message:
    """A constructed `Message` gets the checks a dict gets; it is returned itself when valid
    (identity matters: the rollout loop compares conversations by `is`)."""
    role = _role(m.role, index)
    content = m.content
    if content is not None and not isinstance(content, str):
        parsed = _parse_content(content, role, index)
        assert isinstance(parsed, tuple)  # a sequence of parts, checked
        if not (isinstance(content, tuple) and len(parsed) == len(content)
                and all(a is b for a, b in zip(parsed, content, strict=True))):
            content = parsed
    elif isinstance(content, str):
        check_text(content, index, "content")
    calls = m.tool_calls
    if calls != ():
        parsed_calls = _parse_tool_calls(calls, role, index)
        if not (isinstance(calls, tuple) and all(a is b for a, b in zip(parsed_calls, calls, strict=True))):
            calls = parsed_calls
    for key in ("reasoning_content", "tool_call_id", "name"):
        _optional_str(getattr(m, key), key, index)
    ids = m.token_ids
    if ids is not None and (not isinstance(ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise MessageError("token_ids must be a tuple of non-negative ints", index=index, field="token_ids")
    if content is not m.content or calls is not m.tool_calls:
        m = replace(m, content=content, tool_calls=calls)
    _check_role_rules(m, index)
    return m


def _check_role_rules(m: Message, index: int | None) -> None:
    if m.reasoning_content is not None and m.role != "assistant":
        raise MessageError("only assistant messages carry reasoning_content", index=index,
                           field="reasoning_content")
    if m.content is None and m.role != "assistant":
        raise MessageError(f"a {m.role} message needs content", index=index, field="content")
    if m.content is None and not m.tool_calls and m.role == "assistant" and m.reasoning_content is None:
        raise MessageError("an assistant message needs content or tool_calls", index=index, field="content")


def _parse_content(content: Any, role: str, index: int | None) -> str | tuple[ContentPart, ...] | None:
    if content is None:
        return None
    if isinstance(content, str):
        return check_text(content, index, "content")
    if isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
        raise MessageError(
            f"content must be a string or a list of parts, got {type(content).__name__}",
            index=index, field="content",
        )
    parts: list[ContentPart] = []
    for j, part in enumerate(content):
        parts.append(_parse_part(part, index, f"content[{j}]"))
    if role in ("system",) and any(isinstance(p, ImagePart) for p in parts):
        raise MessageError("system messages cannot hold images", index=index, field="content")
    if role == "assistant" and any(isinstance(p, ImagePart) for p in parts):
        raise MessageError("assistant messages cannot hold images", index=index, field="content")
    return tuple(parts)


def _parse_part(part: Any, index: int | None, where: str) -> ContentPart:
    if isinstance(part, TextPart):
        if not isinstance(part.text, str):
            raise MessageError(f"text must be a string, got {type(part.text).__name__}",
                               index=index, field=f"{where}.text")
        check_text(part.text, index, f"{where}.text")
        return part
    if isinstance(part, ImagePart):
        _check_image_source(part.image, index, where)
        return part
    if not isinstance(part, Mapping):
        raise MessageError(f"a content part must be an object, got {type(part).__name__}",
                           index=index, field=where)
    kind = part.get("type")
    if kind is None:  # HF style parts sometimes omit the type
        kind = "text" if "text" in part else "image_url" if "image_url" in part else (
            "image" if "image" in part else None)
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise MessageError(f"text must be a string, got {type(text).__name__}",
                               index=index, field=f"{where}.text")
        return TextPart(check_text(text, index, f"{where}.text"))
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise MessageError("image_url part has no url", index=index, field=f"{where}.image_url.url")
        return ImagePart(check_text(url, index, f"{where}.image_url.url"))
    if kind == "image":
        for key in ("image", "url", "path"):
            source = part.get(key)
            if source is not None:
                break
        return ImagePart(_check_image_source(source, index, where))
    raise MessageError(f"unknown content part type {kind!r} (expected text, image_url or image)",
                       index=index, field=f"{where}.type")


def _check_image_source(source: Any, index: int | None, where: str) -> ImageSource:
    if source is None or (isinstance(source, (str, bytes)) and not source):
        raise MessageError("image part has no source (expected image, url or path)", index=index, field=where)
    if not isinstance(source, (str, bytes, os.PathLike, Image.Image)):
        raise MessageError(
            f"image source must be a URL, path, bytes or PIL image, got {type(source).__name__}",
            index=index, field=f"{where}.image",
        )
    if isinstance(source, str):
        check_text(source, index, f"{where}.image")
    return source


def _parse_tool_calls(calls: Any, role: str, index: int | None) -> tuple[ToolCall, ...]:
    if calls is None:
        return ()
    if role != "assistant":
        raise MessageError("only assistant messages carry tool_calls", index=index, field="tool_calls")
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise MessageError("tool_calls must be a list", index=index, field="tool_calls")
    out: list[ToolCall] = []
    for j, call in enumerate(calls):
        where = f"tool_calls[{j}]"
        if isinstance(call, ToolCall):
            out.append(_checked_call(call, index, where, f"{where}.name", f"{where}.arguments", f"{where}.id"))
            continue
        if not isinstance(call, Mapping):
            raise MessageError("a tool call must be an object", index=index, field=where)
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise MessageError("function must be an object", index=index, field=f"{where}.function")
        raw: Any = fn  # checked by _checked_call below
        built = ToolCall(name=raw.get("name"), arguments=raw.get("arguments", "{}"), id=call.get("id"))
        out.append(_checked_call(built, index, where, f"{where}.function.name", f"{where}.function.arguments",
                                 f"{where}.id"))
    return tuple(out)


def _checked_call(call: ToolCall, index: int | None, where: str, name_at: str, args_at: str,
                  id_at: str) -> ToolCall:
    """The call, when its name is a non-empty string and its arguments a JSON object (text or mapping)."""
    if not isinstance(call.name, str) or not call.name:
        raise MessageError(f"tool call has no function name (got {type(call.name).__name__})", index=index,
                           field=name_at)
    check_text(call.name, index, name_at)
    args = call.arguments
    if isinstance(args, str):
        check_text(args, index, args_at)
        try:
            value = json.loads(args)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MessageError(f"arguments are not JSON: {exc}", index=index, field=args_at) from None
        if not isinstance(value, dict):
            raise MessageError(f"arguments must be a JSON object, got {type(value).__name__}", index=index,
                               field=args_at)
        check_json(value, index, args_at)
    elif isinstance(args, Mapping):
        check_json(args, index, args_at)
    else:
        raise MessageError(f"arguments must be a JSON object (text or mapping), got {type(args).__name__}",
                           index=index, field=args_at)
    if call.id is not None:
        if not isinstance(call.id, str):
            raise MessageError(f"id must be a string, got {type(call.id).__name__}", index=index, field=id_at)
        check_text(call.id, index, id_at)
    return call
