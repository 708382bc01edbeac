"""The transformers model as the embedded engine runs it: loading, its facts, its two forward passes.

Loading picks the class from the family record (or, for a vision model no family claims,
`config.json`'s `architectures`) and checks that the feature store fits the vision tower. The
passes are a batched, left-padded prefill (every image of every prompt in one vision pass) and
one cached decode step. Positions are computed once per prompt with the model's own
`get_rope_index` (M-RoPE for Qwen-VL) and passed explicitly at every step, so the model's
stateful `rope_deltas` is never used and prefill + cached decode equals one full forward pass.
torch and transformers are imported when a model is loaded, not when this module is.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollwire.engines.local_image_inputs import ImageInputs
from rollwire.errors import EngineUnavailableError, FeatureError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.render import ImageRef, ModelDir, family_of

if TYPE_CHECKING:
    import torch

__all__ = ["LocalModel", "model_class"]

LOCAL_HINT = "pip install 'rollwire[local]'"

Prompt = tuple[Sequence[int], tuple[ImageRef, ...]]  # token ids and the images they hold


class LocalModel:
    """`model` loaded on `device` in `dtype`; a vision model needs the renderer's `feature_store`
    (`EngineUnavailableError` otherwise, or when anything cannot load). `image_cache_bytes`
    bounds the image tensors kept between turns (`ImageInputs`)."""

    def __init__(self, model: ModelDir, *, feature_store: FeatureStore | None, device: str, dtype: str,
                 image_cache_bytes: int) -> None:
        self.torch, transformers = _import_backend()
        self.is_vision, cls = model_class(transformers, model)
        self.module = _load_model(self.torch, cls, model.path, device, dtype)
        self.device = self.torch.device(device)
        config = self.module.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(self.module.get_input_embeddings().num_embeddings)
        self.max_model_len = int(getattr(text_config, "max_position_embeddings", 0) or 2**31)
        self.eos_token_ids = _eos_ids(self.module)
        self.pad_token_id = _pad_id(text_config, self.eos_token_ids)
        self.image_pad_id = _image_pad_id(model, config) if self.is_vision else None
        self.image_inputs: ImageInputs | None = None
        if self.is_vision:
            if feature_store is None:
                raise EngineUnavailableError(f"{model.path.name} is a vision model: pass the renderer's feature_store=")
            _check_store(feature_store, config)
            self.image_inputs = ImageInputs(self.torch, self.device, feature_store.config, image_cache_bytes)
        params = inspect.signature(self.module.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._rope_index = _rope_index_fn(self.module) if self.is_vision else None

    def prefill(self, prompts: Sequence[Prompt],
                features: list[ImageFeatures]) -> tuple[torch.Tensor, Any, torch.Tensor | None, list[int]]:
        """Run the left-padded prompts (and `features`, every image of them in order) once; return
        last-position logits, the cache, the padding mask (None without padding) and each prompt's
        next position."""
        torch = self.torch
        width = max(len(prompt) for prompt, _ in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        mm_types = torch.zeros((len(prompts), width), dtype=torch.long)
        axes = 3 if self._rope_index is not None else 1  # M-RoPE axes; Gemma 4 has plain positions
        position_ids = torch.zeros((axes, len(prompts), width), dtype=torch.long)
        next_positions: list[int] = []
        for b, (prompt_ids, refs) in enumerate(prompts):
            pad = width - len(prompt_ids)
            prompt = torch.tensor(prompt_ids, dtype=torch.long)
            ids[b, pad:] = prompt
            mask[b, pad:] = 1
            for ref in refs:
                mm_types[b, pad + ref.offset : pad + ref.end] = 1
            positions, next_position = self._prompt_positions(prompt, mm_types[b, pad:], refs)
            position_ids[:, b, pad:] = positions
            next_positions.append(next_position)
        padded = not bool(mask.all())
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device) if padded else None,
            "position_ids": (position_ids if axes == 3 else position_ids[0]).to(self.device),
            self._cache_kwarg: _new_cache(self.module),
            "use_cache": True,
        }
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        if self.is_vision:
            kwargs["mm_token_type_ids"] = mm_types.to(self.device)
            if features:
                assert self.image_inputs is not None
                for name, tensor in self.image_inputs.inputs(features).items():
                    kwargs[name] = tensor
        out = self.module(**kwargs)
        logits = out.logits[:, -1, :].float()
        return logits, kwargs[self._cache_kwarg], kwargs["attention_mask"], next_positions

    def _prompt_positions(self, prompt: torch.Tensor, mm_types: torch.Tensor,
                          refs: tuple[ImageRef, ...]) -> tuple[torch.Tensor, int]:
        """(axes, len) positions of one unpadded prompt and the position of the token after it."""
        torch = self.torch
        if not refs or self._rope_index is None:
            return torch.arange(len(prompt)), len(prompt)
        grids = torch.tensor([ref.grid_thw for ref in refs], dtype=torch.long)
        positions, delta = self._rope_index(prompt[None], mm_types[None], grids)
        return positions[:, 0, :], len(prompt) + int(delta.reshape(-1)[0])

    def decode_step(self, tokens: list[int], positions: list[int], cache: Any,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One cached step: `tokens[i]` (row i's last sampled token) at `positions[i]`; returns the
        next logits and the mask grown by one column."""
        torch = self.torch
        ids = torch.tensor([[token] for token in tokens], dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        position_ids = pos.view(1, -1, 1).expand(3, -1, -1) if self._rope_index is not None else pos.view(-1, 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float(), mask

    @staticmethod
    def select_rows(cache: Any, index: torch.Tensor) -> None:
        """Keep the cache rows `index` in every layer: key/value and linear-attention (conv, recurrent)
        states alike (`reorder_cache` is the per-layer row selection every cache layer has)."""
        for layer in cache.layers:
            layer.reorder_cache(index)


def _import_backend() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EngineUnavailableError(f"the local engine needs torch and transformers ({exc}): {LOCAL_HINT}") from None
    return torch, transformers


def model_class(transformers: Any, model: ModelDir) -> tuple[bool, Any]:
    """(is_vision, transformers class) of the directory: from its family's record, or for a vision
    model no family claims (the generic path) from `config.json`'s `architectures`."""
    family = family_of(model)
    name = family.model_types.get(model.model_type) if family is not None else None
    if name is None:
        is_vision = "vision_config" in model.config or (family is not None and family.is_vision)
        if not is_vision:
            return False, transformers.AutoModelForCausalLM
        architectures = model.config.get("architectures")
        name = architectures[0] if family is None and isinstance(architectures, list) and architectures else None
        if not isinstance(name, str):
            raise EngineUnavailableError(f"model type {model.model_type!r} is a vision model whose transformers "
                                         "class neither a family record nor config.json's architectures names")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise EngineUnavailableError(f"transformers {transformers.__version__} has no {name}: upgrade it")
    return True, cls


def _load_model(torch: Any, cls: Any, model_dir: Path, device: str, dtype: str) -> Any:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise EngineUnavailableError(f"dtype must name a torch float type (float32, bfloat16, ...), got {dtype!r}")
    try:
        model = cls.from_pretrained(str(model_dir), dtype=torch_dtype)
        model.to(device)
    except Exception as exc:  # transformers/torch raise many kinds; name the model that failed
        raise EngineUnavailableError(f"cannot load {model_dir} with {cls.__name__}: {exc}") from exc
    model.eval()
    return model


def _eos_ids(model: Any) -> frozenset[int]:
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else (int(t) for t in eos))
    return frozenset()


def _pad_id(text_config: Any, eos_ids: frozenset[int]) -> int:
    """The token left padding is filled with (masked out, so any valid id works)."""
    pad = getattr(text_config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return min(eos_ids) if eos_ids else 0


def _image_pad_id(model: ModelDir, config: Any) -> int:
    """The placeholder id the model's forward pass looks for (its config's `image_token_id`)."""
    pad = getattr(config, "image_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise EngineUnavailableError(f"the config of {model.path} names no image_token_id")
    return pad


def _check_store(store: FeatureStore, config: Any) -> None:
    """The store's features must have the shape the model's vision tower takes."""
    try:
        store.config.check_model(config.vision_config)
    except FeatureError as exc:
        raise EngineUnavailableError(f"the feature store does not fit {type(config).__name__}: {exc}") from None


def _rope_index_fn(model: Any) -> Any:
    """`(input_ids, mm_token_type_ids, image_grid_thw) -> (positions (3,1,L), delta)` from the model
    (None: the model has no M-RoPE, its positions are 1-D)."""
    owner = model if hasattr(model, "get_rope_index") else model.model
    rope_index = getattr(owner, "get_rope_index", None)
    if rope_index is None:
        return None
    takes_types = "mm_token_type_ids" in inspect.signature(rope_index).parameters

    def positions(input_ids: Any, mm_types: Any, grids: Any) -> Any:
        if takes_types:
            return rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grids)
        return rope_index(input_ids, image_grid_thw=grids)

    return positions


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
