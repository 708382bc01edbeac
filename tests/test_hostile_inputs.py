"""Hostile inputs, tried as an attacker or a careless user would: special files and escaping
paths as images, trickling image servers, malformed messages and tools through every public
entry, broken messages files on the command line, and idle or trickling clients of `rollwire serve`.

Every case must end in a typed `rollwire.errors` error (or be handled), quickly: nothing blocks.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from rollwire.cli import MAX_MESSAGES_FILE_BYTES, app, load_messages_file
from rollwire.errors import (
    ImageError,
    ImageNotFoundError,
    ImageNotRegularFileError,
    ImagePathNotAllowedError,
    ImageSourceError,
    MessageError,
    MessagesFileError,
    RemoteImageTimeoutError,
    RollwireError,
    ToolSpecError,
    UnknownRoleError,
)
from rollwire.images import ImageLimits, load_image
from rollwire.messages import ImagePart, Message, TextPart, ToolCall, parse_messages, parse_tools

POSIX = pytest.mark.skipif(os.name != "posix", reason="FIFOs, sockets and devices are POSIX")


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def finishes(fn: Callable[[], Any], seconds: float) -> BaseException | None:
    """Run `fn` in a thread; fail the test if it does not finish in time. Returns what it raised."""
    box: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            box[0] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return box[0]


# --- images: only regular files ----------------------------------------------------------------


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "pipe.png")
    return str(tmp / "pipe.png")


def _socket_file(tmp: Path) -> str:
    path = f"/tmp/rw-{os.getpid()}-{time.monotonic_ns()}.sock"  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    _KEEP.append(sock)
    return path


def _symlink_to_fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "pipe")
    os.symlink(tmp / "pipe", tmp / "link.png")
    return str(tmp / "link.png")


_KEEP: list[socket.socket] = []

SPECIAL_FILES: dict[str, Callable[[Path], Any]] = {
    "fifo": _fifo,
    "fifo as file:// URL": lambda tmp: Path(_fifo(tmp)).as_uri(),
    "fifo as PathLike": lambda tmp: Path(_fifo(tmp)),
    "symlink to a fifo": _symlink_to_fifo,
    "unix socket": _socket_file,
    "directory": lambda tmp: str(tmp),
    "/dev/null": lambda tmp: "/dev/null",
    "/dev/zero": lambda tmp: "/dev/zero",
    "/dev/urandom": lambda tmp: "/dev/urandom",
}


@POSIX
@pytest.mark.parametrize("kind", list(SPECIAL_FILES))
def test_special_files_are_refused_at_once(tmp_path: Path, kind: str) -> None:
    source = SPECIAL_FILES[kind](tmp_path)
    try:
        exc = finishes(lambda: load_image(source), 5.0)
    finally:
        for sock in _KEEP:
            sock.close()
        _KEEP.clear()
    assert isinstance(exc, ImageNotRegularFileError), repr(exc)
    assert "not a regular file" in str(exc)


@POSIX
def test_dev_stdin_is_refused_when_it_is_not_a_regular_file() -> None:
    if stat.S_ISREG(os.stat("/dev/stdin").st_mode):
        pytest.skip("stdin is redirected from a regular file here")
    exc = finishes(lambda: load_image("/dev/stdin"), 5.0)
    assert isinstance(exc, ImageNotRegularFileError)


@POSIX
def test_fifo_with_confinement_is_refused_too(tmp_path: Path) -> None:
    source = _fifo(tmp_path)
    exc = finishes(lambda: load_image(source, ImageLimits(allowed_roots=(str(tmp_path),))), 5.0)
    assert isinstance(exc, ImageNotRegularFileError)


# --- images: confinement to allowed roots ------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """allowed/ (with an image and links) beside outside/ (with a secret image), and allowed2/."""
    allowed, outside, allowed2, sibling = (tmp_path / n for n in ("allowed", "outside", "allowed2", "allowedx"))
    for folder in (allowed, outside, allowed2, sibling, allowed / "sub"):
        folder.mkdir()
    data = png_bytes()
    for folder in (allowed, outside, allowed2, sibling, allowed / "sub"):
        (folder / "img.png").write_bytes(data)
    os.symlink(outside / "img.png", allowed / "out-link.png")
    os.symlink(outside, allowed / "out-dir")
    os.symlink(allowed / "sub" / "img.png", allowed / "in-link.png")
    return {"allowed": allowed, "outside": outside, "allowed2": allowed2, "sibling": sibling}


def _escape_sources(r: dict[str, Path]) -> dict[str, Any]:
    a, o = r["allowed"], r["outside"]
    return {
        "../ escape": str(a / ".." / "outside" / "img.png"),
        "deep ../ escape": str(a / "sub" / ".." / ".." / "outside" / "img.png"),
        "absolute path outside": str(o / "img.png"),
        "symlinked file pointing out": str(a / "out-link.png"),
        "symlinked folder pointing out": str(a / "out-dir" / "img.png"),
        "file:// URL outside": (o / "img.png").as_uri(),
        "file:// URL with ../": "file://" + str(a) + "/../outside/img.png",
        "PathLike outside": o / "img.png",
        "sibling with the root as name prefix": str(r["sibling"] / "img.png"),
        "/etc/passwd": "/etc/passwd",
        "root folder itself": str(a),
    }


ESCAPES = ["../ escape", "deep ../ escape", "absolute path outside", "symlinked file pointing out",
           "symlinked folder pointing out", "file:// URL outside", "file:// URL with ../", "PathLike outside",
           "sibling with the root as name prefix", "/etc/passwd"]


@pytest.mark.parametrize("case", ESCAPES)
def test_paths_outside_the_allowed_roots_are_refused(roots: dict[str, Path], case: str) -> None:
    source = _escape_sources(roots)[case]
    limits = ImageLimits(allowed_roots=(str(roots["allowed"]),))
    with pytest.raises(ImagePathNotAllowedError) as info:
        load_image(source, limits)
    assert isinstance(info.value, ImageSourceError) and "outside the allowed folders" in str(info.value)
    load_image(source if case != "/etc/passwd" else str(roots["outside"] / "img.png"))  # no roots: readable


@pytest.mark.parametrize("name", ["img.png", "sub/img.png", "in-link.png", "sub/../img.png"])
def test_paths_inside_the_allowed_roots_load(roots: dict[str, Path], name: str) -> None:
    limits = ImageLimits(allowed_roots=(roots["allowed"],))  # a Path is accepted as a root
    assert load_image(str(roots["allowed"] / name), limits).size == (8, 8)


def test_a_second_root_allows_its_files(roots: dict[str, Path]) -> None:
    limits = ImageLimits(allowed_roots=(str(roots["allowed"]), str(roots["allowed2"])))
    assert load_image(str(roots["allowed2"] / "img.png"), limits).size == (8, 8)
    with pytest.raises(ImagePathNotAllowedError):
        load_image(str(roots["outside"] / "img.png"), limits)


def test_a_relative_path_resolves_from_the_working_directory(roots: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(roots["outside"])
    with pytest.raises(ImagePathNotAllowedError):
        load_image("img.png", ImageLimits(allowed_roots=(str(roots["allowed"]),)))
    monkeypatch.chdir(roots["allowed"])
    assert load_image("img.png", ImageLimits(allowed_roots=(str(roots["allowed"]),))).size == (8, 8)


def test_a_missing_file_inside_the_root_is_not_found(roots: dict[str, Path]) -> None:
    with pytest.raises(ImageNotFoundError):
        load_image(str(roots["allowed"] / "nope.png"), ImageLimits(allowed_roots=(str(roots["allowed"]),)))


@pytest.mark.parametrize("bad", [["/definitely/not/here"], [5], [b"/tmp"]])
def test_bad_roots_are_refused(bad: list[Any]) -> None:
    with pytest.raises(ImageError):
        ImageLimits(allowed_roots=tuple(bad))


def test_nul_byte_in_a_path_is_a_source_error(roots: dict[str, Path]) -> None:
    for limits in (ImageLimits(), ImageLimits(allowed_roots=(str(roots["allowed"]),))):
        with pytest.raises(ImageSourceError):
            load_image(str(roots["allowed"] / "img.png") + "\x00.png", limits)


# --- images: a remote fetch has one total deadline ---------------------------------------------


class TrickleServer:
    """A raw socket server on 127.0.0.1 that answers every connection one byte every 0.2 s
    (`mode`: 'headers' never finishes the header block, 'body' sends full headers then a slow
    body, 'silent' reads the request and never answers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/img.png"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
                if self.mode == "headers":
                    data = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"a" * 10_000
                elif self.mode == "body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
                    data = png_bytes() + b"\0" * 10_000
                else:
                    data = b""
                for k in range(len(data) or 10_000):
                    if self.stop.wait(0.2):
                        return
                    if data:
                        conn.sendall(data[k:k + 1])
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2)


