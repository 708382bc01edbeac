"""Features against the real HF Qwen-VL PIL image processor, and the feature store."""

from __future__ import annotations

import io
import json
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN as HF_CLIP_MEAN
from transformers.image_utils import OPENAI_CLIP_STD as HF_CLIP_STD
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from rollwire.errors import (
    FeatureError,
    ImageDecodeError,
    ImageError,
    ImageSizeUnsupportedError,
    UnknownImageError,
    UnsupportedImageModeError,
)
from rollwire.features import (
    FeatureStore,
    ImageFeatures,
    VisionConfig,
    compute_features,
    process_image,
    smart_resize,
)
from rollwire.images import load_image, to_rgb

SIZES = [(1, 1), (27, 29), (28, 28), (56, 56), (100, 80), (2000, 50), (50, 2000), (1024, 1024),
         (1, 300), (300, 1)]  # (width, height)
# What the real processor rejects among SIZES (aspect ratio > 200); everything else it takes,
# tiny images included (they are upscaled to min_pixels).
HF_REJECTED_SIZES = {(1, 300), (300, 1)}
MODES = ["RGBA", "P", "P+trns", "L", "LA", "I;16", "CMYK", "1", "I", "F", "PA", "RGB+trns"]


def hf_processor(config: VisionConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
        merge_size=config.merge_size, image_mean=list(config.image_mean), image_std=list(config.image_std),
        rescale_factor=config.rescale_factor, resample=config.resample,
    )


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """Random (not flat) content in the given PIL mode."""
    rng = np.random.default_rng(seed)
    size = (width, height)

    def raw(channels: int) -> bytes:
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8).tobytes()

    if mode in ("RGBA", "CMYK", "LA", "L"):
        return Image.frombytes(mode, size, raw(len(mode) if mode != "CMYK" else 4))
    if mode in ("P", "P+trns", "PA"):
        image = Image.frombytes("PA" if mode == "PA" else "P", size, raw(2 if mode == "PA" else 1))
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P+trns":
            image.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
        return image
    if mode == "RGB+trns":
        pixels = rng.choice(np.array([0, 255], dtype=np.uint8), size=(height, width, 3))
        image = Image.frombytes("RGB", size, pixels.tobytes())
        image.info["transparency"] = (255, 0, 255)
        return image
    if mode == "I;16":  # half the values above 255
        return Image.fromarray(rng.integers(0, 512, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 400, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-50, 300, (height, width)).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8).astype(bool))
    raise AssertionError(mode)


def run_hf(processor: Qwen2VLImageProcessorPil, image: Image.Image, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(image, **kwargs)


def assert_parity(image: Image.Image, config: VisionConfig, store: FeatureStore | None = None) -> None:
    processor = hf_processor(config)
    try:
        raw = run_hf(processor, image, do_rescale=False, do_normalize=False)
        default = run_hf(processor, image)
    except Exception as exc:  # the processor rejects it: rollwire must too, with a typed error
        with pytest.raises(ImageError):
            (store or FeatureStore(config)).get_or_process(image)
        assert not isinstance(exc, ImageError)
        return
    features = (store or FeatureStore(config)).get_or_process(image)
    assert features.grid_thw == tuple(int(x) for x in raw["image_grid_thw"][0])
    assert features.pixel_values.dtype == np.uint8
    assert features.pixel_values.shape == raw["pixel_values"].shape
    assert np.array_equal(features.pixel_values.astype(np.float32), raw["pixel_values"])
    normalized = features.normalized(config)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, default["pixel_values"], rtol=0, atol=1e-5)
    assert features.num_tokens == int(np.prod(raw["image_grid_thw"][0])) // config.merge_size**2


# --- parity with the HF processor -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_qwen2_vl(size: tuple[int, int], mode: str) -> None:
    assert_parity(make_image(mode, *size, seed=zlib.crc32(f"{size}{mode}".encode())), VisionConfig.qwen2_vl())


