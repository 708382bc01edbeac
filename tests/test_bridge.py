"""The multi-turn bridge: extension equals the full render where both are possible, and never
changes a sampled token (hypothesis-generated conversations, real tokenizer and processor)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_image
from rollwire.errors import RenderError
from rollwire.render import RenderedTokens, create_renderer, validate_placeholders
from rollwire.render.chatml import ChatMLRenderer
from rollwire.render.qwen3_vl import Qwen3VLRenderer

POOL = [make_image(56, 56, "RGB", 1), make_image(28, 28, "RGB", 2), make_image(100, 80, "RGB", 3),
        make_image(56, 84, "RGBA", 4)]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

# Text that starts with a letter (a generation prompt ends in "\n"; text opening with whitespace
# would merge with it on a full render, which no tokenizer-level bridge can reproduce).
words = st.text(alphabet="abcdefgh XYZ.,:!?\n\t0123456789éü🙂", min_size=0, max_size=24)
texts = st.builds(lambda first, rest: first + rest, st.sampled_from("AbcQz"), words)
image_parts = st.lists(st.integers(0, len(POOL) - 1), max_size=2)


@st.composite
def turn_messages(draw: st.DrawFn, *, with_images: bool) -> list[dict[str, Any]]:
    """The non-assistant messages of one turn: a user message, or tool results (after a tool call)."""
    kind = draw(st.sampled_from(["user", "user", "tool"]))
    if kind == "user":
        parts: list[dict[str, Any]] = [{"type": "text", "text": draw(texts)}]
        if with_images:
            for k in draw(image_parts):
                parts.insert(draw(st.integers(0, len(parts))), {"type": "image", "image": POOL[k]})
        return [{"role": "user", "content": parts}]
    n = draw(st.integers(1, 2))
    out = []
    for _ in range(n):
        parts = [{"type": "text", "text": draw(texts)}]
        if with_images and draw(st.booleans()):
            parts.append({"type": "image", "image": POOL[draw(st.integers(0, len(POOL) - 1))]})
        out.append({"role": "tool", "content": parts})
    return out


CALL = '<tool_call>\n{"name": "crop", "arguments": {"box": [1, 2]}}\n</tool_call>'


@st.composite
def conversations(
    draw: st.DrawFn, *, with_images: bool = True, reasoning: bool = False, thoughts: str = "maybe"
) -> list[dict[str, Any]]:
    """user, (assistant, turn)*: every tool turn follows an assistant that called a tool.

    `reasoning`: Qwen3-style messages (structured tool calls, and `reasoning_content` on
    "never", "maybe" or "always" of the assistant turns, as `thoughts` says).
    """
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": draw(texts)}]}]
    if with_images and draw(st.booleans()):
        msgs[0]["content"].append({"type": "image", "image": POOL[0]})
    for _ in range(draw(st.integers(1, 4))):
        nxt = draw(turn_messages(with_images=with_images))
        content = draw(texts)
        assistant: dict[str, Any] = {"role": "assistant", "content": content}
        if nxt[0]["role"] == "tool":
            if reasoning:
                assistant["tool_calls"] = [{"function": {"name": "crop", "arguments": {"box": [1, 2]}}}]
            else:
                assistant["content"] = content + "\n" + CALL
        if reasoning and (thoughts == "always" or (thoughts == "maybe" and draw(st.booleans()))):
            assistant["reasoning_content"] = draw(texts)
        msgs.append(assistant)
        msgs.extend(nxt)
    return msgs


def assistant_positions(msgs: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m["role"] == "assistant"]


def canonical_completion(renderer: Any, msgs: list[dict[str, Any]], a: int) -> list[int]:
    """The assistant turn `a` as a full render writes it after its prompt, up to its close token."""
    prompt = renderer.render(msgs[:a])
    full = renderer.render(msgs[: a + 1], add_generation_prompt=False).token_ids
    assert full[: len(prompt.token_ids)] == prompt.token_ids, "the prompt must be a prefix of the next render"
    assert full[-2] == renderer.im_end_id
    return full[len(prompt.token_ids) : -1]


def walk(renderer: Any, msgs: list[dict[str, Any]]) -> list[tuple[RenderedTokens, RenderedTokens, int]]:
    """Bridge turn by turn; returns (bridged prompt, full-render prompt, completion length) per turn."""
    positions = assistant_positions(msgs)
    prompt = renderer.render(msgs[: positions[0]])
    out = []
    for k, a in enumerate(positions):
        completion = canonical_completion(renderer, msgs, a)
        end = positions[k + 1] if k + 1 < len(positions) else len(msgs)
        result = renderer.bridge(prompt, completion, msgs[a + 1 : end])
        assert result.tokens is not None, result.reason
        out.append((result.tokens, renderer.render(msgs[:end]), len(completion)))
        prompt = result.tokens
    return out


@pytest.fixture(scope="module")
def renderers(tiny: Callable[[str], Path]) -> dict[str, Any]:
    q3vl = create_renderer(tiny("qwen3_vl"))
    assert isinstance(q3vl, Qwen3VLRenderer)
    return {
        "qwen2_vl": create_renderer(tiny("qwen2_vl")),
        "qwen2_5_vl": create_renderer(tiny("qwen2_5_vl"), add_vision_id=True),
        "qwen3_vl": q3vl,
        "qwen3_vl_thinking": Qwen3VLRenderer(q3vl.tokenizer, feature_store=q3vl.feature_store, thinking=True),
        "qwen3": create_renderer(tiny("qwen3")),
        "qwen3_no_thinking": create_renderer(tiny("qwen3"), enable_thinking=False),
        "qwen3_5": create_renderer(tiny("qwen3_5")),
        "qwen3_5_no_thinking": create_renderer(tiny("qwen3_5"), enable_thinking=False, add_vision_id=True),
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@SETTINGS
@given(data=st.data())
def test_bridge_equals_full_render(family: str, renderers: dict[str, Any], data: st.DataObject) -> None:
    renderer = renderers[family]
    msgs = data.draw(conversations())
    for bridged, full, _ in walk(renderer, msgs):
        assert bridged.token_ids == full.token_ids
        assert bridged.images == full.images
        assert bridged.message_index == full.message_index
        assert bridged.num_messages == full.num_messages


@pytest.mark.parametrize("family", ["qwen3", "qwen3_no_thinking", "qwen3_vl_thinking", "qwen3_5",
                                    "qwen3_5_no_thinking"])
@SETTINGS
@given(data=st.data())
def test_bridge_keeps_sampled_reasoning_that_a_full_render_drops(
    family: str, renderers: dict[str, Any], data: st.DataObject
) -> None:
    """Qwen3 templates drop the reasoning of assistant turns before the last user query on a full
    render. The bridge keeps each turn as it was sampled: per message, the bridged tokens equal the
    full render's except for earlier assistant turns, which equal their rendering as the last turn."""
    renderer = renderers[family]
    # With thinking off the prompt holds an empty think block: no turn has reasoning. A Thinking
    # model's prompt opens "<think>\n": a sampled turn always has reasoning after it.
    thoughts = {"qwen3": "maybe", "qwen3_no_thinking": "never", "qwen3_vl_thinking": "always",
                "qwen3_5": "always", "qwen3_5_no_thinking": "never"}[family]
    with_images = family.endswith("_vl_thinking") or family.startswith("qwen3_5")
    msgs = data.draw(conversations(with_images=with_images, reasoning=True, thoughts=thoughts))
    positions = assistant_positions(msgs)
    saw_difference = False
    for bridged, full, _ in walk(renderer, msgs):
        for i in range(-1, full.num_messages + 1):
            ours = [t for t, m in zip(bridged.token_ids, bridged.message_index, strict=True) if m == i]
            theirs = [t for t, m in zip(full.token_ids, full.message_index, strict=True) if m == i]
            if i not in positions or i >= full.num_messages:  # (the last index is the generation prompt)
                assert ours == theirs, f"message {i} differs"
                continue
            as_last = renderer.render(msgs[: i + 1], add_generation_prompt=False)
            sampled = [t for t, m in zip(as_last.token_ids, as_last.message_index, strict=True) if m == i]
            assert ours == sampled
            saw_difference |= ours != theirs
        # The same images in the same order; offsets move by the kept reasoning.
        assert [(r.id, r.length, r.grid_thw) for r in bridged.images] == [
            (r.id, r.length, r.grid_thw) for r in full.images]
        if renderer.image_pad_id is not None:
            validate_placeholders(bridged.token_ids, bridged.images, pad_id=renderer.image_pad_id, merge_size=2)
    if any(msgs[a].get("reasoning_content") and any(m["role"] == "user" for m in msgs[a + 1 :])
           for a in positions):
        assert saw_difference, "dropped reasoning must show as a difference"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3", "qwen3_5"])
