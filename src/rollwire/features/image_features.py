"""One image's features: its uint8 patch rows, grid and content id (what the feature store holds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rollwire.errors import FeatureError
from rollwire.features.processor import ImageProcessor
from rollwire.images import image_hash

if TYPE_CHECKING:
    import torch

__all__ = ["ImageFeatures", "compute_features"]


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """One image's uint8 patch rows (read-only), its grid and its content id."""

    id: str
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    merge_size: int

    def __post_init__(self) -> None:
        pv = self.pixel_values
        grid = tuple(int(g) for g in self.grid_thw)
        if not isinstance(pv, np.ndarray) or pv.dtype != np.uint8 or pv.ndim != 2:
            raise FeatureError(f"image {self.id[:12]}: pixel_values must be a 2-D uint8 array")
        if len(grid) != 3 or min(grid) <= 0 or pv.shape[0] != math.prod(grid):
            raise FeatureError(
                f"image {self.id[:12]}: grid {self.grid_thw} does not match {pv.shape[0]} rows")
        m = self.merge_size
        if m <= 0 or grid[1] % m or grid[2] % m:
            raise FeatureError(f"image {self.id[:12]}: grid {grid} is not a multiple of merge size {m}")
        if pv.flags.writeable:
            pv = pv.view()
            pv.flags.writeable = False
        object.__setattr__(self, "pixel_values", pv)
        object.__setattr__(self, "grid_thw", grid)

    @property
    def num_tokens(self) -> int:
        """Image pad tokens this image takes in the prompt."""
        return math.prod(self.grid_thw) // (self.merge_size * self.merge_size)

    @property
    def nbytes(self) -> int:
        return int(self.pixel_values.nbytes)

    def normalized(self, config: ImageProcessor, dtype: Any = np.float32) -> np.ndarray:
        """Rescaled and normalised float rows, equal to the HF processor's default output."""
        out_dtype = np.dtype(dtype)
        if out_dtype.kind != "f":
            raise FeatureError(
                f"normalized() needs a float dtype, got {out_dtype} (for bfloat16 use normalized_torch)")
        if self.pixel_values.shape[1] != config.row_size:
            raise FeatureError(f"image {self.id[:12]}: rows have {self.pixel_values.shape[1]} values but the "
                               f"processor makes {config.row_size}")
        out = config.normalize(self.pixel_values)
        return out if out_dtype == np.float32 else out.astype(out_dtype)

    def normalized_torch(self, config: ImageProcessor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`normalized` as a torch tensor in `dtype` (e.g. torch.bfloat16); imports torch lazily."""
        try:
            import torch
        except ImportError:
            raise FeatureError("normalized_torch needs torch installed") from None
        tensor = torch.from_numpy(self.normalized(config))
        return tensor if dtype is None or dtype == torch.float32 else tensor.to(dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageFeatures):
            return NotImplemented
        return (self.id == other.id and self.grid_thw == other.grid_thw
                and self.merge_size == other.merge_size
                and np.array_equal(self.pixel_values, other.pixel_values))

    def __hash__(self) -> int:
        return hash(self.id)


def compute_features(rgb_image: Image.Image, config: ImageProcessor) -> ImageFeatures:
    """Hash and process an RGB image (no store involved)."""
    image_id = image_hash(rgb_image, config.fingerprint())
    rows, grid = config.process(rgb_image)
    return ImageFeatures(image_id, rows, grid, config.merge_size)