@pytest.mark.parametrize("mode", ["RGBA", "P+trns", "I;16"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_qwen3_vl(size: tuple[int, int], mode: str) -> None:
    # transformers maps qwen3_vl to the Qwen2-VL image processor; the settings differ.
    assert IMAGE_PROCESSOR_MAPPING_NAMES["qwen3_vl"]["pil"] == "Qwen2VLImageProcessorPil"
    assert_parity(make_image(mode, *size, seed=7), VisionConfig.qwen3_vl())


def test_parity_custom_settings() -> None:
    config = VisionConfig(min_pixels=28 * 28 * 10, max_pixels=28 * 28 * 40, image_mean=(0.1, 0.2, 0.3),
                          image_std=(0.9, 0.8, 0.7))
    for size in [(640, 480), (33, 1500), (5, 5)]:
        assert_parity(make_image("RGBA", *size, seed=3), config)


def test_which_sizes_the_processor_rejects() -> None:
    processor = hf_processor(VisionConfig.qwen2_vl())
    store = FeatureStore(VisionConfig.qwen2_vl())
    for width, height in SIZES:
        image = make_image("L", width, height)
        try:
            run_hf(processor, image)
            rejected = False
        except ValueError:
            rejected = True
        assert rejected == ((width, height) in HF_REJECTED_SIZES), (width, height)
        if rejected:
            with pytest.raises(ImageSizeUnsupportedError):
                store.get_or_process(image)
        else:
            store.get_or_process(image)


def test_mode_the_processor_cannot_convert_is_a_typed_error() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 1200, np.uint8).tobytes()
    image = Image.frombytes("La", (30, 20), noise)
    with pytest.raises(ValueError):
        run_hf(hf_processor(VisionConfig()), image)
    with pytest.raises(UnsupportedImageModeError):
        FeatureStore().get_or_process(image)


def test_sixteen_bit_is_clipped_not_scaled_like_the_processor() -> None:
    values = np.array([[0, 100, 255, 256, 300, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, :, 0].tolist() == [0, 100, 255, 255, 255, 255]  # clip at 255; no >>8 rescale
    assert_parity(Image.fromarray(np.tile(values, (40, 10))), VisionConfig())


def test_sixteen_bit_png_file_matches_processor(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 600, (90, 70), dtype=np.uint16)).save(path)
    opened = Image.open(path)
    opened.load()
    assert opened.mode == "I;16"
    loaded = load_image(path)
    assert loaded.mode == "I;16"
    assert_parity(loaded, VisionConfig())
    assert FeatureStore().get_or_process(path) == FeatureStore().get_or_process(opened)


def test_palette_png_with_transparency_round_trip(tmp_path: Path) -> None:
    image = make_image("P+trns", 120, 90, seed=11)
    path = tmp_path / "pal.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "P" and loaded.info.get("transparency") is not None
    assert_parity(loaded, VisionConfig())
    # the transparency must matter: ignoring it would give other pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about dropping byte transparency, which is the point
        assert to_rgb(loaded).tobytes() != loaded.convert("RGB").tobytes()


# --- smart_resize and config ----------------------------------------------------------------


def test_smart_resize_matches_hf() -> None:
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (400, 2))]
    sizes += [(1, 1), (1, 200), (200, 1), (1, 201), (3, 601), (28, 28), (14, 14), (10000, 60)]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 65536, 16777216), (28, 3136, 12845056)]:
        for h, w in sizes:
            try:
                want: tuple[int, int] | None = hf_smart_resize(h, w, factor, lo, hi)
            except ValueError:
                want = None
            if want is None:
                with pytest.raises(ImageSizeUnsupportedError):
                    smart_resize(h, w, factor, lo, hi)
            else:
                assert smart_resize(h, w, factor, lo, hi) == tuple(want), (h, w, factor)


