"""Messages to token ids plus image refs, one module per model family."""

from rollwire.render.family import Family, RenderOptions, TinySpec, vision_config
from rollwire.render.model_dir import ModelDir
from rollwire.render.placeholders import expected_length, validate_placeholders
from rollwire.render.pool import RendererPool
from rollwire.render.registry import (
    GENERIC,
    create_renderer,
    detect_family,
    families,
    family_names,
    family_of,
    get_family,
    register_family,
)
from rollwire.render.types import BridgeResult, ImageRef, ParsedResponse, RenderedTokens, Renderer

__all__ = [
    "GENERIC",
    "BridgeResult",
    "Family",
    "ImageRef",
    "ModelDir",
    "ParsedResponse",
    "RenderOptions",
    "RenderedTokens",
    "Renderer",
    "RendererPool",
    "TinySpec",
    "create_renderer",
    "detect_family",
    "expected_length",
    "families",
    "family_names",
    "family_of",
    "get_family",
    "register_family",
    "validate_placeholders",
    "vision_config",
]
