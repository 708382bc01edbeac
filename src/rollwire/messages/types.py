"""Chat message and content-part types (the OpenAI format), as immutable values.

Built by `rollwire.messages.parse` from dicts, or directly (then checked just as strictly there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from PIL import Image

from rollwire.errors import MessageError

__all__ = ["ROLES", "TEXT_TOOL_CALL_OPEN", "ContentPart", "ImagePart", "ImageSource", "Message", "MessageLike", "Role",
           "TextPart", "ToolCall", "makes_tool_calls"]

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

# Tool calls written as text: the Hermes block every built-in family uses (Qwen2-VL has no
# structured tool calls, so its conversations carry them in the assistant's content).
TEXT_TOOL_CALL_OPEN = "<tool_call>"


def makes_tool_calls(m: Message) -> bool:
    """Whether `m` is an assistant message that calls tools (structured, or a Hermes block in its text)."""
    return m.role == "assistant" and (bool(m.tool_calls) or TEXT_TOOL_CALL_OPEN in m.text)