def test_qwen2_vl_defaults_match_the_processor() -> None:
    processor = Qwen2VLImageProcessorPil()
    config = VisionConfig.qwen2_vl()
    assert config == VisionConfig()
    assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (
        processor.patch_size, processor.temporal_patch_size, processor.merge_size)
    assert config.min_pixels == processor.size["shortest_edge"]
    assert config.max_pixels == processor.size["longest_edge"]
    assert config.image_mean == tuple(HF_CLIP_MEAN) and config.image_std == tuple(HF_CLIP_STD)
    assert config.rescale_factor == processor.rescale_factor and config.resample == int(processor.resample)
    assert config.factor == 28 and config.row_size == 1176


def test_qwen3_vl_config() -> None:
    config = VisionConfig.qwen3_vl()
    assert config.patch_size == 16 and config.factor == 32 and config.row_size == 1536
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.5, 0.5, 0.5)
    assert VisionConfig.qwen3_vl(max_pixels=10**6).max_pixels == 10**6


def test_from_pretrained_reads_what_hf_saves(tmp_path: Path) -> None:
    for kwargs in [
        {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 512},
        {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    ]:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        processor = Qwen2VLImageProcessorPil(**kwargs)  # type: ignore[arg-type]
        processor.save_pretrained(directory)
        config = VisionConfig.from_pretrained(directory)
        assert config == VisionConfig.from_pretrained(str(directory))
        assert (config.min_pixels, config.max_pixels) == (processor.size["shortest_edge"],
                                                          processor.size["longest_edge"])
        assert config.patch_size == processor.patch_size
        assert config.image_mean == tuple(processor.image_mean)
        assert_parity(make_image("RGBA", 300, 200), config)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"min_pixels": 3136, "max_pixels": 12845056}, (3136, 12845056)),  # Qwen2/2.5-VL hub files
        ({"size": {"shortest_edge": 5000, "longest_edge": 9000000}}, (5000, 9000000)),
        ({"size": {"shortest_edge": 5000, "longest_edge": 9000000}, "min_pixels": 4000}, (4000, 9000000)),
        ({}, (3136, 1003520)),
        ({"size": {"min_pixels": 1000, "max_pixels": 200000}}, None),  # HF keeps it, then fails on use
        ({"size": {"shortest_edge": 5000}}, None),
    ],
)
def test_from_pretrained_size_keys_like_hf(tmp_path: Path, cfg: dict[str, Any], expected: Any) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor", **cfg}))
    processor = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    if expected is None:
        with pytest.raises(ValueError):
            run_hf(processor, make_image("L", 50, 50))
        with pytest.raises(FeatureError):
            VisionConfig.from_pretrained(tmp_path)
        return
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == expected
    config = VisionConfig.from_pretrained(tmp_path)
    assert (config.min_pixels, config.max_pixels) == expected


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FeatureError):
        VisionConfig.from_pretrained(tmp_path)  # no file
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(FeatureError):
        VisionConfig.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_convert_rgb": False}))
    with pytest.raises(FeatureError):
        VisionConfig.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 0}))
    with pytest.raises(FeatureError):
        VisionConfig.from_pretrained(tmp_path)


def test_fingerprint_covers_every_field() -> None:
    base = VisionConfig()
    assert base.fingerprint() == VisionConfig().fingerprint() == VisionConfig.qwen2_vl().fingerprint()
    variants = [
        VisionConfig(patch_size=16), VisionConfig(temporal_patch_size=1), VisionConfig(merge_size=1),
        VisionConfig(min_pixels=100), VisionConfig(max_pixels=10**6),
        VisionConfig(image_mean=(0.5, 0.5, 0.5)), VisionConfig(image_std=(0.5, 0.5, 0.5)),
        VisionConfig(rescale_factor=1 / 256), VisionConfig(resample=int(Image.Resampling.BILINEAR)),
        VisionConfig.qwen3_vl(),
    ]
    prints = {v.fingerprint() for v in variants} | {base.fingerprint()}
    assert len(prints) == len(variants) + 1
    assert all(len(p) < 40 for p in prints)


