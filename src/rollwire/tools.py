"""Tools from plain functions: `@tool` reads the schema off the signature, type hints and docstring.

A `Tool` gives its OpenAI function spec (`spec`, for `Observation.tools`) and answers a
`ToolCall` with a tool message (`respond`): the arguments are validated against the signature
first, and a bad call (unknown tool, arguments that are not JSON or do not fit) gets an error
message back as the tool result, so the model can correct itself and the rollout goes on. A
tool may return text, JSON-able values, a PIL image, an image part, or a list of those: images
come back to the model as image parts of the tool message. Sync tools run in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_type_hints

import pydantic
from PIL import Image

from rollwire.errors import ToolArgumentsError, ToolDefinitionError, ToolError
from rollwire.messages import ContentPart, ImagePart, Message, TextPart, ToolCall

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns?|Raises|Yields?|Examples?|Notes?|See Also)\s*:\s*$")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ARG = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class Tool:
    """A function the model may call; build it with `@tool`. On a class, `@tool` methods bind
    to the instance (`self.crop` is a `Tool` whose function sees `self`)."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                 _bound: Any = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME.fullmatch(self.name):
            raise ToolDefinitionError(f"tool name {self.name!r}: use 1-64 letters, digits, _ or - (OpenAI's rule)")
        summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
        self.description = description if description is not None else summary
        self._bound = _bound
        params = list(inspect.signature(fn).parameters.values())
        self._method = bool(params) and params[0].name == "self"
        self._params = params[1:] if self._method else params
        self._model = _arguments_model(fn, self.name, self._params, arg_docs)
        self.parameters: dict[str, Any] = _clean_schema(self._model.model_json_schema())
        functools.update_wrapper(self, fn)

    def __get__(self, instance: Any, owner: type | None = None) -> Tool:
        if instance is None or not self._method:
            return self
        bound = object.__new__(Tool)
        bound.__dict__.update(self.__dict__)
        bound._bound = instance
        return bound

    @property
    def spec(self) -> dict[str, Any]:
        """The OpenAI function spec: `{"type": "function", "function": {name, description, parameters}}`."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: str | Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the function, or `ToolArgumentsError` saying what does not fit."""
        try:
            args = ToolCall(self.name, arguments).arguments_dict()
        except Exception as exc:  # not JSON, not an object
            raise ToolArgumentsError(str(exc)) from None
        try:
            model = self._model.model_validate(args)
        except pydantic.ValidationError as exc:
            problems = ["{}: {}".format(".".join(map(str, e["loc"])) or "arguments", e["msg"])
                        for e in exc.errors(include_url=False)]
            raise ToolArgumentsError(f"invalid arguments for {self.name}: " + "; ".join(problems)) from None
        return {p.name: getattr(model, f"p{k}") for k, p in enumerate(self._params)}

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function (sync ones in a worker thread) and return what it returns."""
        if self._method:
            if self._bound is None:
                raise ToolDefinitionError(f"tool {self.name} is a method: call it on an instance")
            args = (self._bound, *args)
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(*args, **kwargs)
        return await asyncio.to_thread(self.fn, *args, **kwargs)

    async def respond(self, call: ToolCall, *, errors_to_model: bool = False) -> Message:
        """The tool message answering `call`. Bad arguments and a `ToolError` the tool raises become
        the message's text ("error: ..."); other exceptions propagate (a bug in the tool ends the
        rollout as an `env_error`, recorded) unless `errors_to_model` sends them to the model too."""
        try:
            result = await self(**self.validate(call.arguments))
        except ToolError as exc:
            return Message(role="tool", tool_call_id=call.id, content=f"error: {exc}")
        except Exception as exc:
            if not errors_to_model:
                raise ToolError(f"tool {self.name} raised {type(exc).__name__}: {exc}") from exc
            return Message(role="tool", tool_call_id=call.id, content=f"error: {type(exc).__name__}: {exc}")
        return Message(role="tool", tool_call_id=call.id, content=tool_content(result))


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Decorate a function (or method) as a `Tool`: `@tool` or `@tool(name=..., description=...)`.

    Parameters need JSON-schema-able type hints (str, int, float, bool, lists, tuples, dicts,
    Literal, Enum, Optional, pydantic models, `Annotated[..., pydantic.Field(...)]`); defaults make
    them optional. The docstring's first part is the description; its Google-style `Args:`
    section describes the parameters.
    """
    if fn is None:
        return lambda f: Tool(f, name=name, description=description)
    return Tool(fn, name=name, description=description)