@SETTINGS
@given(data=st.data())
def test_arbitrary_completions_are_kept_byte_for_byte(
    family: str, renderers: dict[str, Any], data: st.DataObject
) -> None:
    renderer: ChatMLRenderer = renderers[family]
    with_images = family != "qwen3"
    msgs = data.draw(conversations(with_images=with_images))
    prompt = renderer.render(msgs[:1])
    completion = data.draw(st.lists(st.integers(0, 151642), max_size=30))  # ordinary tokens
    stop = data.draw(st.sampled_from([None, *renderer.stop_token_ids]))
    if stop is not None:
        completion.append(stop)
    new = data.draw(turn_messages(with_images=with_images))
    result = renderer.bridge(prompt, completion, new)
    assert result.tokens is not None, result.reason
    out = result.tokens
    n, c = len(prompt.token_ids), len(completion)
    assert list(out.token_ids[: n + c]) == [*prompt.token_ids, *completion]
    assert out.sampled_mask == [False] * n + [True] * c + [False] * (len(out.token_ids) - n - c)
    closes = completion[-1:] == [renderer.im_end_id]
    if not closes:  # cut by length, or another stop token: the turn close is added as context
        assert out.token_ids[n + c] == renderer.im_end_id
    assert out.images[: len(prompt.images)] == prompt.images
    assert all(ref.offset >= n + c for ref in out.images[len(prompt.images) :])
    if renderer.image_pad_id is not None:
        validate_placeholders(out.token_ids, out.images, pad_id=renderer.image_pad_id, merge_size=2,
                              known_ids=renderer.feature_store)  # type: ignore[arg-type]


