"""`@tool`: schemas from signatures and docstrings, dispatch by name, errors the model hears, images back."""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Literal

import pydantic
import pytest
from PIL import Image

from rollwire.errors import ToolArgumentsError, ToolDefinitionError, ToolError
from rollwire.messages import ImagePart, Message, TextPart, ToolCall, parse_tools
from rollwire.tools import Tool, parse_docstring, run_tool_calls, tool

CALLS: list[tuple[str, object]] = []


@tool
def search(query: str, limit: int = 3, mode: Literal["fast", "exact"] = "fast", tags: list[str] | None = None,
           point: tuple[float, float] = (0.0, 0.0)) -> str:
    """Search the notes.

    Longer explanation that is part of the description.

    Args:
        query: What to look for,
            across several lines.
        limit (int): How many results at most.
        mode: Search mode.
        tags: Only notes with these tags.

    Returns:
        The matching notes, one per line.
    """
    CALLS.append(("search", threading.current_thread().name))
    return f"{limit} results for {query!r} ({mode})"


@tool(name="picture", description="A red square of the given side.")
async def make_picture(side: int) -> Image.Image:
    CALLS.append(("picture", side))
    await asyncio.sleep(0)
    return Image.new("RGB", (side, side), "red")


def test_schema_from_signature_hints_and_docstring() -> None:
    assert search.spec == {"type": "function", "function": {
        "name": "search",
        "description": "Search the notes.\n\nLonger explanation that is part of the description.",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["query"],
            "properties": {
                "query": {"type": "string", "description": "What to look for, across several lines."},
                "limit": {"type": "integer", "default": 3, "description": "How many results at most."},
                "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast", "description": "Search mode."},
                "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                         "default": None, "description": "Only notes with these tags."},
                "point": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2,
                          "default": [0.0, 0.0]},
            },
        }}}
    assert parse_tools([search.spec, make_picture.spec])  # what a renderer accepts
    assert make_picture.spec["function"]["name"] == "picture"
    assert make_picture.spec["function"]["description"] == "A red square of the given side."


def test_google_docstring_sections() -> None:
    summary, args = parse_docstring("Do it.\n\nArgs:\n    a: first\n    *rest: the others\n\nRaises:\n    X: no")
    assert summary == "Do it." and args == {"a": "first", "rest": "the others"}


async def test_dispatch_by_name_sync_in_a_thread_async_awaited_and_images_come_back() -> None:
    CALLS.clear()
    message = Message(role="assistant", tool_calls=(
        ToolCall("search", '{"query": "cats", "limit": 2}', id="c1"),
        ToolCall("picture", {"side": 8}, id="c2"),
        ToolCall("rotate", "{}", id="c3"),
    ))
    out = await run_tool_calls(message, [search, make_picture])
    assert [m.role for m in out] == ["tool"] * 3 and [m.tool_call_id for m in out] == ["c1", "c2", "c3"]
    assert out[0].content == "2 results for 'cats' (fast)"
    assert isinstance(out[1].content, tuple) and isinstance(out[1].content[0], ImagePart)
    image = out[1].content[0].image
    assert isinstance(image, Image.Image) and image.size == (8, 8)
    assert out[2].content == "error: unknown tool 'rotate' (available: picture, search)"
    assert CALLS[0][0] == "search" and CALLS[0][1] != threading.current_thread().name  # ran off the loop
    assert CALLS[1] == ("picture", 8)


@pytest.mark.parametrize(("arguments", "needle"), [
    ('{"limit": 2}', "query: Field required"),
    ('{"query": "x", "limit": "many"}', "limit: Input should be a valid integer"),
    ('{"query": "x", "mode": "slow"}', "mode: Input should be 'fast' or 'exact'"),
    ('{"query": "x", "colour": "red"}', "colour: Extra inputs are not permitted"),
    ('{"query": "x", "point": [1, 2, 3]}', "point: Tuple should have at most 2 items"),
    ("{query: x}", "arguments are not JSON"),
    ("[1, 2]", "arguments are not a JSON object"),
])
async def test_bad_arguments_are_answered_with_an_error_and_the_tool_does_not_run(arguments: str,
                                                                                   needle: str) -> None:
    CALLS.clear()
    reply = await search.respond(ToolCall("search", arguments, id="x"))
    assert reply.role == "tool" and reply.tool_call_id == "x"
    assert isinstance(reply.content, str) and reply.content.startswith("error: ") and needle in reply.content
    assert CALLS == []
    with pytest.raises(ToolArgumentsError):
        search.validate(arguments)


