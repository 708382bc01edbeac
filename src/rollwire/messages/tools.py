"""The `tools` argument of a render: None, or a list of OpenAI function specs, checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rollwire.errors import ToolSpecError
from rollwire.messages.text import check_json

__all__ = ["parse_tools"]


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
        check_json(tool, None, where, ToolSpecError)
        out.append(dict(tool))
    return out
