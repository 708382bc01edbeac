"""One tokenizer call per run of template text, however many images the run holds (the images'
pad runs are expanded around the one call); the ids are the parity suite's to check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image
from rollwire.render import create_renderer
from rollwire.render.tokens import TextTokenizer


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    encode = TextTokenizer.encode

    def counting(self: TextTokenizer, text: str) -> Any:
        seen.append(text)
        return encode(self, text)

    monkeypatch.setattr(TextTokenizer, "encode", counting)
    return seen


def two_images(seed: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "image": make_image(56, 56, "RGB", seed)},
                                        {"type": "text", "text": "and"},
                                        {"type": "image", "image": make_image(84, 56, "RGB", seed + 1)},
                                        {"type": "text", "text": "which is bigger?"}]}


def test_render_and_bridge_tokenize_each_run_once(tiny: Callable[[str], Path], calls: list[str]) -> None:
    renderer = create_renderer(tiny("qwen2_vl"))
    pad = renderer.image_pad_id
    prompt = renderer.render([two_images(0)])
    assert len(calls) == 1 and calls[0].count("<|image_pad|>") == 2
    runs = [(r.offset, r.length) for r in prompt.images]
    assert all(list(prompt.token_ids[o:o + n]) == [pad] * n for o, n in runs)
    assert prompt.token_ids.count(pad) == sum(n for _, n in runs)
    assert runs[1][1] == 6 and runs[0][1] == 4  # 56x84 -> 2x3 tokens, 56x56 -> 2x2
    calls.clear()
    completion = [*renderer.tokenizer.encode_ids("The second."), renderer.im_end_id]
    calls.clear()
    bridged = renderer.bridge(prompt, completion, [two_images(5)]).tokens
    assert bridged is not None
    assert len(calls) == 1  # the new message: one call (the completion's ids are not re-tokenized)
    assert bridged.token_ids[: len(prompt.token_ids)] == prompt.token_ids
    assert [r.offset for r in bridged.images[:2]] == [r.offset for r in prompt.images]
    new = bridged.images[2:]
    assert all(bridged.token_ids[r.offset:r.end] == (pad,) * r.length for r in new)
    assert bridged.message_index[new[0].offset] == 2 and bridged.message_index[new[1].end - 1] == 2


def test_full_render_equals_the_bridge(tiny: Callable[[str], Path]) -> None:
    renderer = create_renderer(tiny("qwen2_vl"))
    first = two_images(0)
    prompt = renderer.render([first])
    completion = [*renderer.tokenizer.encode_ids("The second."), renderer.im_end_id]
    bridged = renderer.bridge(prompt, completion, [two_images(5)]).tokens
    full = renderer.render([first, {"role": "assistant", "content": "The second."}, two_images(5)])
    assert bridged is not None
    assert bridged.token_ids == full.token_ids and bridged.images == full.images
