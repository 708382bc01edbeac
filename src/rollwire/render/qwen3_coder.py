"""The XML tool-call format of Qwen3.5/3.6 (vLLM's `qwen3_coder` parser):

```
<tool_call>
<function=NAME>
<parameter=KEY>
VALUE
</parameter>
</function>
</tool_call>
```

A value is written as the template writes it (objects and lists as JSON, everything else as
its string form) and read back as JSON where it parses as a non-string JSON value, else as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rollwire.messages import ToolCall
from rollwire.render.hermes import tojson

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
TOOLS_FOOTER = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified "
    "format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in "
    "natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer "
    "the question like normal with your current knowledge and do not tell the user about function calls\n"
    "</IMPORTANT>"
)

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTION = re.compile(r"\A\s*<function=([^>\n]+)>\n?(.*?)</function>\s*\Z", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that declares the tools (without the im_start/im_end frame)."""
    return TOOLS_HEADER + "".join("\n" + tojson(dict(t)) for t in tools) + TOOLS_FOOTER


def _value_text(value: Any) -> str:
    """A parameter value as the template's `tojson if mapping or list else string` writes it."""
    if isinstance(value, (dict, list)):
        return tojson(value)
    return str(value)  # Jinja's `string`: Python's str (True, None, 1.5)


def format_tool_call(call: ToolCall) -> str:
    args = json.loads(call.arguments_json())
    params = "".join(f"<parameter={k}>\n{_value_text(v)}\n</parameter>\n" for k, v in args.items())
    return f"{TOOL_CALL_OPEN}\n<function={call.name}>\n{params}</function>\n{TOOL_CALL_CLOSE}"


def _read_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return text if isinstance(value, str) else value


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], str | None]:
    """Split `text` into (text outside the tool-call blocks, calls, error or None)."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for k, match in enumerate(_BLOCK.finditer(text)):
        function = _FUNCTION.match(match.group(1).strip("\n"))
        if function is None:
            errors.append(f"tool call {k}: no <function=...> block")
            continue
        body = function.group(2)
        args = {name: _read_value(value) for name, value in _PARAMETER.findall(body)}
        if _PARAMETER.sub("", body).strip():
            errors.append(f"tool call {k}: text outside <parameter> blocks")
            continue
        calls.append(ToolCall(name=function.group(1), arguments=tojson(args), id=f"call_{k}"))
    outside = _BLOCK.sub("", text)
    if TOOL_CALL_OPEN in outside or TOOL_CALL_CLOSE in outside:
        errors.append("unclosed or unopened <tool_call> block")
    return outside, calls, "; ".join(errors) or None