@pytest.mark.parametrize("in_event_loop", [False, True], ids=["sync", "inside a running loop"])
@pytest.mark.parametrize("mode", ["headers", "body", "silent"])
def test_a_trickling_image_server_is_cut_at_the_total_deadline(mode: str, in_event_loop: bool) -> None:
    server = TrickleServer(mode)
    limits = ImageLimits(allow_remote=True, remote_timeout=1.0)
    try:
        start = time.monotonic()
        if in_event_loop:
            async def main() -> None:
                load_image(server.url, limits)

            exc = finishes(lambda: asyncio.run(main()), 5.0)
        else:
            exc = finishes(lambda: load_image(server.url, limits), 5.0)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert isinstance(exc, RemoteImageTimeoutError), repr(exc)
    assert "total deadline of 1.0s" in str(exc)
    assert 0.9 < elapsed < 2.0, elapsed


def test_a_fast_remote_image_still_loads() -> None:
    data = png_bytes((5, 7))

    sock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        image = load_image(f"http://127.0.0.1:{sock.getsockname()[1]}/x.png",
                           ImageLimits(allow_remote=True, remote_timeout=5.0))
    finally:
        thread.join(5)
        sock.close()
    assert image.size == (5, 7)


# --- messages: every public entry validates ----------------------------------------------------

