"""What an image processor provides; the rest of rollwire treats its rows and grid as opaque.

A processor turns an RGB image into uint8 patch rows (resized and patchified, neither rescaled
nor normalised: what vLLM wants on the wire) and a grid `(t, h, w)` in patches; the image then
takes `t*h*w // merge_size**2` placeholder tokens. It also says how its rows become the float
pixels the HF processor returns by default, and which arrays the HF model's forward pass takes
for a batch of images. Each family's processor is its own module (`qwen_vl`, ...); the
content-addressed `FeatureStore` works with any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from rollwire.features.store import ImageFeatures

C = TypeVar("C")

# How pixels travel: uint8 patch rows (what vLLM 0.32 wants) or normalised floats.
PixelFormat: TypeAlias = Literal["uint8", "float32", "bfloat16"]


@dataclass(frozen=True)
class WireField:
    """One array of a vLLM `kwargs_data` item: its name, how vLLM splits it per item ("flat" along
    dim 0, or "batched"), whether it stays on the CPU, and whether it carries the pixel values (sent
    in the pixel format the server wants; the others go as the processor makes them). `pad_rows`:
    the pixel rows are zero-padded to this many (Gemma 4 pads every image to max_patches); 0: none."""

    name: str
    layout: Literal["flat", "batched"]
    keep_on_cpu: bool = False
    pixels: bool = False
    pad_rows: int = 0


@runtime_checkable
class ImageProcessor(Protocol):
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, where: str = ...) -> ImageProcessor:
        """The processor a `preprocessor_config.json` describes (`FeatureError` naming `where` if not)."""

    @property
    def merge_size(self) -> int:
        """Patches per token side: an image takes prod(grid) // merge_size**2 tokens."""

    @property
    def row_size(self) -> int:
        """uint8 values per patch row."""

    def fingerprint(self) -> str:
        """A short stable string over every setting that shapes the rows (part of each image id)."""

    def process(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Read-only uint8 rows and grid of an RGB image, bit-exact with the HF processor's
        un-rescaled, un-normalised output."""

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows equal to the HF processor's default (rescaled, normalised) output."""

    def model_inputs(self, features: Sequence[ImageFeatures]) -> dict[str, np.ndarray]:
        """The image arrays the HF model's forward pass takes for these images, in order."""

    def unresized_side(self) -> int:
        """The side of a square image this processor keeps as it is (a probe that needs no resize)."""

    def check_model(self, vision_config: Any) -> None:
        """Raise `FeatureError` unless rows of this processor fit the model's vision tower."""

    @property
    def wire_fields(self) -> tuple[WireField, ...]:
        """The arrays of one image's vLLM `kwargs_data` item (the model's multimodal field config)."""

    def wire_arrays(self, features: ImageFeatures) -> dict[str, np.ndarray]:
        """The item's non-pixel arrays for one image, by field name."""

    def from_wire(self, pixels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
        """The grid of a received item (its non-pixel arrays by name); `FeatureError` when they do not
        fit the pixels."""


def config_from(cls: Callable[..., C], cfg: Mapping[str, Any], keys: Sequence[str], where: str,
                **fixed: Any) -> C:
    """`cls(**fixed, **{k: cfg[k] for the keys cfg sets})`, a bad value named as a `FeatureError`."""
    from rollwire.errors import FeatureError

    kwargs = {**fixed, **{k: cfg[k] for k in keys if cfg.get(k) is not None}}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"{where}: invalid value: {exc}") from None
