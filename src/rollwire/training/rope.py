"""M-RoPE position ids for training samples, computed by the model's own `get_rope_index`.

Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) place image tokens on a 3-D grid
(temporal, height, width) and text after an image continues from the grid's largest side, so the
positions a trainer must pass are not `arange(L)`. Rather than re-deriving that rule, rollwire calls
the transformers model's `get_rope_index` with the arguments the model's forward pass gives it
(transformers 5.x: `input_ids`, `mm_token_type_ids`, `image_grid_thw`, `attention_mask`). The model
is built on torch's meta device from the directory's config, so no weight is loaded. torch is needed
only when positions are asked for.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from rollwire.errors import SampleError
from rollwire.render.model_dir import ModelDir
from rollwire.render.registry import family_of

__all__ = ["RopeIndex"]


class RopeIndex:
    """`(input_ids (L,), mm_token_type_ids (L,), image_grid_thw (n, 3) | None) -> (3, L) int64`.

    Build it from a loaded transformers model (`from_model`, the outer `...ForConditionalGeneration`
    or its inner model) or from a model directory (`from_model_dir`, built on the meta device).
    A model without `get_rope_index` (Gemma 4, text-only families: plain 1-D positions) is refused.
    """

    def __init__(self, get_rope_index: Any, *, name: str = "model") -> None:
        params = inspect.signature(get_rope_index).parameters
        if "mm_token_type_ids" not in params:
            raise SampleError(f"{name}.get_rope_index takes no mm_token_type_ids: rollwire needs transformers >= 5.2")
        self._fn = get_rope_index
        self.name = name

    @classmethod
    def from_model(cls, model: Any) -> RopeIndex:
        for owner in (model, getattr(model, "model", None)):
            fn = getattr(owner, "get_rope_index", None)
            if fn is not None:
                return cls(fn, name=type(owner).__name__)
        raise SampleError(f"{type(model).__name__} has no get_rope_index (its positions are 1-D: no M-RoPE)")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | ModelDir) -> RopeIndex:
        """The directory's transformers class (as its family record names it), built without weights."""
        model = model_dir if isinstance(model_dir, ModelDir) else ModelDir.load(model_dir)
        family = family_of(model)
        class_name = family.model_types.get(model.model_type) if family is not None else None
        if class_name is None:
            raise SampleError(f"model type {model.model_type!r} of {model.path} has no M-RoPE model class in the "
                              "family registry")
        torch, transformers = _import_torch_transformers()
        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            raise SampleError(f"transformers {transformers.__version__} has no {class_name}")
        config = transformers.AutoConfig.from_pretrained(str(model.path))
        with torch.device("meta"):
            built = model_class._from_config(config)
        return cls.from_model(built)

    def __call__(self, input_ids: Any, mm_token_type_ids: Any, image_grid_thw: Any | None) -> np.ndarray:
        torch, _ = _import_torch_transformers()
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
        types = torch.as_tensor(np.asarray(mm_token_type_ids, dtype=np.int64))[None]
        grid = None if image_grid_thw is None else torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64))
        n_images = 0 if grid is None else int(grid.shape[0])
        runs = int(((types[0, 1:] == 1) & (types[0, :-1] != 1)).sum()) + int(types.shape[1] > 0 and types[0, 0] == 1)
        if runs != n_images:
            raise SampleError(f"{runs} image token runs but {n_images} image grids: positions would be wrong")
        with torch.inference_mode():
            positions, _ = self._fn(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                    attention_mask=torch.ones_like(ids))
        out = positions[:, 0, :].to(torch.int64).numpy()
        if out.shape != (3, ids.shape[1]):
            raise SampleError(f"{self.name}.get_rope_index gave positions of shape {tuple(out.shape)}, "
                              f"expected (3, {ids.shape[1]})")
        return np.ascontiguousarray(out)


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise SampleError("M-RoPE position_ids need torch (pip install 'rollwire[local]')") from None
    return torch, transformers