S = "\ud800"  # a lone surrogate: valid in a Python str, not in UTF-8

BAD_MESSAGES: dict[str, tuple[list[Any], type[Exception], str]] = {
    # lone surrogates, wherever text goes
    "surrogate in content": ([{"role": "user", "content": f"a{S}"}], MessageError,
                             "messages[0].content: text holds a lone surrogate '\\ud800' at character 1"),
    "surrogate in a text part": ([{"role": "user", "content": [{"type": "text", "text": S}]}], MessageError,
                                 "messages[0].content[0].text: text holds a lone surrogate"),
    "surrogate in reasoning": ([{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a", "reasoning_content": "r" + S}],
                               MessageError, "messages[1].reasoning_content: text holds a lone surrogate"),
    "surrogate in name": ([{"role": "user", "content": "q", "name": S}], MessageError,
                          "messages[0].name: text holds a lone surrogate"),
    "surrogate in tool_call_id": ([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "f"}}]}, {"role": "tool", "tool_call_id": S, "content": "r"}],
        MessageError, "messages[1].tool_call_id: text holds a lone surrogate"),
    "surrogate in a tool call name": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f" + S}}]}], MessageError, "messages[0].tool_calls[0].function.name: text holds"),
    "surrogate in tool call arguments": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": "' + S + '"}'}}]}], MessageError,
        "messages[0].tool_calls[0].function.arguments: text holds a lone surrogate"),
    "surrogate in mapping arguments": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": S}}}]}], MessageError,
        "messages[0].tool_calls[0].function.arguments: text holds a lone surrogate"),
    "surrogate in a mapping key": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {S: 1}}}]}], MessageError, "function.arguments: text holds"),
    "surrogate in an image url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": S}}]}],
                                  MessageError, "messages[0].content[0].image_url.url: text holds"),
    "surrogate in an image path": ([{"role": "user", "content": [{"type": "image", "image": "a" + S}]}],
                                   MessageError, "messages[0].content[0].image: text holds"),
    "surrogate in a Message": ([Message(role="user", content=S)], MessageError, "messages[0].content: text holds"),
    # Message objects built directly
    "Message with an unknown role": ([Message(role="wizard", content="x")], UnknownRoleError,  # type: ignore[arg-type]
                                     "messages[0].role: unknown role 'wizard'"),
    "Message with an int role": ([Message(role=5, content="x")], UnknownRoleError,  # type: ignore[arg-type]
                                 "messages[0].role: unknown role 5"),
    "Message with int content": ([Message(role="user", content=5)], MessageError,  # type: ignore[arg-type]
                                 "messages[0].content: content must be a string or a list of parts, got int"),
    "Message with None content": ([Message(role="user", content=None)], MessageError,
                                  "messages[0].content: a user message needs content"),
    "Message with an int part": ([Message(role="user", content=(5,))], MessageError,  # type: ignore[arg-type]
                                 "messages[0].content[0]: a content part must be an object, got int"),
    "Message with an int TextPart": ([Message(role="user", content=(TextPart(5),))], MessageError,  # type: ignore[arg-type]
                                     "messages[0].content[0].text: text must be a string, got int"),
    "Message with an int ImagePart": ([Message(role="user", content=(ImagePart(5),))], MessageError,  # type: ignore[arg-type]
                                      "messages[0].content[0].image: image source must be"),
    "Message with an empty ImagePart": ([Message(role="user", content=(ImagePart(""),))], MessageError,
                                        "messages[0].content[0]: image part has no source"),
    "system Message with an image": ([Message(role="system", content=(ImagePart(b"x"),))], MessageError,
                                     "system messages cannot hold images"),
    "Message with an int name": ([Message(role="user", content="x", name=5)], MessageError,  # type: ignore[arg-type]
                                 "messages[0].name: must be a string, got int"),
    "user Message with reasoning": ([Message(role="user", content="x", reasoning_content="r")], MessageError,
                                    "only assistant messages carry reasoning_content"),
    "user Message with tool calls": ([Message(role="user", content="x", tool_calls=(ToolCall("f", "{}"),))],
                                     MessageError, "only assistant messages carry tool_calls"),
    "Message with tool_calls as a string": ([Message(role="assistant", content="x", tool_calls="f")],  # type: ignore[arg-type]
                                            MessageError, "messages[0].tool_calls: tool_calls must be a list"),
    "Message with an int tool call name": ([Message(role="assistant", tool_calls=(ToolCall(5, "{}"),))],  # type: ignore[arg-type]
                                           MessageError, "messages[0].tool_calls[0].name: tool call has no function"),
    "Message with list arguments": ([Message(role="assistant", tool_calls=(ToolCall("f", "[1]"),))], MessageError,
                                    "messages[0].tool_calls[0].arguments: arguments must be a JSON object, got list"),
    "Message with non-JSON arguments": ([Message(role="assistant", tool_calls=(ToolCall("f", "{bad"),))],
                                        MessageError, "messages[0].tool_calls[0].arguments: arguments are not JSON"),
    "Message with int arguments": ([Message(role="assistant", tool_calls=(ToolCall("f", 5),))],  # type: ignore[arg-type]
                                   MessageError, "arguments must be a JSON object (text or mapping), got int"),
    "Message with bad token ids": ([Message(role="assistant", content="x", token_ids=(1, -1))], MessageError,
                                   "messages[0].token_ids: token_ids must be a tuple of non-negative ints"),
    "Message with bool token ids": ([Message(role="assistant", content="x", token_ids=(True,))], MessageError,
                                    "messages[0].token_ids"),
    # tool call arguments and names in dicts
    **{f"arguments {text}": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": text}}]}], MessageError,
        "messages[0].tool_calls[0].function.arguments: arguments must be a JSON object")
       for text in ['"a string"', "[1, 2]", "3", "null", "true"]},
    "arguments not JSON": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{'a': 1}"}}]}], MessageError, "arguments are not JSON"),
    "arguments holding a set": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": {1, 2}}}}]}], MessageError, "not JSON-serialisable"),
    "arguments holding NaN": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": float("nan")}}}]}], MessageError, "not JSON-serialisable"),
    "arguments nested 200 deep": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": json.loads('{"a": ' * 200 + "1" + "}" * 200)}}]}], MessageError,
        "nested deeper than 64 levels"),
    "arguments text nested 100000 deep": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"}}]}], MessageError,
        "function.arguments"),
    "tool call name an int": ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 5}}]}],
                              MessageError, "messages[0].tool_calls[0].function.name: tool call has no function name"),
    "tool call name empty": ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": ""}}]}],
                             MessageError, "function.name"),
    "tool call id an int": ([{"role": "assistant", "content": "", "tool_calls": [
        {"id": 5, "function": {"name": "f"}}]}], MessageError, "messages[0].tool_calls[0].id: id must be a string"),
    # conversation rules
    "tool after a plain assistant": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                      {"role": "tool", "content": "r"}], MessageError,
                                     "messages[2].role: tool message does not follow an assistant tool call"),
    "tool after a plain assistant Message": ([Message(role="user", content="q"),
                                              Message(role="assistant", content="a"),
                                              Message(role="tool", content="r")], MessageError, "messages[2].role"),
    "second tool after a user turn": ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f"}}]}, {"role": "tool", "content": "r"}, {"role": "user", "content": "q"},
        {"role": "tool", "content": "r"}], MessageError, "messages[3].role"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_messages_raise_typed_errors(case: str) -> None:
    messages, error, needle = BAD_MESSAGES[case]
    with pytest.raises(error) as info:
        parse_messages(messages)
    assert needle in str(info.value)


