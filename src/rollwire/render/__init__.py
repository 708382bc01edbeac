"""Messages to token ids plus image refs, one module per model family."""

from rollwire.render.factory import FAMILIES, create_renderer, detect_family
from rollwire.render.placeholders import expected_length, validate_placeholders
from rollwire.render.pool import RendererPool
from rollwire.render.types import BridgeResult, ImageRef, ParsedResponse, RenderedTokens, Renderer

__all__ = [
    "FAMILIES",
    "BridgeResult",
    "ImageRef",
    "ParsedResponse",
    "RenderedTokens",
    "Renderer",
    "RendererPool",
    "create_renderer",
    "detect_family",
    "expected_length",
    "validate_placeholders",
]
