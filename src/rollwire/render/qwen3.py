"""Qwen3 (text): the official template shipped with the Qwen3 tokenizer, token for token.

Tools are declared in the system message, tool results are grouped into one user turn of
`<tool_response>` blocks, and assistant reasoning is rendered as `<think>` only for turns
after the last user query (a full render drops earlier reasoning; the bridge keeps what was
sampled). `enable_thinking=False` adds an empty think block to the generation prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rollwire.messages import Message, ToolCall
from rollwire.render.chatml import IM_END, IM_START, ChatMLRenderer
from rollwire.render.emit import Emitter, Piece
from rollwire.render.hermes import format_tool_call, parse_tool_calls, tools_block
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, content) of text holding `</think>`, trimmed as the Qwen3 template trims."""
    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")


class Qwen3Renderer(ChatMLRenderer):
    family = "qwen3"
    # Template switches that Qwen3-VL-Instruct turns off.
    renders_reasoning = True  # <think> blocks after the last user query; reasoning parsed out
    renders_late_system = True  # a system message after the first is rendered (not dropped)

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
        enable_thinking: bool = True,
    ) -> None:
        super().__init__(tokenizer, feature_store=feature_store, limits=limits)
        self.enable_thinking = enable_thinking

    def _emit_conversation(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, em: Emitter
    ) -> None:
        has_system = messages[0].role == "system"
        if tools:
            prefix: list[Piece] = [f"{IM_START}system\n"]
            if has_system:
                prefix += [*self._content_pieces(messages[0], em), "\n\n"]
            em.emit(0 if has_system else -1, [*prefix, tools_block(tools), f"{IM_END}\n"])
        elif has_system:
            em.emit(0, [f"{IM_START}system\n", *self._content_pieces(messages[0], em), f"{IM_END}\n"])
        last_query = self._last_query_index(messages)
        for i, message in enumerate(messages):
            if i == 0 and has_system:
                continue
            if message.role == "system" and not self.renders_late_system:
                continue  # the template drops it
            if message.role == "assistant":
                em.emit(i, self._assistant_pieces(message, after_last_query=i > last_query,
                                                  is_last=i == len(messages) - 1))
            else:
                prev_role = messages[i - 1].role if i > 0 else None
                next_role = messages[i + 1].role if i + 1 < len(messages) else None
                em.emit(i, self._plain_pieces(message, em, prev_role, next_role))

    def _emit_continuation(self, messages: Sequence[Message], first_index: int, em: Emitter) -> None:
        for k, message in enumerate(messages):
            if message.role == "system" and not self.renders_late_system:
                continue
            prev_role = messages[k - 1].role if k > 0 else "assistant"
            next_role = messages[k + 1].role if k + 1 < len(messages) else None
            em.emit(first_index + k, self._plain_pieces(message, em, prev_role, next_role))

    def _generation_prompt(self) -> list[Piece]:
        think = "" if self.enable_thinking else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
        return [f"{IM_START}assistant\n{think}"]

    def _last_query_index(self, messages: Sequence[Message]) -> int:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            pieces = self._content_pieces(m, None)
            text = "".join(p if isinstance(p, str) else "<|image|>" for p in pieces)
            if m.role == "user" and not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                return i
        return len(messages) - 1

    def _plain_pieces(
        self, message: Message, em: Emitter, prev_role: str | None, next_role: str | None
    ) -> list[Piece]:
        if message.role != "tool":
            return [f"{IM_START}{message.role}\n", *self._content_pieces(message, em), f"{IM_END}\n"]
        pieces: list[Piece] = []
        if prev_role != "tool":
            pieces.append(f"{IM_START}user")
        pieces += ["\n<tool_response>\n", *self._content_pieces(message, em), "\n</tool_response>"]
        if next_role != "tool":
            pieces.append(f"{IM_END}\n")
        return pieces

    def _assistant_pieces(self, message: Message, *, after_last_query: bool, is_last: bool) -> list[Piece]:
        content = message.text
        if not self.renders_reasoning:
            calls = "".join(("\n" if k > 0 or message.content else "") + format_tool_call(c)
                            for k, c in enumerate(message.tool_calls))
            return [f"{IM_START}assistant\n{content}{calls}{IM_END}\n"]
        reasoning = message.reasoning_content
        if reasoning is None:
            reasoning = ""
            if THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)
        out = f"{IM_START}assistant\n"
        if after_last_query and (is_last or reasoning):
            out += f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{content.lstrip(chr(10))}"
        else:
            out += content
        for k, call in enumerate(message.tool_calls):
            if k > 0 or content:
                out += "\n"
            out += format_tool_call(call)
        return [out + f"{IM_END}\n"]

    def _split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        reasoning: str | None = None
        if self.renders_reasoning and THINK_CLOSE in text:
            reasoning, text = split_reasoning(text)
        outside, calls, error = parse_tool_calls(text)
        content = outside.strip() if calls else outside
        return content, reasoning, calls, error
