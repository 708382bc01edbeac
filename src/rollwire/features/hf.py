"""The `ImageProcessor` protocol around a Hugging Face image processor object (the generic vision path).

`process` runs the HF processor on one image with `do_rescale=False, do_normalize=False` and keeps
its output as uint8 rows (refused unless integral in 0..255) with the per-image `image_grid_thw`.
`normalize` maps each column through a 256-entry table built with the processor's own `rescale`
and `normalize` methods; construction proves on probe images that this equals the processor's
default output bit for bit, so a processor whose normalisation is not per-channel elementwise is
refused (`UnsupportedProcessorError`, naming its class) instead of giving other pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rollwire.errors import FeatureError, ImageRejectedError, RollwireError, UnsupportedProcessorError
from rollwire.features.processor import WireField

if TYPE_CHECKING:
    from rollwire.features.store import ImageFeatures

__all__ = ["HFImageProcessor"]

GRID_KEY = "image_grid_thw"
_PROBE_COLOURS = (11, 97, 203)  # one constant per channel, far apart: resampling keeps them within ±3
_MAX_PROBE_STEPS = 64
# The vLLM layout of grid-based processors (rows flat, split per image by grid size; the grid
# batched on the CPU): what the rows and `image_grid_thw` this adapter requires travel as.
GRID_WIRE = (WireField("pixel_values", "flat", pixels=True), WireField(GRID_KEY, "batched", keep_on_cpu=True))


class HFImageProcessor:
    """A transformers image processor as rollwire's `ImageProcessor` (checked on probes at init)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.name = type(processor).__name__
        self._merge = _merge_size(processor, self.name)
        self._fingerprint = _fingerprint(processor)
        self._channels = self._probe_channels()
        self._table = self._build_table()
        self._check_normalize()
        self._side: int | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> HFImageProcessor:
        """The directory's image processor, its PIL backend where transformers has one (the
        torchvision backend resizes differently, and its C ops may be missing)."""
        try:
            from transformers import AutoImageProcessor
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise UnsupportedProcessorError(f"the generic vision path needs transformers ({exc})") from None
        try:
            return cls(AutoImageProcessor.from_pretrained(str(model_dir), backend="pil"))
        except RollwireError:
            raise
        except Exception:  # no PIL class for this processor: take the default backend
            pass
        try:
            processor = AutoImageProcessor.from_pretrained(str(model_dir))
        except Exception as exc:
            raise UnsupportedProcessorError(f"cannot load the image processor of {model_dir}: {exc}") from None
        return cls(processor)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, where: str = "preprocessor config") -> HFImageProcessor:
        """The processor `cfg["image_processor_type"]` names (its PIL class where there is one),
        built from the rest of `cfg`."""
        name = cfg.get("image_processor_type")
        if not isinstance(name, str) or not name:
            raise UnsupportedProcessorError(f"{where}: no image_processor_type")
        try:
            from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

            found = [get_image_processor_class_from_name(n) for n in (name.removesuffix("Pil") + "Pil", name)]
            klass = next(k for k in found if k is not None)
            processor = klass.from_dict({k: v for k, v in cfg.items() if k != "image_processor_type"})
        except RollwireError:
            raise
        except Exception as exc:  # StopIteration: transformers knows neither class
            raise UnsupportedProcessorError(f"{where}: cannot build {name} ({type(exc).__name__}: {exc})") from None
        return cls(processor)

    # --- the ImageProcessor protocol ------------------------------------------------------------

    @property
    def merge_size(self) -> int:
        return self._merge

    @property
    def row_size(self) -> int:
        return int(self._channels.shape[0])

    def fingerprint(self) -> str:
        return self._fingerprint

    def process(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        raw, grid = self._run(image, do_rescale=False, do_normalize=False)
        rows = _as_uint8(raw, self.name)
        if rows.shape[1] != self.row_size:
            raise FeatureError(f"{self.name} made rows of {rows.shape[1]} values for a {image.size} image; "
                               f"its probe made {self.row_size}")
        rows.flags.writeable = False
        return rows, grid

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        if rows.ndim != 2 or rows.shape[1] != self.row_size or rows.dtype != np.uint8:
            raise FeatureError(f"{self.name}: normalize needs uint8 rows of {self.row_size} values, "
                               f"got {rows.dtype} {rows.shape}")
        return self._table[self._channels[None, :], rows]

    def model_inputs(self, features: Sequence[ImageFeatures]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.concatenate([self.normalize(f.pixel_values) for f in features]),
                GRID_KEY: np.array([f.grid_thw for f in features], dtype=np.int64).reshape(-1, 3)}

    @property
    def wire_fields(self) -> tuple[WireField, ...]:
        return GRID_WIRE

    def wire_arrays(self, features: ImageFeatures) -> dict[str, np.ndarray]:
        return {GRID_KEY: np.asarray(features.grid_thw, dtype=np.int64)}

    def from_wire(self, pixels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
        grid = np.asarray(arrays[GRID_KEY])
        if pixels.ndim != 2 or grid.shape != (3,) or grid.dtype != np.int64:
            raise FeatureError(f"{self.name}: pixel_values must be 2-D and {GRID_KEY} 3 int64 values, got "
                               f"{pixels.shape}, {grid.dtype} {grid.shape}")
        t, h, w = (int(v) for v in grid)
        if min(t, h, w) <= 0 or t * h * w != pixels.shape[0] or pixels.shape[1] != self.row_size:
            raise FeatureError(f"{self.name}: grid {[t, h, w]} does not fit pixel_values {pixels.shape}")
        return t, h, w

    def unresized_side(self) -> int:
        """The smallest multiple of patch * merge whose square image processes the same with and
        without `do_resize` (found by probing once)."""
        if self._side is None:
            step = int(getattr(self.processor, "patch_size", 1) or 1) * self._merge
            for k in range(1, _MAX_PROBE_STEPS + 1):
                probe = _random_image(step * k, step * k, seed=k)
                try:
                    kept = self._run(probe, do_resize=False, do_rescale=False, do_normalize=False)
                except RollwireError:
                    continue
                resized = self._run(probe, do_rescale=False, do_normalize=False)
                if kept[1] == resized[1] and np.array_equal(kept[0], resized[0]):
                    self._side = step * k
                    break
            else:
                raise UnsupportedProcessorError(f"{self.name} resizes every square image up to side "
                                                f"{step * _MAX_PROBE_STEPS}: no probe keeps its size")
        return self._side

    def check_model(self, vision_config: Any) -> None:
        """Checks what the vision config declares: row size from `patch_size` (and temporal patch
        and channels where given), and `spatial_merge_size`."""
        patch = getattr(vision_config, "patch_size", None)
        if isinstance(patch, int):
            temporal = int(getattr(vision_config, "temporal_patch_size", 1) or 1)
            channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "num_channels", 3)) or 3)
            if channels * temporal * patch * patch != self.row_size:
                raise FeatureError(f"{self.name} makes rows of {self.row_size} values; the vision tower takes "
                                   f"{channels * temporal * patch * patch}")
        merge = getattr(vision_config, "spatial_merge_size", None)
        if isinstance(merge, int) and merge != self._merge:
            raise FeatureError(f"{self.name} merges {self._merge} patches per side; the vision tower {merge}")

    # --- probes ---------------------------------------------------------------------------------

    def _run(self, image: Image.Image, **kwargs: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(pixel_values, grid) of one image, everything the processor returns checked."""
        try:
            out = self.processor(images=[image], return_tensors="np", **kwargs)
        except Exception as exc:  # a foreign library: any failure on this image is a rejection
            raise ImageRejectedError(f"{self.name} rejects the {image.size[0]}x{image.size[1]} image: "
                                     f"{type(exc).__name__}: {exc}") from None
        if GRID_KEY not in out:
            raise UnsupportedProcessorError(f"{self.name} returns no per-image grid ({GRID_KEY}), only "
                                            f"{sorted(out)}: the generic vision path needs one")
        pixels, grid = np.asarray(out["pixel_values"]), np.asarray(out[GRID_KEY])
        if grid.shape != (1, 3) or grid.dtype.kind not in "iu" or int(grid.min()) <= 0:
            raise UnsupportedProcessorError(f"{self.name}: {GRID_KEY} for one image is {grid.tolist()}, not (t, h, w)")
        thw = (int(grid[0, 0]), int(grid[0, 1]), int(grid[0, 2]))
        if pixels.ndim != 2 or pixels.shape[0] != math.prod(thw):
            raise UnsupportedProcessorError(f"{self.name}: pixel_values {pixels.shape} is not one row per patch "
                                            f"of grid {thw}")
        return pixels, thw

    def _probe(self, image: Image.Image, **kwargs: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        try:
            return self._run(image, **kwargs)
        except ImageRejectedError as exc:
            raise UnsupportedProcessorError(f"probe image: {exc}") from None

    def _probe_channels(self) -> np.ndarray:
        """The colour channel of every row column, read from a constant-colour probe."""
        colour = np.broadcast_to(np.array(_PROBE_COLOURS, dtype=np.uint8), (48, 64, 3))
        raw, _ = self._probe(Image.fromarray(np.ascontiguousarray(colour)), do_rescale=False, do_normalize=False)
        rows = _as_uint8(raw, self.name).astype(np.int16)
        distance = np.abs(rows[:, :, None] - np.array(_PROBE_COLOURS, dtype=np.int16))
        channel = distance.argmin(axis=2)
        if int(distance.min(axis=2).max()) > 3 or not bool((channel == channel[0]).all()):
            raise UnsupportedProcessorError(f"{self.name}: row columns do not each hold one colour channel "
                                            "(a constant-colour probe does not come back per channel)")
        return channel[0].astype(np.intp)

    def _build_table(self) -> np.ndarray:
        """(3, 256) float32: each uint8 value per channel through the processor's own arithmetic."""
        proc = self.processor
        ramp = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)))
        values: Any = ramp
        try:
            if getattr(proc, "do_rescale", False):
                values = proc.rescale(values, proc.rescale_factor)
            if getattr(proc, "do_normalize", False):
                values = proc.normalize(values, proc.image_mean, proc.image_std)
            table = np.asarray(values, dtype=np.float32).reshape(3, 256)
        except Exception as exc:
            raise UnsupportedProcessorError(f"{self.name}: its rescale/normalize cannot be applied to uint8 "
                                            f"values ({type(exc).__name__}: {exc})") from None
        table.flags.writeable = False
        return table

    def _check_normalize(self) -> None:
        for seed, (w, h) in enumerate(((64, 48), (45, 97))):
            probe = _random_image(w, h, seed=seed)
            ref, _ = self._probe(probe)
            raw, _ = self._probe(probe, do_rescale=False, do_normalize=False)
            ours = self.normalize(_as_uint8(raw, self.name))
            if ref.dtype != np.float32 or not np.array_equal(ref, ours):
                diff = float(np.abs(ref.astype(np.float64) - ours).max()) if ref.shape == ours.shape else math.inf
                raise UnsupportedProcessorError(
                    f"{self.name}: its default output ({ref.dtype}) cannot be reproduced from uint8 rows by a "
                    f"per-channel table (max difference {diff:g} on a {w}x{h} probe)")


def _merge_size(processor: Any, name: str) -> int:
    for attr in ("merge_size", "spatial_merge_size"):
        value = getattr(processor, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise UnsupportedProcessorError(f"{name} declares no merge_size: its placeholder count cannot be derived")


def _as_uint8(raw: np.ndarray, name: str) -> np.ndarray:
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if raw.dtype.kind in "iuf" and raw.size:
        low, high = float(raw.min()), float(raw.max())
        if low >= 0 and high <= 255 and (raw.dtype.kind in "iu" or bool((raw == np.rint(raw)).all())):
            return raw.astype(np.uint8)
    raise UnsupportedProcessorError(f"{name}: un-normalised output ({raw.dtype}) is not integral in 0..255, "
                                    "so it cannot travel as uint8 rows")


def _fingerprint(processor: Any) -> str:
    cls = type(processor)
    try:
        settings = processor.to_dict()
    except Exception as exc:
        raise UnsupportedProcessorError(f"{cls.__name__} cannot list its settings ({exc})") from None
    text = json.dumps({"v": 1, "class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings},
                      sort_keys=True, default=str)
    return f"hf1-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def _random_image(width: int, height: int, *, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