class Canvas:
    def __init__(self) -> None:
        self.image = Image.new("RGB", (20, 10), "white")
        self.crops = 0

    @tool
    def crop(self, box: Annotated[list[int], pydantic.Field(min_length=4, max_length=4)]) -> list[object]:
        """Crop the canvas.

        Args:
            box: left, top, right, bottom.
        """
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ToolError(f"box {box} is empty")
        self.crops += 1
        return ["the crop:", self.image.crop(tuple(box))]

    @tool
    def broken(self) -> str:
        """Always fails."""
        raise KeyError("a bug in the tool")


async def test_method_tools_bind_to_their_instance_and_tool_errors_reach_the_model() -> None:
    a, b = Canvas(), Canvas()
    assert isinstance(a.crop, Tool) and "self" not in a.crop.parameters["properties"]
    assert a.crop.parameters["properties"]["box"]["minItems"] == 4
    reply = await a.crop.respond(ToolCall("crop", '{"box": [0, 0, 5, 4]}'))
    assert isinstance(reply.content, tuple) and reply.content[0] == TextPart("the crop:")
    crop = reply.content[1]
    assert isinstance(crop, ImagePart) and isinstance(crop.image, Image.Image) and crop.image.size == (5, 4)
    assert (a.crops, b.crops) == (1, 0)
    empty = await a.crop.respond(ToolCall("crop", '{"box": [5, 0, 5, 4]}'))
    assert empty.content == "error: box [5, 0, 5, 4] is empty" and a.crops == 1


async def test_a_bug_in_a_tool_is_loud_unless_sent_to_the_model() -> None:
    canvas = Canvas()
    with pytest.raises(ToolError, match="tool broken raised KeyError"):
        await canvas.broken.respond(ToolCall("broken", "{}"))
    reply = await canvas.broken.respond(ToolCall("broken", "{}"), errors_to_model=True)
    assert reply.content == "error: KeyError: 'a bug in the tool'"


async def test_return_values_become_tool_content() -> None:
    @tool
    def data(k: int) -> object:
        """JSON-able values are written as JSON."""
        return {"k": k, "squares": [k * k]}

    @tool
    def part(k: int) -> ImagePart:
        """An image part is passed through."""
        return ImagePart("file.png")

    @tool
    def opaque(k: int) -> object:
        """Something that is neither text, image nor JSON."""
        return object()

    assert (await data.respond(ToolCall("data", {"k": 3}))).content == '{"k": 3, "squares": [9]}'
    assert (await part.respond(ToolCall("part", {"k": 3}))).content == (ImagePart("file.png"),)
    with pytest.raises(ToolError, match="neither text, an image nor JSON"):
        await opaque.respond(ToolCall("opaque", {"k": 3}))


def test_functions_that_cannot_be_tools_are_refused_when_decorated() -> None:
    def no_hint(x):  # type: ignore[no-untyped-def]
        return x

    def picture_param(image: Image.Image) -> str:
        return ""

    def star(*args: int) -> str:
        return ""

    with pytest.raises(ToolDefinitionError, match="parameter x needs a type hint"):
        tool(no_hint)
    with pytest.raises(ToolDefinitionError, match="no JSON schema"):
        tool(picture_param)
    with pytest.raises(ToolDefinitionError, match="plain or keyword parameter"):
        tool(star)
    with pytest.raises(ToolDefinitionError, match="tool name 'look around'"):
        tool(name="look around")(picture_param)
