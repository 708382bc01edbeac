"""Qwen2-VL and Qwen2.5-VL: the official (shared) chat template, token for token.

The template has a default system prompt, images in any user or tool message, optional
"Picture k: " labels (`add_vision_id`), and no notion of tools: assistant tool calls are
whatever text the model wrote. rollwire therefore keeps a parsed assistant message's raw
text as its content, and declares `tools` in the system message in the Hermes format the
Qwen2.5 family was trained on (the official template would silently drop them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rollwire.features import FeatureStore, VisionConfig
from rollwire.messages import Message, ToolCall
from rollwire.render.base import MessageContext
from rollwire.render.chatml import IM_END, IM_START, IMAGE_PAD, QWEN_TEXT_TINY, QWEN_VL_IDS, ChatMLRenderer
from rollwire.render.emit import Piece, Text
from rollwire.render.family import Family, RenderOptions, TinySpec
from rollwire.render.hermes import TOOL_CALL_OPEN, format_tool_call, parse_tool_calls, tools_block
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class Qwen2VLRenderer(ChatMLRenderer):
    family = "qwen2_vl"
    image_pad: ClassVar[str | None] = IMAGE_PAD

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

    def preamble(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        if messages[0].role == "system":
            return []
        return self._system(DEFAULT_SYSTEM_PROMPT, tools)

    def message_pieces(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if ctx.is_first and message.role == "system" and ctx.tools:
            return self._system(message.text, ctx.tools)
        pieces: list[Piece] = [f"{IM_START}{message.role}\n", *self.content_pieces(message, ctx.image_count)]
        if message.role == "assistant" and message.tool_calls and TOOL_CALL_OPEN not in message.text:
            # Calls given only as structured data (not in the text the model wrote): write them
            # as the model writes them, so they are not silently dropped.
            pieces += [Text(("\n" if message.text else "") + "\n".join(map(format_tool_call, message.tool_calls)))]
        pieces.append(f"{IM_END}\n")
        return pieces

    def split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        _outside, calls, error = parse_tool_calls(text)
        return text, None, calls, error

    @staticmethod
    def _system(text: str, tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        declared = [Text(f"\n\n{tools_block(tools)}")] if tools else []
        return [f"{IM_START}system\n", Text(text), *declared, f"{IM_END}\n"]


def _renderer(name: str) -> Any:
    def make(model: ModelDir, options: RenderOptions) -> Qwen2VLRenderer:
        store = options.store_for(model, VisionConfig.qwen2_vl)
        return Qwen2VLRenderer(model.tokenizer, feature_store=store, limits=options.limits,
                               add_vision_id=options.add_vision_id, family=name)
    return make


# Tiny models: ~9.9 M parameters (text hidden 64, 2 layers; vision depth 1-2, hidden 32).
CLIP_PROCESSOR: Mapping[str, Any] = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                     "image_std": [0.26862954, 0.26130258, 0.27577711]}
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}

QWEN2_VL = Family(
    name="qwen2_vl", model_types={"qwen2_vl": "Qwen2VLForConditionalGeneration"},
    make_renderer=_renderer("qwen2_vl"), vision=VisionConfig.qwen2_vl,
    tiny=TinySpec(
        config_class="Qwen2VLConfig", model_class="Qwen2VLForConditionalGeneration",
        config={"text_config": {**QWEN_TEXT_TINY, "rope_parameters": _MROPE},
                "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                "tie_word_embeddings": True, **QWEN_VL_IDS},
        chat_template="qwen2_vl", image_processor=CLIP_PROCESSOR),
)
QWEN2_5_VL = Family(
    name="qwen2_5_vl", model_types={"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
    make_renderer=_renderer("qwen2_5_vl"), vision=VisionConfig.qwen2_vl,
    tiny=TinySpec(
        config_class="Qwen2_5_VLConfig", model_class="Qwen2_5_VLForConditionalGeneration",
        config={"text_config": {**QWEN_TEXT_TINY, "rope_parameters": _MROPE},
                "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                  "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 112,
                                  "tokens_per_second": 2, "patch_size": 14, "spatial_merge_size": 2,
                                  "temporal_patch_size": 2},
                "tie_word_embeddings": True, **QWEN_VL_IDS},
        chat_template="qwen2_vl", image_processor=CLIP_PROCESSOR),
)
