"""Qwen3.5 / Qwen3.6: Qwen3-VL's vision path (patch 16) with Qwen3.5's own template, token for token.

What differs from Qwen3: every message's content is trimmed; tools are declared and called in
the XML `qwen3_coder` format; an assistant turn after the last user query always carries a
`<think>` block (empty when it had no reasoning); the generation prompt opens `<think>\\n`, or
holds an empty think block with `enable_thinking=False`; a system message anywhere but first,
an image in a system message, or a conversation without a user query is an error, as the
template raises. Qwen3.5 has its own tokenizer (248k tokens), so its ids differ from Qwen3's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rollwire.errors import RenderError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.messages import Message, ToolCall
from rollwire.render.base import MessageContext
from rollwire.render.chatml import IM_END, IM_START, IMAGE_PAD, ChatMLRenderer
from rollwire.render.emit import Piece, Text
from rollwire.render.family import Family, RenderOptions, TinySpec
from rollwire.render.qwen3 import THINK_CLOSE, THINK_OPEN, split_reasoning
from rollwire.render.qwen3_coder import format_tool_call, parse_tool_calls, tools_block
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir


def trimmed(pieces: list[Piece]) -> list[Piece]:
    """Jinja's `|trim` of the rendered content: whitespace off the outer text ends (not past an image)."""
    out = list(pieces)
    while out and isinstance(out[0], str) and not out[0].strip():
        out.pop(0)
    if out and isinstance(out[0], str):
        out[0] = type(out[0])(out[0].lstrip())  # a Text stays Text
    while out and isinstance(out[-1], str) and not out[-1].strip():
        out.pop()
    if out and isinstance(out[-1], str):
        out[-1] = type(out[-1])(out[-1].rstrip())
    return out


class Qwen35Renderer(ChatMLRenderer):
    family = "qwen3_5"
    image_pad: ClassVar[str | None] = IMAGE_PAD

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
        add_vision_id: bool = False,
        enable_thinking: bool = True,
        family: str = "qwen3_5",
    ) -> None:
        super().__init__(tokenizer, feature_store=feature_store, limits=limits)
        self.add_vision_id = add_vision_id
        self.enable_thinking = enable_thinking
        self.family = family

    def preamble(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        if self.last_query_index(messages) < 0:
            raise RenderError("no user query in the conversation (the Qwen3.5 template refuses it)")
        if tools and messages[0].role != "system":
            return [f"{IM_START}system\n", Text(tools_block(tools)), f"{IM_END}\n"]
        return []

    def message_pieces(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if message.role == "system":
            if not ctx.is_first:
                raise RenderError(f"messages[{ctx.index}]: a system message must be the first message")
            if message.images:
                raise RenderError("messages[0]: a system message cannot contain images")
            text = message.text.strip()
            if ctx.tools:
                return [f"{IM_START}system\n", Text(tools_block(ctx.tools) + (f"\n\n{text}" if text else "")),
                        f"{IM_END}\n"]
            return [f"{IM_START}system\n", Text(text), f"{IM_END}\n"]
        if message.role == "assistant":
            return self._assistant_pieces(message, after_last_query=ctx.index > ctx.last_query)
        content = trimmed(self.content_pieces(message, ctx.image_count))
        if message.role == "user":
            return [f"{IM_START}user\n", *content, f"{IM_END}\n"]
        header: list[Piece] = [f"{IM_START}user"] if ctx.prev_role not in (None, "tool") else []
        close: list[Piece] = [f"{IM_END}\n"] if ctx.next_role != "tool" else []
        return [*header, "\n<tool_response>\n", *content, "\n</tool_response>", *close]

    def generation_prompt(self) -> list[Piece]:
        think = f"{THINK_OPEN}\n" if self.enable_thinking else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
        return [f"{IM_START}assistant\n{think}"]

    def last_query_index(self, messages: Sequence[Message]) -> int:
        """The last user message that is not only tool responses; -1 when there is none."""
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].role != "user":
                continue
            text = "".join(p if isinstance(p, str) else "<|image|>" for p in self.content_pieces(messages[i])).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                return i
        return -1

    def _assistant_pieces(self, message: Message, *, after_last_query: bool) -> list[Piece]:
        if message.images:
            raise RenderError("the qwen3_5 renderer does not take images in assistant messages")
        content = message.text.strip()
        reasoning = message.reasoning_content
        if reasoning is None:
            reasoning = ""
            if THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)
        out: list[Piece] = [f"{IM_START}assistant\n"]
        if after_last_query:
            out += [f"{THINK_OPEN}\n", Text(reasoning.strip()), f"\n{THINK_CLOSE}\n\n"]
        calls = "".join((("\n\n" if content.strip() else "") if k == 0 else "\n") + format_tool_call(call)
                        for k, call in enumerate(message.tool_calls))
        return [*out, Text(content + calls), f"{IM_END}\n"]

    def split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        reasoning: str | None = None
        if THINK_CLOSE in text:
            reasoning, text = split_reasoning(text)
        outside, calls, error = parse_tool_calls(text)
        return (outside.strip() if calls else outside), reasoning, calls, error


def _renderer(model: ModelDir, options: RenderOptions) -> Qwen35Renderer:
    return Qwen35Renderer(model.tokenizer, feature_store=options.store_for(model, VisionConfig.qwen3_vl),
                          limits=options.limits, add_vision_id=options.add_vision_id,
                          enable_thinking=options.enable_thinking, family="qwen3_5")


# Tiny model: Qwen3.5's hybrid stack (one Gated-DeltaNet and one full-attention layer), real vocabulary.
# Revision 1 is what vLLM 0.32's CPU build can run: its Gated-DeltaNet kernels take linear head dims
# of 64 or 128 only (16 and 32 fail at the first request), and vLLM ties lm_head by the *text*
# config's tie_word_embeddings (false would leave lm_head unloaded: NaN logits).
_TEXT: Mapping[str, Any] = {
    "vocab_size": 248320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "layer_types": ["linear_attention", "full_attention"], "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 32, "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_num_key_heads": 2,
    "linear_num_value_heads": 2, "linear_conv_kernel_dim": 4, "max_position_embeddings": 32768,
    "bos_token_id": 248044, "eos_token_id": 248046, "pad_token_id": 248044, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
}
QWEN3_5 = Family(
    name="qwen3_5",
    model_types={"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"},
    make_renderer=_renderer, vision=VisionConfig.qwen3_vl,
    tiny=TinySpec(
        config_class="Qwen3_5Config", model_class="Qwen3_5ForConditionalGeneration",
        config={"text_config": _TEXT,
                "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                  "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                                  "out_hidden_size": 64, "num_position_embeddings": 64},
                "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
                "vision_end_token_id": 248054, "tie_word_embeddings": True},
        tokenizer="qwen3_5", chat_template="qwen3_5",
        image_processor={"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        revision=1),
)
