"""A model family as data: one frozen record per family, kept in the registry.

The record says everything the rest of rollwire needs to know about a family: which
`config.json` model types it covers, how to build its renderer from a `ModelDir`, its image
processor defaults, the transformers class the local engine loads, and how to build a tiny
random-weight model of it. Nothing outside a family module branches on a family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollwire.features import FeatureStore, ImageProcessor
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir
    from rollwire.render.types import Renderer


@dataclass(frozen=True)
class RenderOptions:
    """Caller's switches that every family reads the same way (a family ignores what it lacks)."""

    feature_store: FeatureStore | None = None
    limits: ImageLimits | None = None
    add_vision_id: bool = False
    enable_thinking: bool = True

    def store_for(self, model: ModelDir, default: Callable[[], ImageProcessor]) -> FeatureStore:
        """The caller's feature store, else a new one with the folder's (or the default) settings."""
        from rollwire.features import FeatureStore

        if self.feature_store is not None:  # an empty store is falsy (it has a length)
            return self.feature_store
        return FeatureStore(vision_config(model, default))


@dataclass(frozen=True)
class TinySpec:
    """How `rollwire tiny-model` builds a random-weight model of the family.

    `config_class` and `model_class` name transformers classes; `config` is the tiny config's
    keyword arguments; `tokenizer` and `chat_template` name sources known to `rollwire.tiny_model`
    (`chat_template="tokenizer"` keeps the tokenizer's own, None writes none); `image_processor`
    holds the keyword arguments of the processor config it writes. `revision` is bumped when the
    family's tiny model changes, so a cached copy built from the old spec is not reused.
    """

    config_class: str
    model_class: str
    config: Mapping[str, Any]
    tokenizer: str = "qwen"
    chat_template: str | None = None
    image_processor: Mapping[str, Any] | None = None
    revision: int = 0


@dataclass(frozen=True)
class Family:
    """One model family: the registry's unit."""

    name: str
    # config.json model_type -> the transformers class the local engine loads it with
    # (None: AutoModelForCausalLM)
    model_types: Mapping[str, str | None]
    make_renderer: Callable[[ModelDir, RenderOptions], Renderer]
    vision: Callable[[], ImageProcessor] | None = None  # processor defaults when the folder has no config
    tiny: TinySpec | None = None

    @property
    def is_vision(self) -> bool:
        return self.vision is not None


def vision_config(model: ModelDir, default: Callable[[], ImageProcessor]) -> ImageProcessor:
    """The folder's image-processor settings (`preprocessor_config.json`, read by the family's
    processor class), else the family's defaults."""
    processor = default()
    if model.preprocessor is None:
        return processor
    return type(processor).from_dict(model.preprocessor, where=str(model.path / "preprocessor_config.json"))
