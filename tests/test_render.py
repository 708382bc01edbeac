"""Renderer behaviour beyond template parity: parsing responses, bad input, message indices, pool,
the factory, and the generic fallback."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image
from rollwire.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageNotFoundError,
    ImageTooLargeError,
    MessageError,
    RemoteImageNotAllowedError,
    RenderError,
    UnknownRoleError,
    UnsupportedModelError,
)
from rollwire.images import ImageLimits
from rollwire.render import RendererPool, create_renderer, detect_family
from rollwire.render.generic import ChatTemplateRenderer
from rollwire.render.qwen3 import Qwen3Renderer
from rollwire.render.qwen3_vl import Qwen3VLRenderer
from rollwire.render.qwen_vl import Qwen2VLRenderer


@pytest.fixture(scope="module")
def qwen2(tiny: Callable[[str], Path]) -> Qwen2VLRenderer:
    r = create_renderer(tiny("qwen2_vl"))
    assert isinstance(r, Qwen2VLRenderer)
    return r


@pytest.fixture(scope="module")
def qwen3(tiny: Callable[[str], Path]) -> Qwen3Renderer:
    r = create_renderer(tiny("qwen3"))
    assert isinstance(r, Qwen3Renderer)
    return r


def ids(r: Any, text: str) -> list[int]:
    return list(r.tokenizer.encode_ids(text))


# --- parse_response ---------------------------------------------------------------------------


def test_parse_plain_stop_and_length(qwen2: Qwen2VLRenderer) -> None:
    done = qwen2.parse_response([*ids(qwen2, "A red circle."), qwen2.im_end_id])
    assert (done.status, done.message.content, done.error) == ("stop", "A red circle.", None)
    assert done.message.token_ids is not None and done.message.token_ids[-1] == qwen2.im_end_id
    cut = qwen2.parse_response(ids(qwen2, "A red"))
    assert (cut.status, cut.message.content) == ("length", "A red")


def test_qwen2_vl_keeps_raw_text_and_parses_calls_beside_it(qwen2: Qwen2VLRenderer) -> None:
    text = 'Zoom.\n<tool_call>\n{"name": "crop", "arguments": {"box": [1, 2, 3, 4]}}\n</tool_call>'
    parsed = qwen2.parse_response([*ids(qwen2, text), qwen2.im_end_id])
    assert parsed.status == "stop"
    assert parsed.message.content == text  # a re-render reproduces the sampled tokens
    assert [(c.name, c.arguments_dict()) for c in parsed.message.tool_calls] == [("crop", {"box": [1, 2, 3, 4]})]
    history = [{"role": "user", "content": "q"}]
    prompt = qwen2.render(history)
    full = qwen2.render([*history, parsed.message], add_generation_prompt=False)
    assert list(full.token_ids[len(prompt.token_ids) : -1]) == list(parsed.message.token_ids or ())


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("<tool_call>\n{not json}\n</tool_call>", "not JSON"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "no function name"),
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "arguments are not an object"),
        ('<tool_call>\n{"name": "f", "arguments": {}}', "unclosed"),
    ],
)
def test_broken_tool_calls_are_malformed(qwen2: Qwen2VLRenderer, text: str, needle: str) -> None:
    parsed = qwen2.parse_response([*ids(qwen2, text), qwen2.im_end_id])
    assert parsed.status == "malformed"
    assert parsed.error is not None and needle in parsed.error


def test_unclosed_call_cut_by_length_stays_length(qwen2: Qwen2VLRenderer) -> None:
    parsed = qwen2.parse_response(ids(qwen2, '<tool_call>\n{"name": "f", "argu'))
    assert parsed.status == "length" and parsed.error is not None


def test_sampled_image_pad_is_malformed(qwen2: Qwen2VLRenderer) -> None:
    pad = qwen2.image_pad_id
    assert pad is not None and pad in qwen2.vision_token_ids
    parsed = qwen2.parse_response([*ids(qwen2, "look "), pad, qwen2.im_end_id])
    assert parsed.status == "malformed" and parsed.error is not None and "vision token" in parsed.error


def test_qwen3_reasoning_and_tool_calls(qwen3: Qwen3Renderer) -> None:
    text = ('<think>\nI should crop.\n</think>\n\nSure.\n'
            '<tool_call>\n{"name": "crop", "arguments": {"x": 1}}\n</tool_call>')
    parsed = qwen3.parse_response([*ids(qwen3, text), qwen3.im_end_id])
    m = parsed.message
    assert (parsed.status, m.reasoning_content, m.content) == ("stop", "I should crop.", "Sure.")
    assert [(c.name, c.arguments_dict()) for c in m.tool_calls] == [("crop", {"x": 1})]
    # Rendered back as the last turn, the parsed message reproduces the sampled tokens.
    history = [{"role": "user", "content": "q"}]
    prompt = qwen3.render(history)
    full = qwen3.render([*history, m], add_generation_prompt=False)
    assert list(full.token_ids[len(prompt.token_ids) : -1]) == list(m.token_ids or ())


def test_stop_and_vision_ids(qwen2: Qwen2VLRenderer, qwen3: Qwen3Renderer) -> None:
    assert qwen2.stop_token_ids == (151645, 151643)
    assert set(qwen2.vision_token_ids) == {151652, 151653, 151654, 151655, 151656}
    assert qwen3.stop_token_ids == (151645, 151643)


# --- bad input --------------------------------------------------------------------------------


def png_bytes(w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    make_image(w, h).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("part", "error"),
    [
        ({"type": "image", "image": b"not an image at all"}, ImageDecodeError),
        ({"type": "image", "image": png_bytes()[:60]}, ImageDecodeError),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, RemoteImageNotAllowedError),
        ({"type": "image", "image": "/nonexistent/cat.png"}, ImageNotFoundError),
        ({"type": "image", "image": None}, MessageError),
    ],
)
def test_bad_images_raise_typed_errors(qwen2: Qwen2VLRenderer, part: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        qwen2.render([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])


def test_zero_size_and_oversized_images(tiny: Callable[[str], Path]) -> None:
    from PIL import Image

    small = create_renderer(tiny("qwen2_vl"), limits=ImageLimits(max_pixels=1000))
    with pytest.raises(ImageTooLargeError):
        small.render([{"role": "user", "content": [{"type": "image", "image": png_bytes(40, 30)}]}])
    with pytest.raises(EmptyImageError):
        small.render([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (0, 4))}]}])


def test_data_url_and_file_path_give_the_same_image(qwen2: Qwen2VLRenderer, tmp_path: Path) -> None:
    data = png_bytes()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    a = qwen2.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    b = qwen2.render([{"role": "user", "content": [{"type": "image", "image": str(path)}]}])
    c = qwen2.render([{"role": "user", "content": [{"type": "image", "image": f"file://{path}"}]}])
    assert a.images == b.images == c.images


def test_bad_messages_through_render(qwen2: Qwen2VLRenderer) -> None:
    with pytest.raises(UnknownRoleError):
        qwen2.render([{"role": "developer", "content": "x"}])
    with pytest.raises(MessageError, match="tool message does not follow"):
        qwen2.render([{"role": "tool", "content": "x"}])
    with pytest.raises(RenderError, match="empty conversation"):
        qwen2.render([])


def test_text_family_rejects_images(qwen3: Qwen3Renderer) -> None:
    with pytest.raises(RenderError, match="does not take images"):
        qwen3.render([{"role": "user", "content": [{"type": "image", "image": make_image(8, 8)}]}])


# --- structure ----------------------------------------------------------------------------------


def test_message_index_marks_each_messages_tokens(qwen2: Qwen2VLRenderer) -> None:
    msgs = [{"role": "user", "content": [{"type": "image", "image": make_image(56, 56)},
                                         {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a square"}, {"role": "user", "content": "sure?"}]
    out = qwen2.render(msgs)
    by_index: dict[int, list[int]] = {}
    for t, m in zip(out.token_ids, out.message_index, strict=True):
        by_index.setdefault(m, []).append(t)
    assert qwen2.decode(by_index[-1]) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert qwen2.decode(by_index[1]) == "<|im_start|>assistant\na square<|im_end|>\n"
    assert qwen2.decode(by_index[2]) == "<|im_start|>user\nsure?<|im_end|>\n"
    assert qwen2.decode(by_index[3]) == "<|im_start|>assistant\n"
    assert all(out.message_index[r.offset] == 0 for r in out.images)


def test_structured_tool_calls_are_written_not_dropped(qwen2: Qwen2VLRenderer) -> None:
    """The official Qwen2-VL template ignores `tool_calls`; rollwire writes them as the model does."""
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Zoom.", "tool_calls": [
                {"id": "c1", "function": {"name": "crop", "arguments": {"box": [1]}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    text = qwen2.decode(qwen2.render(msgs).token_ids)
    assert 'Zoom.\n<tool_call>\n{"name": "crop", "arguments": {"box": [1]}}\n</tool_call><|im_end|>' in text


def test_pool_renders_like_the_renderer(qwen2: Qwen2VLRenderer) -> None:
    convs = [[{"role": "user", "content": [{"type": "image", "image": make_image(56 + 28 * k, 56, seed=k)},
                                           {"type": "text", "text": f"n{k}"}]}] for k in range(6)]
    with RendererPool(qwen2, workers=3) as pool:
        got = pool.render_many(convs)
    assert [g.token_ids for g in got] == [qwen2.render(c).token_ids for c in convs]


async def test_pool_async(qwen2: Qwen2VLRenderer) -> None:
    with RendererPool(qwen2, workers=2) as pool:
        out = await pool.render([{"role": "user", "content": "hi"}])
    assert out.token_ids == qwen2.render([{"role": "user", "content": "hi"}]).token_ids


# --- factory and generic --------------------------------------------------------------------------


def test_factory_detects_families(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    assert detect_family(tiny("qwen2_5_vl")) == "qwen2_5_vl"
    assert create_renderer(tiny("qwen2_5_vl")).family == "qwen2_5_vl"
    q3vl = create_renderer(tiny("qwen3_vl"))
    assert isinstance(q3vl, Qwen3VLRenderer) and not q3vl.thinking
    assert q3vl.feature_store.config.patch_size == 16  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedModelError):
        create_renderer(tmp_path / "missing")
    with pytest.raises(UnsupportedModelError, match="unknown family"):
        create_renderer(tiny("qwen2_vl"), family="llama9")


def test_qwen3_vl_thinking_is_recognised_by_its_template(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "thinking"
    shutil.copytree(tiny("qwen3_vl"), d)
    (d / "chat_template.jinja").write_text("{{- '<|im_start|>assistant\\n<think>\\n' }}")
    r = create_renderer(d)
    assert isinstance(r, Qwen3VLRenderer) and r.thinking
    text = r.decode(r.render([{"role": "user", "content": "hi"}]).token_ids)
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def as_generic(model_dir: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "somethingelse"}))
    return out


MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]


@pytest.mark.parametrize(("family", "indices"), [("qwen2_vl", [0, 1, 2, 3]), ("qwen3", [-1])])
def test_generic_renderer_uses_the_models_own_template(
    tiny: Callable[[str], Path], tmp_path: Path, family: str, indices: list[int]
) -> None:
    """Token ids are the template's; message indices come from prefix renders, or are -1 when the
    template rewrites earlier turns (Qwen3 drops reasoning, so prefixes are not prefixes)."""
    from transformers import AutoTokenizer

    d = as_generic(tiny(family), tmp_path / "other")
    r = create_renderer(d)
    assert isinstance(r, ChatTemplateRenderer)
    out = r.render(MSGS)
    expected = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(MSGS, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=True)["input_ids"]
    assert list(out.token_ids) == list(expected)
    assert sorted(set(out.message_index)) == indices
    with pytest.raises(RenderError):
        r.render([{"role": "user", "content": [{"type": "image", "image": make_image(8, 8)}]}])
