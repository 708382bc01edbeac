"""Model output is not trusted: a completion with an out-of-vocabulary, vision, structure or
early stop token, or a bad logprob, ends its rollout with a typed `bad_completion` error before
it is recorded, so it is never re-sent to the server nor trained on; earlier turns are kept."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.errors import CompletionError
from rollwire.render import create_renderer
from rollwire.render.completion import validate_completion
from rollwire.rollout import RolloutConfig, run_rollout
from rollwire.rollout.envs.shapes import ShapesEnv
from rollwire.training import SampleBuilder


class RawEngine:
    """Answers each turn with the next scripted (ids, logprobs), as a broken server might."""

    def __init__(self, script: Sequence[tuple[list[Any], list[Any] | None]]) -> None:
        self.script = list(script)
        self.prompts: list[list[int]] = []

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.prompts.append(list(request.prompt_token_ids))
        ids, logprobs = self.script.pop(0)
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=logprobs, finish_reason="stop")],
                              timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


def bad_cases(r: Any) -> list[tuple[str, list[Any], list[Any] | None, str]]:
    text = r.tokenizer.encode_ids("A circle")
    end = r.im_end_id
    return [
        ("vision start", [*text, r.tokenizer.token_id("<|vision_start|>"), end], None, "vision or template"),
        ("video pad", [r.tokenizer.token_id("<|video_pad|>"), end], None, "vision or template"),
        ("image pad", [r.image_pad_id, end], None, "vision or template"),
        ("im_start", [*text, r.tokenizer.token_id("<|im_start|>"), end], None, "vision or template"),
        ("out of vocabulary", [*text, r.vocab_size, end], None, "outside the vocabulary"),
        ("padding row", [151700, end], None, "outside the vocabulary"),
        ("negative", [-1, end], None, "outside the vocabulary"),
        ("huge", [2**40, end], None, "outside the vocabulary"),
        ("bool", [True, end], None, "not an int"),
        ("float id", [3.0, end], None, "not an int"),
        ("early stop", [*text, end, *text, end], None, "goes on"),
        ("positive logprob", [*text, end], [-1.0] * len(text) + [0.5], "finite value <= 0"),
        ("nan logprob", [*text, end], [math.nan] + [-1.0] * len(text), "finite value <= 0"),
        ("inf logprob", [*text, end], [-math.inf] + [-1.0] * len(text), "finite value <= 0"),
        ("string logprob", [*text, end], ["-1"] + [-1.0] * len(text), "finite value <= 0"),
        ("too few logprobs", [*text, end], [-1.0], "logprobs for"),
    ]


def test_validate_completion_names_the_problem(renderer: Any) -> None:
    forbidden = (*renderer.vision_token_ids, *renderer.structure_token_ids)
    for name, ids, logprobs, match in bad_cases(renderer):
        with pytest.raises(CompletionError, match=match):
            validate_completion(ids, logprobs, vocab_size=renderer.vocab_size,
                                stop_token_ids=renderer.stop_token_ids, forbidden_token_ids=forbidden)
        assert name
    good = [*renderer.tokenizer.encode_ids("fine"), renderer.im_end_id]
    validate_completion(good, [-0.5] * len(good), vocab_size=renderer.vocab_size,
                        stop_token_ids=renderer.stop_token_ids, forbidden_token_ids=forbidden)
    validate_completion(good[:-1], None, vocab_size=renderer.vocab_size,  # cut by length: no stop
                        stop_token_ids=renderer.stop_token_ids, forbidden_token_ids=forbidden)


@pytest.mark.parametrize("case", range(16))
async def test_a_bad_completion_ends_the_rollout_and_is_never_used(renderer: Any, case: int) -> None:
    name, ids, logprobs, _match = bad_cases(renderer)[case]
    first = [*renderer.tokenizer.encode_ids("2"), renderer.im_end_id]
    engine = RawEngine([(first, [-1.0] * len(first)), (ids, logprobs)])
    result = await run_rollout(ShapesEnv(turns=3), renderer, engine, RolloutConfig(max_turns=3), seed=1,
                               trajectory_id=f"bad-{case}")
    t = result.trajectory
    assert t.error is not None and t.error.kind == "bad_completion", (name, t.error)
    assert t.finish == "error" and t.error.step == 1
    assert [list(s.completion_ids) for s in t.steps] == [first]  # the good turn is kept, the bad one is not recorded
    assert len(engine.prompts) == 2  # nothing was sent after the bad completion
    assert SampleBuilder.for_renderer(renderer).build(t) == []  # a failed rollout makes no sample


@pytest.mark.parametrize("bad", [[True], [1.5], ["7"], [-1], [10**9], [None], "123", 42, [151669], {1, 2}, [[1]]])
def test_public_entries_refuse_bad_token_ids(renderer: Any, bad: Any) -> None:
    """`parse_response` and `bridge` take token ids from callers: anything but in-vocabulary ints
    is a typed error, never a crash or a silent conversion."""
    from rollwire.errors import RenderError

    with pytest.raises(RenderError):
        renderer.parse_response(bad)
    prompt = renderer.render([{"role": "user", "content": "hi"}])
    with pytest.raises(RenderError):
        renderer.bridge(prompt, bad, [{"role": "user", "content": "again"}])
    import numpy as np

    ok = renderer.parse_response(np.array([*renderer.tokenizer.encode_ids("fine"), renderer.im_end_id]))
    assert ok.status == "stop" and ok.message.content == "fine"
