"""Gemma 4 features against the real HF `Gemma4ImageProcessorPil`: uint8 rows bit-exact, default
float output and the batched model inputs (padding and position ids) equal, token counts equal."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from rollwire.errors import EmptyImageError, FeatureError, ImageError
from rollwire.features import FeatureStore
from rollwire.features.gemma4 import Gemma4Vision, gemma4_resize
from test_features import MODES
from test_features import make_image as mode_image

pytest.importorskip("transformers.models.gemma4")
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)

# (width, height): tiny (upscaled), exact multiples of 48, huge, and extreme aspect ratios (the
# processor never rejects those: a side that rounds to 0 becomes one 48-pixel strip).
SIZES = [(1, 1), (2, 3), (27, 29), (48, 48), (100, 80), (769, 767), (2000, 50), (50, 2000), (1500, 2000),
         (10000, 1), (1, 10000), (13441, 2), (47, 1)]


def hf(config: Gemma4Vision, images: list[Image.Image], **kwargs: Any) -> Any:
    processor = Gemma4ImageProcessorPil(max_soft_tokens=config.max_soft_tokens, patch_size=config.patch_size,
                                        pooling_kernel_size=config.pooling_kernel_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(images=images, return_tensors="np", **kwargs)


def assert_parity(images: list[Image.Image], config: Gemma4Vision) -> None:
    store = FeatureStore(config)
    feats = [store.get_or_process(im) for im in images]
    raw, default = hf(config, images, do_rescale=False), hf(config, images)
    for b, f in enumerate(feats):
        n = f.pixel_values.shape[0]
        assert f.pixel_values.dtype == np.uint8 and f.pixel_values.shape[1] == 768
        assert np.array_equal(f.pixel_values.astype(np.float32), raw["pixel_values"][b, :n])
        assert not raw["pixel_values"][b, n:].any()  # the rest is padding
        assert f.num_tokens == int(default["num_soft_tokens_per_image"][b]) == n // 9
        assert f.normalized(config).tobytes() == default["pixel_values"][b, :n].tobytes()
    inputs = config.model_inputs(feats)
    assert inputs.keys() == {"pixel_values", "image_position_ids"}
    for key in inputs:
        assert inputs[key].dtype == default[key].dtype and inputs[key].shape == default[key].shape, key
        assert np.array_equal(inputs[key], default[key]), key


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rows_and_inputs_equal_the_hf_processor(size: tuple[int, int]) -> None:
    assert_parity([make_image(*size, seed=size[0])], Gemma4Vision())


@pytest.mark.parametrize("mode", MODES)
def test_modes(mode: str) -> None:
    assert_parity([mode_image(mode, 100, 80, seed=3)], Gemma4Vision())


@pytest.mark.parametrize("soft", [70, 140, 560, 1120])
def test_other_budgets_and_a_batch(soft: int) -> None:
    images = [make_image(300, 400, seed=1), make_image(48, 48, "RGBA", seed=2), make_image(2000, 50, seed=3)]
    assert_parity(images, Gemma4Vision(max_soft_tokens=soft))


def test_resize_arithmetic_equals_hf_on_many_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 6000, (2000, 2))] + [(1, k) for k in range(1, 200)]
    checked = 0
    for soft in (70, 280, 1120):
        for h, w in sizes:
            try:
                want: tuple[int, int] | None = get_aspect_ratio_preserving_size(h, w, 16, soft * 9, 3)
            except ValueError:
                want = None
            if want is None:
                with pytest.raises(ImageError):
                    gemma4_resize(h, w, 16, soft * 9, 3)
            else:
                assert gemma4_resize(h, w, 16, soft * 9, 3) == want, (h, w, soft)
            checked += 1
    assert checked == 3 * len(sizes)
    with pytest.raises(EmptyImageError):
        gemma4_resize(0, 5, 16, 2520, 3)


def test_unresized_side_is_kept_as_is() -> None:
    for soft in (70, 280, 1120):
        config = Gemma4Vision(max_soft_tokens=soft)
        side = config.unresized_side()
        assert gemma4_resize(side, side, 16, config.max_patches, 3) == (side, side)


def test_from_dict_reads_what_hf_saves(tmp_path: Path) -> None:
    Gemma4ImageProcessorPil(max_soft_tokens=70).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config = Gemma4Vision.from_dict(cfg)
    assert config == Gemma4Vision(max_soft_tokens=70)
    assert Gemma4Vision.from_dict({"image_processor": cfg}) == config  # a processor_config.json
    assert config.fingerprint() != Gemma4Vision().fingerprint()
    for bad in ({"max_soft_tokens": 100}, {"do_rescale": False}, {"patch_size": 0}, {"image_std": [1, 0, 1]}):
        with pytest.raises(FeatureError):
            Gemma4Vision.from_dict({**cfg, **bad})


def test_check_model_and_mode_errors() -> None:
    config = Gemma4Vision()

    class Vision:
        patch_size, pooling_kernel_size = 16, 3

    config.check_model(Vision())
    Vision.pooling_kernel_size = 2
    with pytest.raises(FeatureError):
        config.check_model(Vision())
    with pytest.raises(ImageError):
        config.process(make_image(10, 10, "RGBA"))
