"""Hermes-style tool calls as the Qwen families write and read them (`<tool_call>` JSON blocks)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rollwire.messages import ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def tojson(value: Any) -> str:
    """JSON as HF chat templates' `tojson` filter writes it (no ASCII escaping, default separators)."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that declares the tools (without the im_start/im_end frame)."""
    return TOOLS_HEADER + "".join("\n" + tojson(dict(t)) for t in tools) + TOOLS_FOOTER


def format_tool_call(call: ToolCall) -> str:
    return f'{TOOL_CALL_OPEN}\n{{"name": "{call.name}", "arguments": {call.arguments_json()}}}\n{TOOL_CALL_CLOSE}'


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], str | None]:
    """Split `text` into (text outside the tool-call blocks, calls, error or None).

    A block that is unclosed, not JSON, or lacks a name makes the error; well-formed blocks
    are still returned.
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    for k, match in enumerate(_BLOCK.finditer(text)):
        body = match.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            errors.append(f"tool call {k}: not JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f"tool call {k}: no function name")
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                errors.append(f"tool call {k}: arguments are not JSON")
                continue
        if not isinstance(args, dict):
            errors.append(f"tool call {k}: arguments are not an object")
            continue
        calls.append(ToolCall(name=obj["name"], arguments=tojson(args), id=f"call_{k}"))
    outside = _BLOCK.sub("", text)
    if TOOL_CALL_OPEN in outside or TOOL_CALL_CLOSE in outside:
        errors.append("unclosed or unopened <tool_call> block")
    return outside, calls, "; ".join(errors) or None
