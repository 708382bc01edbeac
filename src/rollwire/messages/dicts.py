"""Messages back to OpenAI-format dicts (what chat templates and JSONL rows take)."""

from __future__ import annotations

from typing import Any

from rollwire.messages.types import Message, TextPart

__all__ = ["message_to_dict"]


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