def test_bridge_declines_with_a_reason(renderers: dict[str, Any], tiny: Callable[[str], Path]) -> None:
    r = renderers["qwen2_vl"]
    msgs = [{"role": "user", "content": "hi"}]
    prompt = r.render(msgs)
    done = [*r.tokenizer.encode_ids("Hello."), r.im_end_id]
    assert r.bridge(prompt, done, [{"role": "assistant", "content": "x"}]).reason == (
        "assistant message in the new messages")
    assert r.bridge(r.render(msgs, add_generation_prompt=False), done, msgs).reason == (
        "previous prompt does not end with a generation prompt")
    assert r.bridge(prompt, [r.image_pad_id], msgs).reason == "completion contains a vision token"
    assert r.bridge(prompt, done, []).reason == "no new messages"
    generic = create_renderer(tiny("qwen3"), family="generic")
    g = generic.bridge(generic.render(msgs), done, msgs)
    assert g.tokens is None and g.reason is not None and "generic" in g.reason


def test_from_labels_makes_runs_and_rejects_labels_that_do_not_cover_the_ids() -> None:
    tokens = RenderedTokens.from_labels([5, 6, 7, 8], [0, 0, 1, 1], [False, False, True, True], (), 2)
    assert tokens.runs == ((2, 0, False), (4, 1, True))
    assert list(tokens.message_index) == [0, 0, 1, 1] and list(tokens.sampled_mask) == [False, False, True, True]
    with pytest.raises(RenderError, match="3 token ids, 2 message indices and 3 sampled flags"):
        RenderedTokens.from_labels([5, 6, 7], [0, 0], [False, False, True], (), 1)
