"""The embedded engine's image tensors: each image's model inputs made (normalised) once, by image id.

A multi-turn prompt carries every earlier image again on every turn; making their tensors anew
each time is O(turns²) work. This is a byte-bounded LRU beside the feature store (a second copy,
as float tensors on the engine's device), used from the engine's worker thread only. torch
arrives as an argument: importing this module does not import torch.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from rollwire.features import ImageFeatures, ImageProcessor

if TYPE_CHECKING:
    import torch

__all__ = ["ImageInputs"]


class ImageInputs:
    """`inputs(features)`: the model's image kwargs for these images, in order, concatenated.

    An image's tensors larger than `max_bytes` are made and used but not kept; `max_bytes=0`
    keeps none (every image normalised again on every turn, as before the cache).
    """

    def __init__(self, torch: Any, device: torch.device, processor: ImageProcessor, max_bytes: int) -> None:
        self._torch, self._device, self._processor = torch, device, processor
        self.max_bytes = max_bytes
        self.nbytes = 0  # what the kept tensors hold
        self._cache: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def inputs(self, features: list[ImageFeatures]) -> dict[str, torch.Tensor]:
        parts: list[dict[str, torch.Tensor]] = []
        for feat in features:
            cached = self._cache.get(feat.id)
            if cached is None:
                arrays = self._processor.model_inputs([feat])
                cached = {k: self._torch.from_numpy(v).to(self._device) for k, v in arrays.items()}
                size = _nbytes(cached)
                if size <= self.max_bytes:
                    self._cache[feat.id] = cached
                    self.nbytes += size
                    while self.nbytes > self.max_bytes:
                        _, old = self._cache.popitem(last=False)
                        self.nbytes -= _nbytes(old)
            else:
                self._cache.move_to_end(feat.id)
            parts.append(cached)
        return {k: self._torch.cat([p[k] for p in parts]) for k in parts[0]}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
