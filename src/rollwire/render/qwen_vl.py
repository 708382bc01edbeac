"""Qwen2-VL and Qwen2.5-VL: the official (shared) chat template, token for token.

The template has a default system prompt, images in any user or tool message, optional
"Picture k: " labels (`add_vision_id`), and no notion of tools: assistant tool calls are
whatever text the model wrote. rollwire therefore keeps a parsed assistant message's raw
text as its content, and declares `tools` in the system message in the Hermes format the
Qwen2.5 family was trained on (the official template would silently drop them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rollwire.messages import Message, ToolCall
from rollwire.render.chatml import IM_END, IM_START, ChatMLRenderer
from rollwire.render.emit import Emitter, Piece
from rollwire.render.hermes import TOOL_CALL_OPEN, format_tool_call, parse_tool_calls, tools_block
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class Qwen2VLRenderer(ChatMLRenderer):
    family = "qwen2_vl"
    supports_images = True

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
        add_vision_id: bool = False,
        family: str = "qwen2_vl",
    ) -> None:
        super().__init__(tokenizer, feature_store=feature_store, limits=limits)
        self.add_vision_id = add_vision_id
        self.family = family

    def _emit_conversation(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, em: Emitter
    ) -> None:
        has_system = messages[0].role == "system"
        if tools:
            system = messages[0].text if has_system else DEFAULT_SYSTEM_PROMPT
            em.emit(0 if has_system else -1, [f"{IM_START}system\n{system}\n\n{tools_block(tools)}{IM_END}\n"])
        elif not has_system:
            em.emit(-1, [f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"])
        start = 1 if (tools and has_system) else 0
        self._emit_continuation(messages[start:], start, em)

    def _emit_continuation(self, messages: Sequence[Message], first_index: int, em: Emitter) -> None:
        for k, message in enumerate(messages):
            em.emit(first_index + k, self._message_pieces(message, em))

    def _message_pieces(self, message: Message, em: Emitter) -> list[Piece]:
        pieces: list[Piece] = [f"{IM_START}{message.role}\n"]
        pieces += self._content_pieces(message, em)
        if message.role == "assistant" and message.tool_calls and TOOL_CALL_OPEN not in message.text:
            # Calls given only as structured data (not in the text the model wrote): write them
            # as the model writes them, so they are not silently dropped.
            pieces += [("\n" if message.text else "") + "\n".join(map(format_tool_call, message.tool_calls))]
        pieces.append(f"{IM_END}\n")
        return pieces

    def _split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        _outside, calls, error = parse_tool_calls(text)
        return text, None, calls, error
