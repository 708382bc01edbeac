"""ChatML, as the Qwen families write it: `<|im_start|>role\\n ... <|im_end|>\\n`.

The token strings and the Qwen-VL image frame (`<|vision_start|>` image `<|vision_end|>`, with
optional "Picture k: " labels) that Qwen2-VL, Qwen2.5-VL, Qwen3, Qwen3-VL and Qwen3.5 share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rollwire.messages import ImagePart
from rollwire.render.base import TemplateRenderer
from rollwire.render.emit import Piece

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


# The real Qwen tokenizer's size and ids, shared by the Qwen families' tiny models.
QWEN_TEXT_TINY: Mapping[str, Any] = {
    "vocab_size": 151669, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32768,
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
}
QWEN_VL_IDS: Mapping[str, int] = {"image_token_id": 151655, "video_token_id": 151656,
                                  "vision_start_token_id": 151652, "vision_end_token_id": 151653}


class ChatMLRenderer(TemplateRenderer):
    """Base of the `<|im_start|>role ... <|im_end|>` renderers (text only unless `image_pad` is set)."""

    family = "chatml"
    turn_end: ClassVar[str] = IM_END
    turn_separator: ClassVar[str] = "\n"
    stop_tokens: ClassVar[tuple[str, ...]] = (IM_END, ENDOFTEXT)
    vision_tokens: ClassVar[tuple[str, ...]] = VISION_TOKENS
    structure_tokens: ClassVar[tuple[str, ...]] = (IM_START,)

    def generation_prompt(self) -> list[Piece]:
        return [f"{IM_START}assistant\n"]

    def image_pieces(self, part: ImagePart, number: int) -> list[Piece]:
        label: list[Piece] = [f"Picture {number}: "] if self.add_vision_id else []
        return [*label, VISION_START, part, VISION_END]