def test_invalid_config() -> None:
    for bad in [{"patch_size": 0}, {"min_pixels": 10, "max_pixels": 5}, {"image_std": (1.0, 0.0, 1.0)},
                {"image_mean": (0.5, 0.5)}, {"rescale_factor": 0.0}]:
        with pytest.raises(FeatureError):
            VisionConfig(**bad)  # type: ignore[arg-type]


# --- ImageFeatures -----------------------------------------------------------------------


def test_features_known_grids_and_read_only() -> None:
    config = VisionConfig()
    f56 = compute_features(to_rgb(make_image("L", 56, 56)), config)
    assert f56.grid_thw == (1, 4, 4) and f56.num_tokens == 4
    f100 = compute_features(to_rgb(make_image("L", 100, 80)), config)  # width 100, height 80
    assert f100.grid_thw == (1, 6, 8) and f100.num_tokens == 12
    assert f100.nbytes == 48 * 1176
    assert not f100.pixel_values.flags.writeable
    with pytest.raises(ValueError):
        f100.pixel_values[0, 0] = 1
    rows, _ = process_image(to_rgb(make_image("L", 56, 56)), config)
    assert not rows.flags.writeable


def test_features_do_not_alias_a_writable_input() -> None:
    rows = np.zeros((16, 1176), dtype=np.uint8)
    features = ImageFeatures("a" * 32, rows, (1, 4, 4), 2)
    assert rows.flags.writeable  # the caller's array is left alone
    assert not features.pixel_values.flags.writeable


def test_features_validation() -> None:
    with pytest.raises(FeatureError):
        ImageFeatures("x", np.zeros((16, 1176), dtype=np.float32), (1, 4, 4), 2)
    with pytest.raises(FeatureError):
        ImageFeatures("x", np.zeros((15, 1176), dtype=np.uint8), (1, 4, 4), 2)
    with pytest.raises(FeatureError):
        ImageFeatures("x", np.zeros((15, 1176), dtype=np.uint8), (1, 3, 5), 2)


def test_normalized_dtypes_and_config_mismatch() -> None:
    config = VisionConfig()
    image = make_image("RGBA", 200, 150, seed=9)
    features = FeatureStore(config).get_or_process(image)
    default = run_hf(hf_processor(config), image)["pixel_values"]
    assert np.array_equal(features.normalized(config), default)  # exactly, not just close
    assert features.normalized(config, np.float64).dtype == np.float64
    np.testing.assert_allclose(features.normalized(config, np.float16), default, atol=1e-2)
    with pytest.raises(FeatureError):
        features.normalized(config, np.int32)
    with pytest.raises(FeatureError):
        features.normalized(VisionConfig.qwen3_vl())
    # other mean/std change the values
    assert not np.allclose(features.normalized(VisionConfig(image_mean=(0.5, 0.5, 0.5))), default)


def test_normalized_torch_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    config = VisionConfig()
    image = make_image("CMYK", 120, 64, seed=4)
    features = FeatureStore(config).get_or_process(image)
    default = run_hf(hf_processor(config), image)["pixel_values"]
    tensor = features.normalized_torch(config, torch.bfloat16)
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor, torch.from_numpy(default).to(torch.bfloat16))
    assert torch.equal(features.normalized_torch(config), torch.from_numpy(default))


# --- FeatureStore ---------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_store_hits_and_misses() -> None:
    store = FeatureStore(VisionConfig())
    image = make_image("RGBA", 64, 48, seed=1).convert("RGB")
    first = store.get_or_process(image)
    assert store.stats().misses == 1 and store.stats().hits == 0
    again = store.get_or_process(png_bytes(image))  # same pixels, other container: same id, a hit
    assert again is first
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.items, stats.bytes) == (1, 1, 1, first.nbytes)
    assert first.id in store and len(store) == 1
    assert store.get(first.id) is first
    other = store.get_or_process(make_image("L", 64, 48, seed=2))
    assert other.id != first.id and store.stats().misses == 2 and len(store) == 2
    with pytest.raises(UnknownImageError) as info:
        store.get("0" * 32)
    assert isinstance(info.value, KeyError)
    assert "0" * 32 not in store


