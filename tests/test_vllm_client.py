"""The vLLM client's response reading, defaults and pre-send checks (no server needed here;
tests/test_server.py and tests/integration/ talk to real servers)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import make_image
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import RetryPolicy, VLLMEngine, parse_choices, parse_logprobs
from rollwire.errors import EngineClosedError, PlaceholderError, PromptTooLongError, WireError
from rollwire.render import ImageRef, create_renderer


def test_both_logprob_shapes_are_read() -> None:
    new = [{"token_id": 5, "logprob": -1.5, "rank": 1}, {"token_id": 7, "logprob": -0.25}]
    old = [{"token": "token_id:5", "logprob": -1.5}, {"token": "token_id:7", "logprob": -9999.0}]
    assert parse_logprobs(new, [5, 7]) == [-1.5, -0.25]
    assert parse_logprobs(old, [5, 7]) == [-1.5, -math.inf]


@pytest.mark.parametrize(
    ("entries", "ids", "needle"),
    [
        ([{"token_id": 5, "logprob": -1.0}], [5, 6], "1 logprob entries for 2"),
        ([{"token_id": 9, "logprob": -1.0}], [5], "is for token 9"),
        ([{"token": "5", "logprob": -1.0}], [5], "names no token id"),
        ([{"token_id": 5}], [5], "malformed"),
    ],
)
def test_inconsistent_logprobs_are_errors(entries: list[dict[str, object]], ids: list[int], needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        parse_logprobs(entries, ids)


def test_choices_are_ordered_and_finish_reasons_mapped() -> None:
    payload = {"choices": [
        {"index": 1, "token_ids": [3], "finish_reason": "length", "stop_reason": None, "logprobs": None},
        {"index": 0, "token_ids": [1, 2], "finish_reason": "stop", "stop_reason": 2,
         "logprobs": {"content": [{"token_id": 1, "logprob": -1.0}, {"token_id": 2, "logprob": -2.0}]}},
    ]}
    first, second = parse_choices(payload, n=2, logprobs=False)
    assert (first.token_ids, first.finish_reason, first.stop_reason, first.logprobs) == ([1, 2], "stop", 2, [-1, -2])
    assert (second.finish_reason, second.logprobs) == ("length", None)
    assert parse_choices({"choices": [{"token_ids": [1], "finish_reason": "weird"}]}, n=1,
                         logprobs=False)[0].finish_reason == "error"
    with pytest.raises(WireError):
        parse_choices({"nope": 1}, n=1, logprobs=False)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"choices": []}, "0 choices for n=1"),
        ({"choices": [{"token_ids": [1]}]}, "no logprobs although they were requested"),
        ({"choices": [{"token_ids": [1], "logprobs": {"content": [{"token": "token_id:x", "logprob": -1.0}]}}]},
         "has token id 'x'"),
        ({"choices": [{"token_ids": [1], "logprobs": {"content": [{"token_id": "abc", "logprob": -1.0}]}}]},
         "has token id 'abc'"),
    ],
)
def test_unusable_responses_are_wire_errors(payload: dict[str, object], needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        parse_choices(payload, n=1, logprobs=True)


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=2.0, jitter=0.5)
    first = [policy.delay(0) for _ in range(50)]
    late = [policy.delay(10) for _ in range(50)]
    assert all(0.25 <= d <= 0.75 for d in first) and len(set(first)) > 40  # jittered around 0.5
    assert all(1.0 <= d <= 3.0 for d in late) and max(late) > 2.0  # capped at 2 (x jitter)


async def test_nothing_leaves_before_the_checks(tiny: Callable[[str], Path]) -> None:
    """Placeholders and length are checked before any byte is sent (a transport that fails any
    generate call proves nothing was attempted)."""
    renderer = create_renderer(tiny("qwen2_vl"))
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        return httpx.Response(500, json={"error": {"message": "should not be called"}})

    engine = VLLMEngine.for_renderer("http://test", renderer, pixel_format="uint8", verify_pixel_format=False,
                                     transport=httpx.MockTransport(handler))
    prompt = renderer.render([{"role": "user", "content": [{"type": "image", "image": make_image(56, 56)}]}])
    bad = ImageRef(prompt.images[0].id, prompt.images[0].offset, 5, prompt.images[0].grid_thw)
    with pytest.raises(PlaceholderError):
        await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=(bad,),
                                              sampling=SamplingParams(max_tokens=4)))
    with pytest.raises(PromptTooLongError):
        await engine.generate(GenerateRequest(prompt_token_ids=prompt.token_ids, images=prompt.images,
                                              sampling=SamplingParams(max_tokens=64)))
    assert calls == ["/v1/models", "/metrics"] and engine.stats.bytes_sent == 0  # setup reads only
    await engine.close()
    with pytest.raises(EngineClosedError):
        await engine.generate(GenerateRequest(prompt_token_ids=[1], sampling=SamplingParams(max_tokens=1)))
