"""One chat.completions call as a step: the request its engine gets, the checks on the engine's
answer, the step recorded, and the chat.completion sent back.

Pure functions of the call's values (the front's `_turn` runs them in order); each refusal is a
`Failure` carrying the OpenAI error the client gets.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from rollwire.engines.types import GenerateRequest, GenerateResult, SamplingParams
from rollwire.errors import CompletionError
from rollwire.front.protocol import Answer, Failure, Sampling, chat_completion, image_ref_json, logprobs_content
from rollwire.front.sessions import Session
from rollwire.render.completion import validate_completion
from rollwire.render.types import RenderedTokens, Renderer
from rollwire.rollout.types import Step

__all__ = ["check_result", "completion_json", "engine_request", "step_of"]


def engine_request(renderer: Renderer, session: Session, prompt: RenderedTokens, sampling: Sampling,
                   max_model_len: int | None) -> GenerateRequest:
    """The token-in request of the session's next step; 400 when the prompt leaves no room to sample
    (or less than `max_tokens`), as vLLM words it. Without `max_tokens` the room left is the limit."""
    max_tokens = sampling.max_tokens
    if max_model_len is not None:
        room = max_model_len - len(prompt.token_ids)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise Failure(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                          f"you requested {len(prompt.token_ids)} input tokens and {max_tokens or 1} output "
                          "tokens. Please reduce the length of the input or of max_tokens.", "BadRequestError",
                          "max_tokens")
        max_tokens = room if max_tokens is None else max_tokens
    return GenerateRequest(
        prompt_token_ids=prompt.token_ids, images=prompt.images,
        request_id=f"{session.trajectory_id}-{len(session.steps)}",
        sampling=SamplingParams(max_tokens=max_tokens or 1 << 20, temperature=sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                                stop_token_ids=renderer.stop_token_ids,
                                banned_token_ids=renderer.vision_token_ids, logprobs=True))


def check_result(renderer: Renderer, result: GenerateResult) -> None:
    """502 unless the engine sampled a completion the session can continue from (never recorded otherwise)."""
    if not result.completions or result.completions[0].finish_reason in ("abort", "error"):
        why = result.completions[0].finish_reason if result.completions else "no completion"
        raise Failure(502, f"the upstream engine returned {why}", "UpstreamError")
    completion = result.completions[0]
    try:
        validate_completion(completion.token_ids, completion.logprobs, vocab_size=renderer.vocab_size,
                            stop_token_ids=renderer.stop_token_ids,
                            forbidden_token_ids=(*renderer.vision_token_ids, *renderer.structure_token_ids))
    except CompletionError as exc:
        raise Failure(502, f"the upstream completion cannot be continued from: {exc}", "UpstreamError") from None


def step_of(prompt: RenderedTokens, answer: Answer, bridged: bool, reason: str | None, generate_s: float) -> Step:
    """The trajectory step of one call: the prompt as sent, the completion as the client got it."""
    return Step(prompt_ids=prompt.token_ids, images=prompt.images, completion_ids=tuple(answer.token_ids),
                completion_logprobs=None if answer.logprobs is None else tuple(answer.logprobs),
                finish_reason=answer.finish_reason, stop_reason=answer.stop_reason, status=answer.status,
                parse_error=answer.parse_error, message=answer.record, bridged=bridged, render_reason=reason,
                timings={"generate_s": generate_s})


def completion_json(renderer: Renderer, session: Session, step_index: int, step: Step, answer: Answer,
                    sampling: Sampling, model: str) -> dict[str, Any]:
    """The chat.completion answered, with the step's token ids, logprobs and image refs under `rollwire`."""
    record = answer.record
    finish = "length" if answer.finish_reason == "length" else "tool_calls" if record.tool_calls else "stop"
    extra = {"session_id": session.key, "trajectory_id": session.trajectory_id, "step": step_index,
             "bridged": step.bridged, "render_reason": step.render_reason,
             "images": [image_ref_json(r) for r in step.images], "completion_logprobs": answer.logprobs,
             "status": answer.status, "parse_error": answer.parse_error, "stop_reason": answer.stop_reason}
    return chat_completion(
        completion_id=f"chatcmpl-{secrets.token_hex(12)}", created=int(time.time()), model=model, record=record,
        finish_reason=finish, prompt_ids=step.prompt_ids, completion_ids=answer.token_ids,
        logprobs=logprobs_content(renderer, answer.token_ids, answer.logprobs) if sampling.logprobs else None,
        extra=extra)