def test_store_id_depends_on_config() -> None:
    image = make_image("L", 64, 48)
    a = FeatureStore(VisionConfig()).get_or_process(image)
    b = FeatureStore(VisionConfig(max_pixels=28 * 28 * 100)).get_or_process(image)
    assert a.id != b.id


def test_store_evicts_least_recently_used_by_bytes() -> None:
    one = 16 * 1176  # a 56x56 image: grid 4x4
    store = FeatureStore(VisionConfig(), max_bytes=2 * one + 10)
    a, b, c = (store.get_or_process(make_image("L", 56, 56, seed=s)) for s in (1, 2, 3))
    assert a.nbytes == one
    stats = store.stats()
    assert (stats.items, stats.evictions, stats.bytes) == (2, 1, 2 * one)
    assert a.id not in store and b.id in store and c.id in store
    store.get(b.id)  # b becomes most recent, so c goes next
    d = store.get_or_process(make_image("L", 56, 56, seed=4))
    assert c.id not in store and b.id in store and d.id in store
    assert store.stats().evictions == 2 and store.stats().bytes <= store.max_bytes


def test_store_oversized_item_is_returned_not_stored() -> None:
    store = FeatureStore(VisionConfig(), max_bytes=1000)
    image = make_image("L", 56, 56)
    features = store.get_or_process(image)
    assert features.nbytes > 1000 and features.grid_thw == (1, 4, 4)
    stats = store.stats()
    assert (stats.items, stats.bytes, stats.oversized, stats.misses) == (0, 0, 1, 1)
    assert features.id not in store


def test_store_put() -> None:
    config = VisionConfig()
    store = FeatureStore(config)
    features = compute_features(to_rgb(make_image("L", 80, 80)), config)
    store.put(features)
    assert store.get(features.id) is features
    assert store.get_or_process(make_image("L", 80, 80)) is features  # same id: a hit
    assert store.stats().hits == 1
    with pytest.raises(FeatureError):
        store.put(compute_features(to_rgb(make_image("L", 80, 80)), VisionConfig.qwen3_vl()))


def test_store_is_thread_safe_one_miss_per_image() -> None:
    store = FeatureStore(VisionConfig())
    images = [png_bytes(make_image("RGBA", 300 + 10 * k, 200, seed=k)) for k in range(4)]
    n_threads, rounds = 16, 3
    barrier = threading.Barrier(n_threads)
    results: dict[int, list[ImageFeatures]] = {k: [] for k in range(len(images))}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                k = (t + r) % len(images)
                f = store.get_or_process(images[k])
                with lock:
                    results[k].append(f)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for k, found in results.items():
        assert found and all(f is found[0] for f in found)
        assert found[0] == compute_features(to_rgb(load_image(images[k])), VisionConfig())
    stats = store.stats()
    assert stats.misses == len(images)
    assert stats.hits == n_threads * rounds - len(images)
    assert len({f.id for fs in results.values() for f in fs}) == len(images)


def test_store_failures_are_typed_and_do_not_wedge() -> None:
    store = FeatureStore(VisionConfig())
    with pytest.raises(ImageDecodeError):
        store.get_or_process(b"definitely not an image")
    wide = make_image("L", 1000, 3)
    for _ in range(2):  # a failed miss leaves nothing pending behind
        with pytest.raises(ImageSizeUnsupportedError):
            store.get_or_process(wide)
    assert len(store) == 0 and store.stats().misses == 2


def test_clear_drops_every_image_and_keeps_counters() -> None:
    from rollwire.features import FeatureStore, VisionConfig

    store = FeatureStore(VisionConfig.qwen2_vl())
    f = store.get_or_process(Image.new("RGB", (56, 56), (1, 2, 3)))
    store.clear()
    assert f.id not in store and len(store) == 0 and store.stats().bytes == 0 and store.stats().misses == 1
