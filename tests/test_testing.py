"""`ScriptedEngine`: scripted completions drive an environment's tool path through the real loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.errors import EngineError
from rollwire.messages import ToolCall
from rollwire.render import create_renderer, validate_placeholders
from rollwire.render.completion import validate_completion
from rollwire.rollout import RolloutConfig, run_rollout
from rollwire.rollout.envs.zoom import ZoomEnv
from rollwire.testing import ScriptedEngine

CROP = '<tool_call>\n{"name": "crop", "arguments": {"box": [0, 0, 84, 56]}}\n</tool_call>'


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


async def test_a_scripted_crop_reaches_the_tool_and_its_image_is_in_the_next_prompt(renderer: Any) -> None:
    number = (await ZoomEnv().reset(5)).info["number"]
    engine = ScriptedEngine(renderer, [CROP, f"ANSWER: {number}"])
    result = await run_rollout(ZoomEnv(), renderer, engine, RolloutConfig(max_turns=4), seed=5, trajectory_id="z")
    t = result.trajectory
    assert t.error is None and t.finish == "done" and t.rewards == [0.0, 1.0]
    first, second = t.steps
    assert first.message.tool_calls[0].name == "crop" and first.status == "stop"
    assert first.completion_ids[-1] == renderer.im_end_id and first.finish_reason == "stop"
    assert len(first.images) == 1 and len(second.images) == 2 and second.bridged
    crop = second.images[1]
    assert crop.offset > len(first.prompt_ids) + len(first.completion_ids)  # it came after the tool call
    assert crop.id != first.images[0].id and crop.id in renderer.feature_store
    validate_placeholders(second.prompt_ids, second.images, pad_id=renderer.image_pad_id, merge_size=2,
                          known_ids=renderer.feature_store)
    tool_message = next(m for m in t.messages if m["role"] == "tool")
    assert tool_message["content"][0]["text"] == "crop of [0, 0, 84, 56]:"
    assert tool_message["content"][1] == {"type": "image", "image_id": crop.id}
    assert [r.request_id for r in engine.requests] == ["z-0", "z-1"]
    assert engine.requests[1].prompt_token_ids == second.prompt_ids


async def test_completions_look_like_a_model_s(renderer: Any) -> None:
    engine = ScriptedEngine(renderer, ["The answer is 7.<|im_end|> and more", "a long answer that goes on"])
    prompt = renderer.render([{"role": "user", "content": "hi"}])

    def request(max_tokens: int) -> GenerateRequest:
        return GenerateRequest(prompt_token_ids=prompt.token_ids, request_id="r-0",
                               sampling=SamplingParams(max_tokens=max_tokens))

    done = (await engine.generate(request(64))).completions[0]
    # cut at the stop token the model would have stopped on
    assert done.token_ids == [*renderer.tokenizer.encode_ids("The answer is 7."), renderer.im_end_id]
    assert done.finish_reason == "stop" and done.stop_reason == renderer.im_end_id
    validate_completion(done.token_ids, done.logprobs, vocab_size=renderer.vocab_size,
                        stop_token_ids=renderer.stop_token_ids, forbidden_token_ids=renderer.vision_token_ids)
    assert done.logprobs is not None and len(set(done.logprobs)) > 1 and all(-3.1 < lp < 0 for lp in done.logprobs)
    cut = (await engine.generate(request(3))).completions[0]
    assert len(cut.token_ids) == 3 and cut.finish_reason == "length" and renderer.im_end_id not in cut.token_ids
    with pytest.raises(EngineError, match="the script has 2 turns; turn 2"):
        await engine.generate(request(3))


async def test_a_scripted_assistant_message_is_written_as_the_family_writes_tool_calls(
        tiny: Callable[[str], Path]) -> None:
    renderer = create_renderer(tiny("qwen3_vl"))
    seen: list[int] = []

    def policy(request: GenerateRequest, turn: int) -> Any:
        seen.append(turn)
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "crop", "arguments": {"box": [1, 2, 30, 40]}}}]}

    engine = ScriptedEngine(renderer, policy)
    prompt = renderer.render([{"role": "user", "content": "zoom"}])
    out = await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, request_id="q-0",
                                                sampling=SamplingParams(max_tokens=200)))
    ids = out.completions[0].token_ids
    parsed = renderer.parse_response(ids)
    assert parsed.status == "stop" and seen == [0]
    call = parsed.message.tool_calls[0]
    assert parsed.message.tool_calls == (ToolCall("crop", '{"box": [1, 2, 30, 40]}', id=call.id),)