async def run_tool_calls(message: Message, tools: Sequence[Tool], *,
                         errors_to_model: bool = False) -> list[Message]:
    """One tool message per tool call of `message`, in order, each from the tool named by the call;
    a call to an unknown tool is answered with an error naming the tools there are."""
    by_name = {t.name: t for t in tools}
    out = []
    for call in message.tool_calls:
        found = by_name.get(call.name)
        if found is None:
            out.append(Message(role="tool", tool_call_id=call.id, content=(
                f"error: unknown tool {call.name!r} (available: {', '.join(sorted(by_name)) or 'none'})")))
            continue
        out.append(await found.respond(call, errors_to_model=errors_to_model))
    return out


def tool_content(result: Any) -> str | tuple[ContentPart, ...]:
    """A tool's return value as tool-message content: text stays text, images become image parts,
    a list mixes both; anything else is written as JSON."""
    if isinstance(result, str):
        return result
    if isinstance(result, (Image.Image, ImagePart, TextPart)):
        return (_part(result),)
    if isinstance(result, (list, tuple)) and result and any(
            isinstance(r, (Image.Image, ImagePart, TextPart)) for r in result):
        return tuple(_part(r) for r in result)
    try:
        return json.dumps(result, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"a tool returned {type(result).__name__}, which is neither text, an image nor JSON: "
                        f"{exc}") from None


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, parameter descriptions) of a Google-style docstring."""
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    indent = 0
    for line in doc.splitlines():
        head = _SECTION.match(line)
        if head:
            section, current = head.group(1), None
            continue
        if section is None:
            summary.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            width = len(line) - len(line.lstrip())
            arg = _ARG.match(line)
            if arg and (current is None or width <= indent):
                current, indent = arg.group(1).lstrip("*"), width
                args[current] = arg.group(2).strip()
            elif current is not None:
                args[current] = f"{args[current]} {line.strip()}".strip()
    return "\n".join(summary).strip(), args


def _part(value: Any) -> ContentPart:
    if isinstance(value, (ImagePart, TextPart)):
        return value
    if isinstance(value, Image.Image):
        return ImagePart(value)
    if isinstance(value, str):
        return TextPart(value)
    raise ToolError(f"a tool returned a list holding {type(value).__name__}: only text and images mix")


def _arguments_model(fn: Callable[..., Any], name: str, params: Sequence[inspect.Parameter],
                     docs: Mapping[str, str]) -> type[pydantic.BaseModel]:
    """A pydantic model of the parameters (fields aliased to the parameter names, so any name works)."""
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise ToolDefinitionError(f"tool {name}: its type hints cannot be resolved: {exc}") from None
    fields: dict[str, Any] = {}
    for k, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolDefinitionError(f"tool {name}: parameter {p.name} must be a plain or keyword parameter")
        if p.name not in hints:
            raise ToolDefinitionError(f"tool {name}: parameter {p.name} needs a type hint")
        default = ... if p.default is p.empty else p.default
        fields[f"p{k}"] = (hints[p.name], pydantic.Field(default, alias=p.name, description=docs.get(p.name)))
    try:
        model = pydantic.create_model(name, __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        model.model_json_schema()
    except Exception as exc:  # a type without a JSON schema (a PIL image, a callable...)
        raise ToolDefinitionError(f"tool {name}: its parameters have no JSON schema: {exc}") from None
    return model


def _clean_schema(node: Any) -> Any:
    """pydantic's schema without `title`s (noise in the prompt); a fixed-length tuple of one type
    becomes `items` + `minItems`/`maxItems`, which every template and model knows."""
    if isinstance(node, list):
        return [_clean_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key in ("properties", "$defs"):
            out[key] = {k: _clean_schema(v) for k, v in value.items()}
        else:
            out[key] = _clean_schema(value)
    prefix = out.get("prefixItems")
    if isinstance(prefix, list) and prefix and all(p == prefix[0] for p in prefix) and "items" not in out:
        del out["prefixItems"]
        out["items"] = prefix[0]
    return out