def test_a_tool_result_after_a_plain_assistant_is_refused_when_continuing() -> None:
    plain, calling = Message(role="assistant", content="a"), Message(
        role="assistant", tool_calls=(ToolCall("f", "{}", id="c1"),))
    with pytest.raises(MessageError, match=r"messages\[4\].role"):
        parse_messages([{"role": "tool", "content": "r"}], start_index=4, previous=plain)
    assert parse_messages([{"role": "tool", "content": "r"}], start_index=4, previous=calling)[0].role == "tool"
    with pytest.raises(MessageError, match="tool_call_id 'c9'"):
        parse_messages([{"role": "tool", "tool_call_id": "c9", "content": "r"}], previous=calling)
    after_tool = parse_messages([{"role": "tool", "content": "r2"}], previous=Message(role="tool", content="r1"))
    assert after_tool[0].content == "r2"


def test_tool_calls_written_as_text_open_a_tool_turn() -> None:
    """Qwen2-VL conversations carry tool calls in the assistant's text (Hermes blocks)."""
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    msgs = parse_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": call},
                           {"role": "tool", "content": "r"}])
    assert [m.role for m in msgs] == ["user", "assistant", "tool"]


def test_valid_message_objects_are_returned_as_they_are() -> None:
    image = Image.new("RGB", (4, 4))
    given = [Message(role="user", content=(TextPart("look"), ImagePart(image))),
             Message(role="assistant", tool_calls=(ToolCall("f", '{"x": 1}', id="c1"),)),
             Message(role="tool", content="ok", tool_call_id="c1")]
    out = parse_messages(given)
    assert all(a is b for a, b in zip(out, given, strict=True))


