"""The tiny random-weight model builder: real directories that load and run with transformers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import rollwire.tiny_model as tm
import rollwire.tiny_sources as tiny_sources
from rollwire.errors import ModelBuildError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MODEL_CLASS = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
CONFIG_CLASS = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig"}
PROCESSOR_CLASS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}
# A 100x80 (w x h) image, min_pixels 56*56: patch 14 (factor 28) -> 84x112 -> [1, 6, 8];
# patch 16 (factor 32) -> 64x96 -> [1, 4, 6].
GRID_100x80 = {"qwen2_vl": [1, 6, 8], "qwen2_5_vl": [1, 6, 8], "qwen3_vl": [1, 4, 6]}
ROW_WIDTH = {"qwen2_vl": 3 * 2 * 14 * 14, "qwen2_5_vl": 3 * 2 * 14 * 14, "qwen3_vl": 3 * 2 * 16 * 16}

QWEN2_VL_RENDER = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _image() -> Image.Image:
    img = Image.new("RGB", (100, 80), (200, 30, 30))
    img.paste((20, 40, 220), (50, 0, 100, 80))
    return img


def _messages(image: Any = None) -> list[dict[str, Any]]:
    part: dict[str, Any] = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]


def _inputs(family: str, model_dir: Path, *, extra_pads: int = 0) -> dict[str, Any]:
    """What the family's processor produces for one image conversation, built from its parts.

    (transformers 5.2x cannot construct the Qwen-VL processors without torchvision; see
    test_auto_processor_matches for the processor itself.)
    """
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ip = transformers.AutoImageProcessor.from_pretrained(model_dir)
    vision = ip(images=[_image()], return_tensors="pt")
    n_pads = int(vision["image_grid_thw"][0].prod()) // ip.merge_size**2 + extra_pads
    if family == "qwen3_vl":  # no official template offline: the Qwen3-VL layout by hand
        text = (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    else:
        text = tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_pads)
    ids = tok(text, return_tensors="pt")["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == tiny_sources.IMAGE_PAD_ID).long(),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def _load_vl(model_dir: Path) -> Any:
    return transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


# --- the VL families ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", VL)
def test_vl_config(family: str, tiny: Callable[[str], Path]) -> None:
    d = tiny(family)
    cfg = transformers.AutoConfig.from_pretrained(d)
    assert type(cfg).__name__ == CONFIG_CLASS[family]
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)
    assert cfg.tie_word_embeddings is True
    text = cfg.text_config
    assert text.vocab_size == 151669
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 2)
    assert text.num_key_value_heads == 1
    assert (text.eos_token_id, text.pad_token_id) == (151645, 151643)
    rope = text.rope_parameters
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(rope["mrope_section"]) * 2 == head_dim
    if family == "qwen3_vl":
        assert rope["mrope_section"] == [6, 5, 5] and rope["mrope_interleaved"] is True
        assert cfg.vision_config.patch_size == 16
    else:
        assert rope["mrope_section"] == [4, 6, 6]
        assert cfg.vision_config.patch_size == 14
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    size = sum(p.stat().st_size for p in d.iterdir())
    assert 25e6 < size < 45e6, size


@pytest.mark.parametrize("family", VL)
def test_vl_forward(family: str, tiny: Callable[[str], Path]) -> None:
    d = tiny(family)
    model = _load_vl(d)
    assert type(model).__name__ == MODEL_CLASS[family]
    n_params = sum(p.numel() for p in model.parameters())
    assert 9e6 < n_params < 11e6, n_params
    inputs = _inputs(family, d)
    assert inputs["image_grid_thw"][0].tolist() == GRID_100x80[family]
    assert inputs["pixel_values"].shape[-1] == ROW_WIDTH[family]
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 151669)
    assert torch.isfinite(out.logits).all()

    # Multimodal RoPE needs the token types: without them transformers 5.2x refuses the image
    # (Qwen2-VL, Qwen3-VL) or silently falls back to 1-D positions (Qwen2.5-VL: other logits).
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    try:
        with torch.no_grad():
            fallback = model(**without).logits
    except ValueError as exc:
        assert "mm_token_type_ids" in str(exc)
    else:
        assert not torch.allclose(fallback, out.logits)

    # One pad token too many: the vision tower's output does not fit.
    wrong = _inputs(family, d, extra_pads=1)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
        model(**wrong)


@pytest.mark.skipif(
    not HAS_TORCHVISION, reason="the HF Qwen-VL processors need torchvision (video processor)"
)
@pytest.mark.parametrize("family", VL)
def test_auto_processor_matches(family: str, tiny: Callable[[str], Path]) -> None:
    d = tiny(family)
    proc = transformers.AutoProcessor.from_pretrained(d)
    assert type(proc).__name__ == PROCESSOR_CLASS[family]
    assert proc.image_processor.patch_size == (16 if family == "qwen3_vl" else 14)
    expected = _inputs(family, d)
    if family == "qwen3_vl":
        assert not proc.chat_template
        text = proc.tokenizer.decode(expected["input_ids"][0])
        text = text.replace("<|image_pad|>" * int(expected["mm_token_type_ids"].sum()), "<|image_pad|>")
        enc = proc(text=[text], images=[_image()], return_tensors="pt")
    else:
        enc = proc.apply_chat_template(
            _messages(_image()),
            tokenize=True,
            return_dict=True,
            add_generation_prompt=True,
            return_tensors="pt",
        )
    assert enc["input_ids"].tolist() == expected["input_ids"].tolist()
    assert enc["mm_token_type_ids"].tolist() == expected["mm_token_type_ids"].tolist()
    assert enc["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    model = _load_vl(d)
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], 151669)


def test_qwen2_vl_official_chat_template(tiny: Callable[[str], Path]) -> None:
    d = tiny("qwen2_vl")
    template = json.loads((d / "chat_template.json").read_text())["chat_template"]
    # The tokenizer carries the same template (as in the official repositories), not Qwen3's text one.
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == template
    rendered = tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    assert rendered == QWEN2_VL_RENDER
    with_system = [{"role": "system", "content": "Be brief."}, *_messages()]
    rendered = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert "You are a helpful assistant." not in rendered
    assert (tiny("qwen2_5_vl") / "chat_template.json").read_text() == (d / "chat_template.json").read_text()


def test_qwen3_vl_has_no_template_unless_given(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    d = tiny("qwen3_vl")
    assert not (d / "chat_template.json").exists()
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    mine = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
    out = tm.build_tiny_model("qwen3_vl", tmp_path / "q3vl", chat_template=mine)
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": mine}
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == mine


def test_preprocessor_config(tiny: Callable[[str], Path]) -> None:
    for family, patch in (("qwen2_vl", 14), ("qwen3_vl", 16)):
        pp = json.loads((tiny(family) / "preprocessor_config.json").read_text())
        assert pp["image_processor_type"].startswith("Qwen2VLImageProcessor")
        assert (pp["patch_size"], pp["merge_size"], pp["temporal_patch_size"]) == (patch, 2, 2)
        assert pp["size"] == {"shortest_edge": 56 * 56, "longest_edge": 1024 * 1024}
    assert json.loads((tiny("qwen3_vl") / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3


# --- qwen3 (text) -------------------------------------------------------------------------------


def test_qwen3_text(tiny: Callable[[str], Path]) -> None:
    d = tiny("qwen3")
    assert not (d / "preprocessor_config.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings is True and model.config.vocab_size == 151669
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert "enable_thinking" in tok.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok(off, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151669)


# --- determinism and the cache ------------------------------------------------------------------


def test_same_seed_same_weights(tiny: Callable[[str], Path], cache_dir: Path, tmp_path: Path) -> None:
    a = tm.build_tiny_model("qwen2_vl", tmp_path / "a", cache_dir=cache_dir)
    b = tm.build_tiny_model("qwen2_vl", tmp_path / "b", cache_dir=cache_dir)
    c = tm.build_tiny_model("qwen2_vl", tmp_path / "c", seed=1, cache_dir=cache_dir)
    wa, wb, wc = ((x / "model.safetensors").read_bytes() for x in (a, b, c))
    assert wa == wb
    assert wa != wc
    # ensure_tiny_model builds with seed 0: the same bytes as any seed-0 build.
    assert (tiny("qwen2_vl") / "model.safetensors").read_bytes() == wa
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "chat_template.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_build_keeps_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tm.build_tiny_model("qwen3", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_ensure_reuses_existing(tiny: Callable[[str], Path], cache_dir: Path) -> None:
    d = tiny("qwen3")
    assert d == cache_dir / "tiny-models" / "qwen3-v1"
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    again = tm.ensure_tiny_model("qwen3", cache_dir=cache_dir)
    assert again == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before


def test_ensure_race_and_stale_dir(tmp_path: Path) -> None:
    # A leftover directory that is not a complete model is replaced.
    stale = tmp_path / "tiny-models" / "qwen3-v1"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(tm.ensure_tiny_model("qwen3", cache_dir=tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [stale, stale]
    assert not (stale / "junk").exists()
    assert (stale / "model.safetensors").is_file() and (stale / tm.MARKER_NAME).is_file()
    # No temporary build directory is left behind.
    assert sorted(p.name for p in (tmp_path / "tiny-models").iterdir()) == ["qwen3-v1"]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROLLWIRE_CACHE", str(tmp_path / "c"))
    assert tm.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ROLLWIRE_CACHE")
    assert tm.default_cache_dir() == Path.home() / ".cache" / "rollwire"


# --- failures -----------------------------------------------------------------------------------


def test_template_download_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(tiny_sources.subprocess, "run", failing_run)
    with pytest.raises(ModelBuildError, match=r"dora-qwen2-5-vl.*no network"):
        tm.build_tiny_model("qwen2_vl", tmp_path / "m", cache_dir=tmp_path / "cache")
    with pytest.raises(ModelBuildError, match="dora-qwen2-5-vl"):
        tm.ensure_tiny_model("qwen2_5_vl", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-models" / "qwen2_5_vl-v1").exists()
    assert list((tmp_path / "cache" / "tiny-models").iterdir()) == []


def test_cached_template_is_used_offline(
    tiny: Callable[[str], Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny("qwen2_vl")  # fetched the template into cache_dir

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached template should have been used")

    monkeypatch.setattr(tiny_sources.subprocess, "run", no_network)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tm.official_qwen2_vl_chat_template(cache_dir)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="unknown tiny-model family 'llama'"):
        tm.build_tiny_model("llama", tmp_path)
    with pytest.raises(ModelBuildError, match="unknown tiny-model family"):
        tm.ensure_tiny_model("qwen9", cache_dir=tmp_path)


def test_without_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ModelBuildError, match=r"rollwire\[local\]"):
        tm.build_tiny_model("qwen3", tmp_path / "m")


def test_module_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import rollwire.tiny_model as tm\n"
        "assert 'qwen2_vl' in tm.FAMILIES\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
