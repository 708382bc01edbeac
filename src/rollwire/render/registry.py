"""The family registry: `config.json` model types to family records, and the renderer factory.

A family is registered once (`register_family`); everything that needs to know a family — the
renderer factory, the local engine's model class, the server, `rollwire tiny-model` — asks here.
A model type no family claims gets the generic chat-template renderer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from rollwire.errors import UnsupportedModelError
from rollwire.features import FeatureStore
from rollwire.images import ImageLimits
from rollwire.render.base import TemplateRenderer
from rollwire.render.family import Family, RenderOptions
from rollwire.render.gemma4 import GEMMA4
from rollwire.render.generic import ChatTemplateRenderer
from rollwire.render.generic_vision import generic_renderer
from rollwire.render.model_dir import ModelDir
from rollwire.render.qwen3 import QWEN3
from rollwire.render.qwen3_5 import QWEN3_5
from rollwire.render.qwen3_vl import QWEN3_VL
from rollwire.render.qwen_vl import QWEN2_5_VL, QWEN2_VL
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import Renderer

GENERIC = "generic"
_FAMILIES: dict[str, Family] = {}
_MODEL_TYPES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add `family` (and claim its model types); a name or model type taken by another family is
    an error unless `replace`."""
    if family.name == GENERIC:
        raise UnsupportedModelError(f"{GENERIC!r} is the fallback, not a family name")
    clash = [t for t in family.model_types if t in _MODEL_TYPES and _MODEL_TYPES[t].name != family.name]
    if not replace and (family.name in _FAMILIES or clash):
        raise UnsupportedModelError(f"family {family.name!r} or model types {clash} are already registered")
    _FAMILIES[family.name] = family
    _MODEL_TYPES.update(dict.fromkeys(family.model_types, family))
    return family


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def family_names() -> tuple[str, ...]:
    return (*_FAMILIES, GENERIC)


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown family {name!r} (known: {', '.join(family_names())})") from None


def family_of(model: ModelDir) -> Family | None:
    """The family that claims the directory's model type (None: the generic fallback)."""
    return _MODEL_TYPES.get(model.model_type)


def detect_family(model_dir: str | Path | ModelDir) -> str:
    """The rollwire family of a model directory, from `config.json`'s `model_type`."""
    model = model_dir if isinstance(model_dir, ModelDir) else ModelDir.load(model_dir)
    found = family_of(model)
    return found.name if found is not None else GENERIC


def create_renderer(
    model: str | Path | ModelDir | Any,
    *,
    family: str | None = None,
    feature_store: FeatureStore | None = None,
    limits: ImageLimits | None = None,
    add_vision_id: bool = False,
    enable_thinking: bool = True,
    content_special_tokens: Literal["text", "control"] = "text",
) -> Renderer:
    """A renderer for `model`: a model directory (path or `ModelDir`), or a HF / `tokenizers`
    tokenizer object (then `family=` is required).

    The family comes from the directory's config unless given. Vision families get a
    `FeatureStore` configured from the directory's `preprocessor_config.json` (or the family
    defaults) unless one is passed. `enable_thinking=False` turns reasoning off where a family
    has the switch. Special-token text in message content is ordinary text unless
    `content_special_tokens="control"` (the HF templates' behaviour; the generic renderer always
    has it, since it tokenizes the template's output string).
    """
    if content_special_tokens not in ("text", "control"):
        raise UnsupportedModelError(
            f"content_special_tokens must be 'text' or 'control', got {content_special_tokens!r}")
    if isinstance(model, (str, Path)):
        model = ModelDir.load(model)
    if not isinstance(model, ModelDir):
        if family is None:
            raise UnsupportedModelError("pass family= when giving a tokenizer object")
        if family == GENERIC:
            return ChatTemplateRenderer(model)
        model = ModelDir.from_tokenizer(TextTokenizer.from_hf(model), model_type=family)
    name = family if family is not None else detect_family(model)
    if name == GENERIC:
        return generic_renderer(model, feature_store=feature_store, limits=limits)
    options = RenderOptions(feature_store=feature_store, limits=limits, add_vision_id=add_vision_id,
                            enable_thinking=enable_thinking)
    renderer = get_family(name).make_renderer(model, options)
    if isinstance(renderer, TemplateRenderer):
        renderer.plain_content = content_special_tokens == "text"
    return renderer


# The built-in families, one line each.
for _family in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3, QWEN3_5, GEMMA4):
    register_family(_family)
