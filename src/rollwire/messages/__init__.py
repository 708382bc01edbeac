"""Chat messages in the OpenAI format, as typed, validated, immutable values.

`parse_messages` accepts plain dicts (as they come from JSON or an environment) or `Message`
objects (checked just as strictly) and returns `Message`s; every problem raises `MessageError`
naming the message index and the field. `parse_tools` checks `tools`; `message_to_dict` writes
a message back as an OpenAI dict. One module each: `types`, `parse`, `tools`, `dicts` (and
`text`, the Unicode and JSON checks the parsers share).
"""

from rollwire.messages.dicts import message_to_dict
from rollwire.messages.parse import parse_message, parse_messages, validate_conversation
from rollwire.messages.text import MAX_JSON_DEPTH
from rollwire.messages.tools import parse_tools
from rollwire.messages.types import (
    ROLES,
    TEXT_TOOL_CALL_OPEN,
    ContentPart,
    ImagePart,
    ImageSource,
    Message,
    MessageLike,
    Role,
    TextPart,
    ToolCall,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "ROLES",
    "TEXT_TOOL_CALL_OPEN",
    "ContentPart",
    "ImagePart",
    "ImageSource",
    "Message",
    "MessageLike",
    "Role",
    "TextPart",
    "ToolCall",
    "message_to_dict",
    "parse_message",
    "parse_messages",
    "parse_tools",
    "validate_conversation",
]
