"""Pick and build the renderer for a model directory (or a tokenizer) from its config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rollwire.errors import RenderError, UnsupportedModelError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.images import ImageLimits
from rollwire.render.generic import ChatTemplateRenderer
from rollwire.render.qwen3 import Qwen3Renderer
from rollwire.render.qwen3_vl import Qwen3VLRenderer
from rollwire.render.qwen_vl import Qwen2VLRenderer
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import Renderer

# config.json model_type -> rollwire family
MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
}
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3", "generic")
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def detect_family(model_dir: str | Path) -> str:
    """The rollwire family of a model directory, from `config.json`'s `model_type`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"no config.json in {model_dir}: pass family= explicitly")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {path}: {exc}") from None
    return MODEL_TYPES.get(str(model_type), "generic")


def create_renderer(
    model: str | Path | Any,
    *,
    family: str | None = None,
    feature_store: FeatureStore | None = None,
    limits: ImageLimits | None = None,
    add_vision_id: bool = False,
    enable_thinking: bool = True,
) -> Renderer:
    """A renderer for `model`: a model directory, or a HF / `tokenizers` tokenizer object.

    The family comes from the directory's config unless given. For Qwen3-VL, the Thinking
    variant is recognised by its template (`enable_thinking=False` forces Instruct). Vision families get a
    `FeatureStore` configured from the directory's `preprocessor_config.json` (or the family
    defaults) unless one is passed.
    """
    model_dir = Path(model) if isinstance(model, (str, Path)) else None
    if model_dir is not None and not model_dir.is_dir():
        raise UnsupportedModelError(f"model directory {model_dir} does not exist")
    if family is None:
        if model_dir is None:
            raise UnsupportedModelError("pass family= when giving a tokenizer object")
        family = detect_family(model_dir)
    if family not in FAMILIES:
        raise UnsupportedModelError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    if family == "generic":
        return ChatTemplateRenderer(_hf_tokenizer(model))
    tokenizer = TextTokenizer.from_dir(model_dir) if model_dir else TextTokenizer.from_hf(model)
    if family == "qwen3":
        return Qwen3Renderer(tokenizer, enable_thinking=enable_thinking)
    if feature_store is None:
        feature_store = FeatureStore(_vision_config(family, model_dir))
    if family == "qwen3_vl":
        thinking = _is_thinking_variant(model_dir) if enable_thinking else False
        return Qwen3VLRenderer(tokenizer, feature_store=feature_store, limits=limits,
                               add_vision_id=add_vision_id, thinking=thinking)
    return Qwen2VLRenderer(tokenizer, feature_store=feature_store, limits=limits,
                           add_vision_id=add_vision_id, family=family)


def _is_thinking_variant(model_dir: Path | None) -> bool:
    """Qwen3-VL-Thinking ships a template whose generation prompt opens `<think>`."""
    template = _chat_template_text(model_dir) if model_dir is not None else None
    return template is not None and "'<|im_start|>assistant\\n<think>" in template


def _chat_template_text(model_dir: Path) -> str | None:
    """The Jinja source of the directory's chat template, if it ships one."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get("chat_template")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(value, str):
                return value
    return None


def _vision_config(family: str, model_dir: Path | None) -> VisionConfig:
    if model_dir is not None and (model_dir / "preprocessor_config.json").is_file():
        return VisionConfig.from_pretrained(model_dir)
    return VisionConfig.qwen3_vl() if family == "qwen3_vl" else VisionConfig.qwen2_vl()


def _hf_tokenizer(model: Any) -> Any:
    if not isinstance(model, (str, Path)):
        return model
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise RenderError("the generic renderer needs transformers") from exc
    return AutoTokenizer.from_pretrained(str(model))