def test_a_message_with_list_content_is_normalised_without_mutating_it() -> None:
    given = Message(role="user", content=[TextPart("a")])  # type: ignore[arg-type]
    out = parse_messages([given])[0]
    assert out.content == (TextPart("a"),) and isinstance(out.content, tuple)
    assert given.content == [TextPart("a")]


BAD_TOOLS: dict[str, tuple[Any, str]] = {
    "a string": ("get_weather", "tools: tools must be a list of function specs, got str"),
    "bytes": (b"[]", "got bytes"),
    "a dict": ({"name": "f"}, "tools: tools must be a list of function specs, got dict"),
    "an int": (5, "got int"),
    "a list of ints": ([1, 2], "tools[0]: a tool must be an object, got int"),
    "a list of strings": (["f"], "tools[0]: a tool must be an object, got str"),
    "function a string": ([{"type": "function", "function": "f"}], "tools[0].function: function must be an object"),
    "function name an int": ([{"type": "function", "function": {"name": 5}}],
                             "tools[0].function.name: a function spec needs a non-empty string name"),
    "bare spec without a name": ([{"parameters": {}}], "tools[0].name: a function spec needs"),
    "empty name": ([{"name": ""}], "tools[0].name"),
    "unknown type": ([{"type": "retrieval"}], "tools[0].type: unsupported tool type 'retrieval'"),
    "parameters a string": ([{"name": "f", "parameters": "x"}], "tools[0].parameters: parameters must be an object"),
    "description an int": ([{"name": "f", "description": 5}], "tools[0].description: description must be a string"),
    "NaN in the schema": ([{"name": "f", "parameters": {"default": float("nan")}}], "tools[0]: not JSON-serialisable"),
    "a set in the schema": ([{"name": "f", "parameters": {"enum": {1, 2}}}], "tools[0]: not JSON-serialisable"),
    "surrogate in the name": ([{"name": "f" + S}], "tools[0]: text holds a lone surrogate"),
    "nested 100 deep": ([{"name": "f", "parameters": json.loads('{"a": ' * 100 + "1" + "}" * 100)}],
                        "tools[0]: nested deeper than 64 levels"),
    "second entry bad": ([{"name": "f"}, None], "tools[1]: a tool must be an object, got NoneType"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tools_raise_typed_errors(case: str) -> None:
    tools, needle = BAD_TOOLS[case]
    with pytest.raises(ToolSpecError) as info:
        parse_tools(tools)
    assert needle in str(info.value) and isinstance(info.value, MessageError)


def test_good_tools_pass_as_copies() -> None:
    openai = {"type": "function", "function": {"name": "crop", "description": "Crop.",
                                               "parameters": {"type": "object", "properties": {}}}}
    bare = {"name": "crop", "parameters": {"type": "object"}}
    out = parse_tools([openai, bare])
    assert out == [openai, bare] and out is not None and out[0] is not openai
    assert parse_tools(None) is None and parse_tools(()) == []


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    from rollwire.render import create_renderer

    return create_renderer(tiny("qwen2_vl"))


@pytest.mark.parametrize(("messages", "tools", "error"), [
    ([{"role": "user", "content": "hi"}], "get_weather", ToolSpecError),
    ([{"role": "user", "content": "hi"}], [1, 2], ToolSpecError),
    ([{"role": "user", "content": "hi"}], {"name": "f"}, ToolSpecError),
    ([Message(role="wizard", content="x")], None, UnknownRoleError),  # type: ignore[arg-type]
    ([Message(role="user", content=5)], None, MessageError),  # type: ignore[arg-type]
    ([{"role": "user", "content": S}], None, MessageError),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
     None, MessageError),
], ids=["tools str", "tools ints", "tools dict", "Message role", "Message int content", "surrogate",
        "tool after plain assistant"])
def test_the_renderer_validates_its_public_entry(renderer: Any, messages: list[Any], tools: Any,
                                                 error: type[Exception]) -> None:
    with pytest.raises(error):
        renderer.render(messages, tools)


# --- the messages file on the command line -------------------------------------------------------


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _huge(tmp: Path) -> Path:
    path = tmp / "huge.json"
    with open(path, "wb") as f:
        f.truncate(MAX_MESSAGES_FILE_BYTES + 1)  # sparse: the size is checked before reading
    return path


def _mkfifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "m.json")
    return tmp / "m.json"


