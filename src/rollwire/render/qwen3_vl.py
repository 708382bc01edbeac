"""Qwen3-VL: the Qwen3 conversation format with images (patch 16), in its two variants.

- Instruct (default): no reasoning handling; a system message after the first is dropped
  (as the official template does); plain generation prompt.
- Thinking: Qwen3's reasoning rules; the generation prompt opens `<think>\\n`.

The official template is not available offline: this follows the published template text
(see the README's support table); `tests/test_render_parity.py` checks it against a template
file given through `ROLLWIRE_QWEN3_VL_TEMPLATE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rollwire.render.chatml import IM_START
from rollwire.render.emit import Piece
from rollwire.render.qwen3 import THINK_OPEN, Qwen3Renderer
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits


class Qwen3VLRenderer(Qwen3Renderer):
    family = "qwen3_vl"
    supports_images = True

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
        add_vision_id: bool = False,
        thinking: bool = False,
    ) -> None:
        super().__init__(tokenizer, feature_store=feature_store, limits=limits)
        self.add_vision_id = add_vision_id
        self.thinking = thinking
        self.renders_reasoning = thinking
        self.renders_late_system = thinking

    def _generation_prompt(self) -> list[Piece]:
        return [f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if self.thinking else "")]
