from pathlib import Path

import pytest
from PIL import Image

from rollwire.errors import MessageError, UnknownRoleError
from rollwire.messages import ImagePart, Message, TextPart, ToolCall, message_to_dict, parse_messages


def test_openai_format_parses_to_typed_messages() -> None:
    img = Image.new("RGB", (4, 4))
    msgs = parse_messages([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image", "image": img},
            {"type": "image", "path": "/tmp/x.png"},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "crop", "arguments": '{"x": 1}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "image", "image": b"\x89PNG"}]},
    ])
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[1].parts[0] == TextPart("what is")
    assert msgs[1].parts[1] == ImagePart("data:image/png;base64,AAAA")
    assert msgs[1].parts[2].image is img  # type: ignore[union-attr]
    assert msgs[1].parts[3] == ImagePart("/tmp/x.png")
    assert msgs[2].tool_calls == (ToolCall(name="crop", arguments='{"x": 1}', id="c1"),)
    assert msgs[2].tool_calls[0].arguments_dict() == {"x": 1}
    assert msgs[3].tool_call_id == "c1"
    assert len(msgs[1].images) == 3 and msgs[1].text == "what is"


def test_message_objects_pass_through_unchanged() -> None:
    m = Message(role="user", content="hi")
    assert parse_messages([m])[0] is m


@pytest.mark.parametrize(
    ("messages", "error", "needle"),
    [
        ([{"role": "robot", "content": "x"}], UnknownRoleError, "messages[0].role: unknown role 'robot'"),
        ([{"role": "user", "content": 5}], MessageError, "messages[0].content: content must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], MessageError,
         "messages[0].content[0]: image part has no source"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], MessageError, "image_url.url"),
        ([{"role": "user", "content": [{"type": "audio"}]}], MessageError, "unknown content part type 'audio'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], MessageError, "content[0].text"),
        ([{"role": "user"}], MessageError, "messages[0].content: a user message needs content"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], MessageError,
         "messages[1].role: tool message does not follow an assistant tool call"),
        ([{"role": "user", "content": "a"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
          {"role": "tool", "tool_call_id": "c9", "content": "r"}], MessageError,
         "messages[2].tool_call_id: tool_call_id 'c9' matches no preceding tool call"),
        ([{"role": "system", "content": [{"type": "image", "image": "x.png"}]}], MessageError,
         "system messages cannot hold images"),
        ([{"role": "user", "content": "a", "tool_calls": []}], MessageError,
         "only assistant messages carry tool_calls"),
        ([{"role": "assistant", "content": "a", "tool_calls": [{"function": {"arguments": "{}"}}]}], MessageError,
         "tool_calls[0].function.name"),
        ("hello", MessageError, "messages must be a list"),
        ([42], MessageError, "messages[0]: a message must be an object"),
    ],
)
def test_bad_messages_raise_typed_errors_naming_the_place(messages, error, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        parse_messages(messages)
    assert needle in str(info.value)


def test_tool_messages_may_continue_after_a_sampled_assistant_turn() -> None:
    msgs = parse_messages([{"role": "tool", "content": "r"}], after_assistant=True, start_index=5)
    assert msgs[0].role == "tool"
    with pytest.raises(MessageError, match=r"messages\[5\]"):
        parse_messages([{"role": "tool", "content": "r"}], start_index=5)


def test_message_to_dict_round_trips_text_and_tool_calls(tmp_path: Path) -> None:
    src = {"role": "assistant", "content": "ok", "reasoning_content": "hm",
           "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    out = message_to_dict(parse_messages([{"role": "user", "content": "q"}, src])[1])
    assert out == src