MESSAGES_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not UTF-8": (lambda t: _write(t, "m.json", b'[{"role": "user", "content": "\xff\xfe"}]'), "is not UTF-8"),
    "UTF-16": (lambda t: _write(t, "m.json", '[{"role": "user", "content": "x"}]'.encode("utf-16")), "is not UTF-8"),
    "nested 100000 deep": (lambda t: _write(t, "m.json", b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "nested 500 deep": (lambda t: _write(t, "m.json", b"[" * 500 + b"]" * 500), "nested deeper than 100 levels"),
    "a directory": (lambda t: t, "is a directory"),
    "a FIFO": (_mkfifo, "is not a regular file"),
    "/dev/zero": (lambda t: Path("/dev/zero"), "is not a regular file"),
    "huge": (_huge, "over the limit of"),
    "missing": (lambda t: t / "nope.json", "does not exist"),
    "not JSON": (lambda t: _write(t, "m.json", b"{not json"), "is not JSON"),
    "empty": (lambda t: _write(t, "m.json", b""), "is not JSON"),
    "a JSON string": (lambda t: _write(t, "m.json", b'"hello"'), "expected a list of messages"),
    "tools a string": (lambda t: _write(t, "m.json", b'{"messages": [], "tools": "f"}'), "ToolSpecError"),
    "tools a dict": (lambda t: _write(t, "m.json", b'{"messages": [], "tools": {"name": "f"}}'), "ToolSpecError"),
}


@POSIX
@pytest.mark.parametrize("case", list(MESSAGES_FILES))
def test_bad_messages_files_exit_2_with_one_line(tmp_path: Path, case: str) -> None:
    make, needle = MESSAGES_FILES[case]
    path = make(tmp_path)
    result: list[Any] = []
    exc = finishes(lambda: result.append(CliRunner().invoke(app, ["render", "--messages", str(path)])), 10.0)
    assert exc is None
    out = result[0]
    assert out.exit_code == 2, out.output
    assert needle in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output
    if case != "tools a string" and case != "tools a dict":
        with pytest.raises(MessagesFileError):
            load_messages_file(path)


@POSIX
def test_a_fifo_messages_file_does_not_hang_the_real_command(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.json")
    proc = subprocess.run([sys.executable, "-m", "rollwire.cli", "render", "--messages", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "MessagesFileError" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def image_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """conv/ holding a messages file that names ../pics/a.png, and pics/a.png."""
    conv, pics = tmp_path / "conv", tmp_path / "pics"
    conv.mkdir()
    pics.mkdir()
    Image.new("RGB", (56, 56), (1, 2, 3)).save(pics / "a.png")
    (conv / "m.json").write_text(json.dumps(
        [{"role": "user", "content": [{"type": "image", "image": "../pics/a.png"}, {"type": "text", "text": "?"}]}]))
    return conv / "m.json", pics


def test_cli_confines_images_to_the_messages_folder_by_default(cache_dir: Path, image_dirs: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLWIRE_CACHE", str(cache_dir))
    messages, pics = image_dirs
    runner = CliRunner()
    refused = runner.invoke(app, ["render", "--messages", str(messages), "--json"])
    assert refused.exit_code == 2 and "ImagePathNotAllowedError" in refused.output
    allowed = runner.invoke(app, ["render", "--messages", str(messages), "--json", "--image-root", str(pics)])
    assert allowed.exit_code == 0, allowed.output
    anywhere = runner.invoke(app, ["render", "--messages", str(messages), "--json", "--any-image-path"])
    assert anywhere.exit_code == 0, anywhere.output
    assert json.loads(allowed.output) == json.loads(anywhere.output)
    assert len(json.loads(allowed.output)["images"]) == 1


# --- rollwire serve: idle and trickling connections ---------------------------------------------


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[Any]:
    pytest.importorskip("torch")
    from rollwire.engines.server import EngineServer

    with EngineServer(tiny("qwen2_vl"), connection_timeout=1.0, max_connections=8) as srv:
        yield srv


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (sending `trickle` one byte every 0.2 s meanwhile)."""
    start = time.monotonic()
    sock.settimeout(0.05)
    k = 0
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - start
        if trickle:
            try:
                sock.send(trickle[k % len(trickle):k % len(trickle) + 1])
            except OSError:
                return time.monotonic() - start
            k += 1
            time.sleep(0.15)
    return None


def _wait_idle(server: Any) -> None:
    deadline = time.monotonic() + 5
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)


SLOW_CLIENTS = {
    "idle, nothing sent": b"",
    "request line trickled": b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 1000,
    "headers trickled forever": b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
}


@pytest.mark.parametrize("case", list(SLOW_CLIENTS))
def test_slow_clients_are_cut_at_the_connection_timeout(server: Any, case: str) -> None:
    _wait_idle(server)
    trickle = SLOW_CLIENTS[case]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        if case == "headers trickled forever":
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed = _closed_within(sock, 4.0, trickle)
    assert closed is not None and closed < 3.0, closed
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_a_trickled_body_is_cut(server: Any) -> None:
    _wait_idle(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /inference/v1/generate HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        closed = _closed_within(sock, 4.0, b"{")
    assert closed is not None and closed < 3.0


def test_a_kept_alive_connection_is_closed_when_idle(server: Any) -> None:
    _wait_idle(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed = _closed_within(sock, 4.0)
    assert closed is not None and closed < 3.0


def test_many_idle_connections_are_closed_and_the_server_keeps_serving(server: Any) -> None:
    _wait_idle(server)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port)) as extra:  # over max_connections
            extra.settimeout(5)
            assert extra.recv(65536).startswith(b"HTTP/1.1 503")
        closed = [_closed_within(s, 4.0) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(c is not None and c < 3.0 for c in closed), closed
    _wait_idle(server)
    assert server.open_connections == 0
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_connection_limits_are_checked(tiny: Callable[[str], Path]) -> None:
    pytest.importorskip("torch")
    from rollwire.engines.server import EngineServer

    for bad in ({"connection_timeout": 0}, {"connection_timeout": float("nan")}, {"max_connections": 0}):
        with pytest.raises(RollwireError):
            EngineServer(tiny("qwen2_vl"), **bad)  # type: ignore[arg-type]
