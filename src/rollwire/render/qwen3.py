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
from rollwire.render.base import MessageContext
from rollwire.render.chatml import IM_END, IM_START, QWEN_TEXT_TINY, ChatMLRenderer
from rollwire.render.emit import Piece, Text
from rollwire.render.family import Family, RenderOptions, TinySpec
from rollwire.render.hermes import format_tool_call, parse_tool_calls, tools_block
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir

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

    def preamble(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        if tools and messages[0].role != "system":
            return [f"{IM_START}system\n", Text(tools_block(tools)), f"{IM_END}\n"]
        return []

    def message_pieces(self, message: Message, ctx: MessageContext) -> list[Piece] | None:
        if ctx.is_first and message.role == "system":
            declared = [Text(f"\n\n{tools_block(ctx.tools)}")] if ctx.tools else []
            return [f"{IM_START}system\n", *self.content_pieces(message, ctx.image_count), *declared, f"{IM_END}\n"]
        if message.role == "system" and not self.renders_late_system:
            return None  # the template drops it
        if message.role == "assistant":
            return self._assistant_pieces(message, after_last_query=ctx.index > ctx.last_query, is_last=ctx.is_last)
        if message.role != "tool":
            return [f"{IM_START}{message.role}\n", *self.content_pieces(message, ctx.image_count), f"{IM_END}\n"]
        pieces: list[Piece] = [] if ctx.prev_role == "tool" else [f"{IM_START}user"]
        pieces += ["\n<tool_response>\n", *self.content_pieces(message, ctx.image_count), "\n</tool_response>"]
        if ctx.next_role != "tool":
            pieces.append(f"{IM_END}\n")
        return pieces

    def generation_prompt(self) -> list[Piece]:
        think = "" if self.enable_thinking else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
        return [f"{IM_START}assistant\n{think}"]

    def last_query_index(self, messages: Sequence[Message]) -> int:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            text = "".join(p if isinstance(p, str) else "<|image|>" for p in self.content_pieces(m))
            if m.role == "user" and not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                return i
        return len(messages) - 1

    def _assistant_pieces(self, message: Message, *, after_last_query: bool, is_last: bool) -> list[Piece]:
        content = message.text
        if not self.renders_reasoning:
            calls = "".join(("\n" if k > 0 or message.content else "") + format_tool_call(c)
                            for k, c in enumerate(message.tool_calls))
            return [f"{IM_START}assistant\n", Text(content + calls), f"{IM_END}\n"]
        reasoning = message.reasoning_content
        if reasoning is None:
            reasoning = ""
            if THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)
        out: list[Piece] = [f"{IM_START}assistant\n"]
        if after_last_query and (is_last or reasoning):
            out += [f"{THINK_OPEN}\n", Text(reasoning.strip("\n")), f"\n{THINK_CLOSE}\n\n", Text(content.lstrip("\n"))]
        else:
            out.append(Text(content))
        calls = "".join(("\n" if k > 0 or content else "") + format_tool_call(call)
                        for k, call in enumerate(message.tool_calls))
        return [*out, Text(calls), f"{IM_END}\n"]

    def split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        reasoning: str | None = None
        if self.renders_reasoning and THINK_CLOSE in text:
            reasoning, text = split_reasoning(text)
        outside, calls, error = parse_tool_calls(text)
        content = outside.strip() if calls else outside
        return content, reasoning, calls, error


def _renderer(model: ModelDir, options: RenderOptions) -> Qwen3Renderer:
    return Qwen3Renderer(model.tokenizer, enable_thinking=options.enable_thinking)


QWEN3 = Family(
    name="qwen3", model_types={"qwen3": None, "qwen3_moe": None}, make_renderer=_renderer,
    tiny=TinySpec(
        config_class="Qwen3Config", model_class="Qwen3ForCausalLM",
        config={**QWEN_TEXT_TINY, "head_dim": 32,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": True},
        chat_template="tokenizer"),
)
