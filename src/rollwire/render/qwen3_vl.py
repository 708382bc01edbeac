"""Qwen3-VL: the Qwen3 conversation format with images (patch 16), in its two variants.

- Instruct (default): no reasoning handling; a system message after the first is dropped
  (as the official template does); plain generation prompt.
- Thinking: Qwen3's reasoning rules; the generation prompt opens `<think>\\n`. Recognised by
  that generation prompt in the model directory's template.

The official template is not available offline: this follows the published template text
(see the README's support table); `tests/test_render_parity.py` checks it against a template
file given through `ROLLWIRE_QWEN3_VL_TEMPLATE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rollwire.features import FeatureStore, VisionConfig
from rollwire.render.chatml import IM_START, IMAGE_PAD, QWEN_TEXT_TINY, QWEN_VL_IDS
from rollwire.render.emit import Piece
from rollwire.render.family import Family, RenderOptions, TinySpec
from rollwire.render.qwen3 import THINK_OPEN, Qwen3Renderer
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir


class Qwen3VLRenderer(Qwen3Renderer):
    family = "qwen3_vl"
    image_pad: ClassVar[str | None] = IMAGE_PAD

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

    def generation_prompt(self) -> list[Piece]:
        return [f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if self.thinking else "")]


def is_thinking_template(template: str | None) -> bool:
    """Qwen3-VL-Thinking ships a template whose generation prompt opens `<think>`."""
    return template is not None and "'<|im_start|>assistant\\n<think>" in template


def _renderer(model: ModelDir, options: RenderOptions) -> Qwen3VLRenderer:
    store = options.store_for(model, VisionConfig.qwen3_vl)
    return Qwen3VLRenderer(model.tokenizer, feature_store=store, limits=options.limits,
                           add_vision_id=options.add_vision_id,
                           thinking=options.enable_thinking and is_thinking_template(model.chat_template))


QWEN3_VL = Family(
    name="qwen3_vl",
    model_types={"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"},
    make_renderer=_renderer, vision=VisionConfig.qwen3_vl,
    tiny=TinySpec(
        config_class="Qwen3VLConfig", model_class="Qwen3VLForConditionalGeneration",
        config={"text_config": {**QWEN_TEXT_TINY, "head_dim": 32,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": [6, 5, 5], "mrope_interleaved": True}},
                "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                  "out_hidden_size": 64, "deepstack_visual_indexes": [0],
                                  "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
                                  "temporal_patch_size": 2},
                "tie_word_embeddings": True, **QWEN_VL_IDS},
        image_processor={"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
)
