"""Chat messages in the OpenAI format, as typed, validated, immutable values.

`parse_messages` accepts plain dicts (as they come from JSON or an environment) or `Message`
objects and returns `Message`s; every problem raises `MessageError` naming the message index
and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from PIL import Image

from rollwire.errors import MessageError, UnknownRoleError

Role: TypeAlias = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")

# What an image part may hold: a URL / path string, raw encoded bytes, a PIL image, or a path.
ImageSource: TypeAlias = "str | bytes | os.PathLike[str] | Image.Image"


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class ImagePart:
    image: ImageSource
    type: Literal["image"] = "image"


ContentPart: TypeAlias = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str | Mapping[str, Any]  # OpenAI sends a JSON string; templates also take a mapping
    id: str | None = None

    def arguments_json(self) -> str:
        """The arguments as JSON text (as given when a string; templates' `tojson` otherwise)."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments), ensure_ascii=False)

    def arguments_dict(self) -> dict[str, Any]:
        """The arguments as a dict; raises MessageError when they are not a JSON object."""
        if isinstance(self.arguments, Mapping):
            return dict(self.arguments)
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError as exc:
            raise MessageError(f"tool call {self.name!r}: arguments are not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise MessageError(f"tool call {self.name!r}: arguments are not a JSON object")
        return value


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str | tuple[ContentPart, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning_content: str | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # Token ids this message was parsed from (a sampled assistant turn), when known.
    token_ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def parts(self) -> tuple[ContentPart, ...]:
        """Content as parts (a string is one text part; None is no part)."""
        if self.content is None:
            return ()
        if isinstance(self.content, str):
            return (TextPart(self.content),)
        return self.content

    @property
    def text(self) -> str:
        """The concatenated text of the content, images left out."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))


MessageLike: TypeAlias = "Message | Mapping[str, Any]"


def parse_messages(
    messages: Sequence[MessageLike], *, start_index: int = 0, after_assistant: bool = False
) -> list[Message]:
    """Validate and convert messages; see `validate_conversation` for the cross-message rules.

    `start_index` offsets the indices in error messages (used when the messages continue a
    conversation); `after_assistant` says the messages directly follow an assistant turn.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise MessageError(f"messages must be a list of messages, got {type(messages).__name__}")
    out = [parse_message(m, index=start_index + i) for i, m in enumerate(messages)]
    validate_conversation(out, start_index=start_index, after_assistant=after_assistant)
    return out


def parse_message(message: MessageLike, *, index: int | None = None) -> Message:
    if isinstance(message, Message):
        return message
    if not isinstance(message, Mapping):
        raise MessageError(f"a message must be an object, got {type(message).__name__}", index=index)
    role = message.get("role")
    if role not in ROLES:
        raise UnknownRoleError(
            f"unknown role {role!r} (expected one of {', '.join(ROLES)})", index=index, field="role"
        )
    content = _parse_content(message.get("content"), role, index)
    tool_calls = _parse_tool_calls(message.get("tool_calls"), role, index)
    reasoning = _optional_str(message, "reasoning_content", index)
    if reasoning is not None and role != "assistant":
        raise MessageError("only assistant messages carry reasoning_content", index=index,
                           field="reasoning_content")
    if content is None and role != "assistant":
        raise MessageError(f"a {role} message needs content", index=index, field="content")
    if content is None and not tool_calls and role == "assistant" and reasoning is None:
        raise MessageError("an assistant message needs content or tool_calls", index=index, field="content")
    tool_call_id = _optional_str(message, "tool_call_id", index)
    name = _optional_str(message, "name", index)
    return Message(
        role=role,
        content=content,
        tool_calls=tool_calls,
        reasoning_content=reasoning,
        tool_call_id=tool_call_id if role == "tool" else None,
        name=name,
    )


def validate_conversation(
    messages: Sequence[Message], *, start_index: int = 0, after_assistant: bool = False
) -> None:
    """Cross-message rules: a tool message answers a preceding assistant tool call.

    A tool message must follow an assistant message (possibly through other tool messages)
    with no user or system message between. When it carries a `tool_call_id`, that id must be
    one of the preceding assistant's tool call ids.
    """
    open_ids: set[str] | None = set() if after_assistant else None
    open_calls = after_assistant
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_calls = True
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


def _optional_str(message: Mapping[str, Any], key: str, index: int | None) -> str | None:
    value = message.get(key)
    if value is None or isinstance(value, str):
        return value
    raise MessageError(f"must be a string, got {type(value).__name__}", index=index, field=key)


def _parse_content(content: Any, role: str, index: int | None) -> str | tuple[ContentPart, ...] | None:
    if content is None or isinstance(content, str):
        return content
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
    if isinstance(part, (TextPart, ImagePart)):
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
        return TextPart(text)
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise MessageError("image_url part has no url", index=index, field=f"{where}.image_url.url")
        return ImagePart(url)
    if kind == "image":
        for key in ("image", "url", "path"):
            source = part.get(key)
            if source is not None:
                break
        if source is None or (isinstance(source, (str, bytes)) and not source):
            raise MessageError("image part has no source (expected image, url or path)",
                               index=index, field=where)
        if not isinstance(source, (str, bytes, os.PathLike, Image.Image)):
            raise MessageError(
                f"image source must be a URL, path, bytes or PIL image, got {type(source).__name__}",
                index=index, field=f"{where}.image",
            )
        return ImagePart(source)
    raise MessageError(f"unknown content part type {kind!r} (expected text, image_url or image)",
                       index=index, field=f"{where}.type")


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
            out.append(call)
            continue
        if not isinstance(call, Mapping):
            raise MessageError("a tool call must be an object", index=index, field=where)
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise MessageError("function must be an object", index=index, field=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise MessageError("tool call has no function name", index=index, field=f"{where}.function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, Mapping)):
            raise MessageError("arguments must be a JSON string or an object",
                               index=index, field=f"{where}.function.arguments")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise MessageError("id must be a string", index=index, field=f"{where}.id")
        out.append(ToolCall(name=name, arguments=args, id=call_id))
    return tuple(out)


def message_to_dict(message: Message, *, image_repr: Any = None) -> dict[str, Any]:
    """An OpenAI-format dict of the message; images become `image_repr(part)` (default: dropped)."""
    out: dict[str, Any] = {"role": message.role}
    if isinstance(message.content, str) or message.content is None:
        out["content"] = message.content
    else:
        parts: list[dict[str, Any]] = []
        for p in message.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif image_repr is not None:
                parts.append(image_repr(p))
        out["content"] = parts
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        out["tool_calls"] = [
            {"type": "function", **({"id": c.id} if c.id else {}),
             "function": {"name": c.name, "arguments": c.arguments_json()}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out
