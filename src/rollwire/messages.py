"""Chat messages in the OpenAI format, as typed, validated, immutable values.

`parse_messages` accepts plain dicts (as they come from JSON or an environment) or `Message`
objects (checked just as strictly) and returns `Message`s; every problem raises `MessageError`
naming the message index and the field. Text must be valid Unicode (a lone surrogate is
refused, not replaced), tool call arguments a JSON object. `parse_tools` checks `tools`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from PIL import Image

from rollwire.errors import MessageError, ToolSpecError, UnknownRoleError

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

# Bounds nesting of tool arguments and tool specs (JSON has no natural depth; templates recurse).
MAX_JSON_DEPTH = 64


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
        open_calls = _makes_tool_calls(previous)
        open_ids = {c.id for c in previous.tool_calls if c.id is not None} if open_calls else None
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_calls = _makes_tool_calls(m)
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


def parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Validate the `tools` argument of a render: None, or a list of function specs.

    A spec is OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`
    or the bare function object (`{"name", ...}`) that chat templates also accept. Each must be
    JSON (no NaN, no lone surrogates, at most `MAX_JSON_DEPTH` deep), since templates print it
    with `tojson`. Returns shallow copies; raises `ToolSpecError` naming the entry.
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ToolSpecError(f"tools must be a list of function specs, got {type(tools).__name__}", field="tools")
    out: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, Mapping):
            raise ToolSpecError(f"a tool must be an object, got {type(tool).__name__}", field=where)
        kind = tool.get("type", "function")
        if kind != "function":
            raise ToolSpecError(f"unsupported tool type {kind!r} (expected 'function')", field=f"{where}.type")
        fn = tool.get("function", tool) if "function" in tool else tool
        if not isinstance(fn, Mapping):
            raise ToolSpecError(f"function must be an object, got {type(fn).__name__}", field=f"{where}.function")
        fn_where = f"{where}.function" if fn is not tool else where
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolSpecError("a function spec needs a non-empty string name", field=f"{fn_where}.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolSpecError(f"description must be a string, got {type(description).__name__}",
                                field=f"{fn_where}.description")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ToolSpecError(f"parameters must be an object (a JSON schema), got {type(parameters).__name__}",
                                field=f"{fn_where}.parameters")
        _check_json(tool, None, where, ToolSpecError)
        out.append(dict(tool))
    return out


# --- helpers --------------------------------------------------------------------------------


# Tool calls written as text: the Hermes block every built-in family uses (Qwen2-VL has no
# structured tool calls, so its conversations carry them in the assistant's content).
TEXT_TOOL_CALL_OPEN = "<tool_call>"


def _makes_tool_calls(m: Message) -> bool:
    return m.role == "assistant" and (bool(m.tool_calls) or TEXT_TOOL_CALL_OPEN in m.text)


def _role(role: Any, index: int | None) -> Role:
    if not isinstance(role, str) or role not in ROLES:
        raise UnknownRoleError(
            f"unknown role {role!r} (expected one of {', '.join(ROLES)})", index=index, field="role"
        )
    return role


def _check_text(text: str, index: int | None, field: str) -> str:
    """`text`, when it encodes as UTF-8; a lone surrogate (from JSON `"\\ud800"`) would pass here and
    crash the tokenizer or the codec later, so it is refused with its position."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MessageError(f"text holds a lone surrogate {text[exc.start]!r} at character {exc.start} "
                               "(not valid Unicode; it cannot be encoded)", index=index, field=field) from None
    return text


def _optional_str(value: Any, field: str, index: int | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _check_text(value, index, field)
    raise MessageError(f"must be a string, got {type(value).__name__}", index=index, field=field)


def _check_json(value: Any, index: int | None, field: str, error: type[MessageError] = MessageError) -> str:
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
        return _check_text(text, index, field)
    except MessageError as exc:
        raise error(exc.reason, index=index, field=field) from None


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
        _check_text(content, index, "content")
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
        return _check_text(content, index, "content")
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
        _check_text(part.text, index, f"{where}.text")
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
        return TextPart(_check_text(text, index, f"{where}.text"))
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise MessageError("image_url part has no url", index=index, field=f"{where}.image_url.url")
        return ImagePart(_check_text(url, index, f"{where}.image_url.url"))
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
        _check_text(source, index, f"{where}.image")
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
    _check_text(call.name, index, name_at)
    args = call.arguments
    if isinstance(args, str):
        _check_text(args, index, args_at)
        try:
            value = json.loads(args)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MessageError(f"arguments are not JSON: {exc}", index=index, field=args_at) from None
        if not isinstance(value, dict):
            raise MessageError(f"arguments must be a JSON object, got {type(value).__name__}", index=index,
                               field=args_at)
        _check_json(value, index, args_at)
    elif isinstance(args, Mapping):
        _check_json(args, index, args_at)
    else:
        raise MessageError(f"arguments must be a JSON object (text or mapping), got {type(args).__name__}",
                           index=index, field=args_at)
    if call.id is not None:
        if not isinstance(call.id, str):
            raise MessageError(f"id must be a string, got {type(call.id).__name__}", index=index, field=id_at)
        _check_text(call.id, index, id_at)
    return call


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
