"""The OpenAI chat.completions request and answer, as the front reads and writes them.

A request is declared once (`ChatRequest`, msgspec validates types); options rollwire cannot
honour are refused with a `FrontRequestError` naming the field unless they have their no-op
value, so a harness is never silently sampled differently from what it asked. Fields the
OpenAI SDK or a harness adds that do not change sampling (`store`, `parallel_tool_calls`,
`stream_options`, vLLM's `return_token_ids`, ...) are accepted and ignored.

The session id comes from, in order: the `X-Session-ID` header, the body's `session_id`,
`metadata.session_id`, `user`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from rollwire.engines.httpd import error_body
from rollwire.engines.types import Completion
from rollwire.errors import FrontRequestError
from rollwire.render.types import ImageRef, Renderer, ResponseStatus
from rollwire.rollout.types import AssistantRecord, ToolCallRecord

__all__ = ["Answer", "ChatRequest", "Failure", "Sampling", "chat_completion", "decode_request", "read_completion",
           "session_id_of"]

SESSION_HEADER = "x-session-id"
SESSION_ID = re.compile(r"[A-Za-z0-9._:@+/=-]{1,128}")

# Options accepted only at their no-op value: (field, neutral value, why).
_NEUTRAL: tuple[tuple[str, Any, str], ...] = (
    ("presence_penalty", 0.0, "penalties are not supported by rollwire's engines"),
    ("frequency_penalty", 0.0, "penalties are not supported by rollwire's engines"),
    ("logit_bias", None, "logit_bias is not supported (the family's vision ids are banned already)"),
    ("stream", False, "stream=true is not supported: the front answers whole chat.completion objects"),
    ("top_logprobs", None, "top_logprobs is not supported: engines return the sampled token's logprob only"),
    ("prompt_logprobs", None, "prompt_logprobs is not supported"),
    # vLLM's extra sampling parameters (harnesses send them in extra_body)
    ("min_p", 0.0, "min_p is not supported by rollwire's engines"),
    ("min_tokens", 0, "min_tokens is not supported by rollwire's engines"),
    ("repetition_penalty", 1.0, "repetition_penalty is not supported by rollwire's engines"),
    ("ignore_eos", False, "ignore_eos is not supported: the family's stop tokens end a turn"),
    ("best_of", 1, "best_of is not supported"),
    ("use_beam_search", False, "beam search is not supported"),
)


class Failure(Exception):
    """A call the front answers with an OpenAI error body and `status` (raised anywhere in a call)."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, status, kind, param)


class ChatRequest(msgspec.Struct):
    """The body of `POST /v1/chat/completions` (only the fields the front reads or refuses)."""

    messages: list[Any]
    model: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    response_format: Any = None
    min_p: float | None = 0.0
    min_tokens: int | None = 0
    repetition_penalty: float | None = 1.0
    ignore_eos: bool | None = False
    best_of: int | None = 1
    use_beam_search: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None
    session_id: str | None = None
    metadata: dict[str, Any] | None = None


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """What the request asks of the engine, checked."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool


def decode_request(raw: bytes) -> ChatRequest:
    """The request body, or a `FrontRequestError` saying what is wrong with it."""
    try:
        body = msgspec.json.decode(raw, type=ChatRequest)
    except msgspec.ValidationError as exc:
        raise FrontRequestError(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FrontRequestError(f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise FrontRequestError("request body is nested too deeply") from None
    for name, neutral, why in _NEUTRAL:
        value = getattr(body, name)
        if value is not None and value != neutral and not (neutral is None and value in (0, {})):
            raise FrontRequestError(f"{name}={value!r:.60}: {why}", param=name)
    if body.n is not None and body.n != 1:
        raise FrontRequestError(f"n={body.n}: the front samples one completion per call (a session is one "
                                "trajectory); send n parallel requests with distinct session ids", param="n")
    if body.tool_choice not in (None, "auto", "none"):
        raise FrontRequestError(f"tool_choice={body.tool_choice!r:.80} is not supported (only 'auto' and 'none': "
                                "rollwire does not constrain decoding)", param="tool_choice")
    for key, value in (body.chat_template_kwargs or {}).items():
        if not (key == "enable_thinking" and value is True):
            raise FrontRequestError(f"chat_template_kwargs.{key}={value!r:.40} is not supported: the front renders "
                                    "with the family's renderer as configured at start", param="chat_template_kwargs")
    fmt = body.response_format
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise FrontRequestError("response_format other than {'type': 'text'} is not supported (no guided decoding)",
                                param="response_format")
    return body


def sampling_of(body: ChatRequest) -> Sampling:
    """The request's sampling settings, range-checked; OpenAI's defaults where absent."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None or body.top_k == -1 else body.top_k
    if not 0.0 <= temperature <= 2.0:
        raise FrontRequestError(f"temperature={temperature} is out of range [0, 2]", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise FrontRequestError(f"top_p={top_p} is out of range (0, 1]", param="top_p")
    if top_k < 0:
        raise FrontRequestError(f"top_k={top_k} must be >= 0 (or -1 for no limit)", param="top_k")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise FrontRequestError(f"max_tokens={max_tokens} must be at least 1", param="max_tokens")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise FrontRequestError(f"seed={body.seed} must be a non-negative 64-bit integer", param="seed")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise FrontRequestError("stop takes up to 4 non-empty strings", param="stop")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=body.seed,
                    stop=stop, logprobs=bool(body.logprobs))


def session_id_of(body: ChatRequest, headers: Mapping[str, str]) -> str | None:
    """The session id (header `X-Session-ID`, then `session_id`, `metadata.session_id`, `user`), or None."""
    found: tuple[str, Any] | None = None
    for where, value in ((SESSION_HEADER, headers.get(SESSION_HEADER)), ("session_id", body.session_id),
                         ("metadata.session_id", (body.metadata or {}).get("session_id")), ("user", body.user)):
        if value is not None:
            found = (where, value)
            break
    if found is None:
        return None
    where, value = found
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise FrontRequestError(f"session id {str(value)[:80]!r} (from {where}) must be 1-128 characters of "
                                "letters, digits and ._:@+/=-", param=where)
    return value


def cut_at_stop(renderer: Renderer, ids: Sequence[int], stops: Sequence[str]) -> tuple[int, str, str] | None:
    """Where a stop string first appears in the decoded completion: (tokens to keep, the text
    before the stop string, the stop string); None when none appears.

    The engines stop on token ids only, so stop strings are applied afterwards, as vLLM does:
    the completion keeps the token that completed the stop string and the text ends before it.
    """
    if not stops or not any(s in renderer.decode(ids) for s in stops):
        return None
    for k in range(1, len(ids) + 1):
        text = renderer.decode(ids[:k])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, stop = min(hits)
            return k, text[:at], stop
    return None  # pragma: no cover (the whole text holds a stop string)


@dataclass(frozen=True)
class Answer:
    """A completion read back for the client: the ids and logprobs kept (a stop string cuts them),
    the assistant message as sent (tool calls with fresh ids), and how it ended."""

    token_ids: list[int]
    logprobs: list[float] | None
    record: AssistantRecord
    finish_reason: str
    stop_reason: int | str | None
    status: ResponseStatus
    parse_error: str | None


def read_completion(renderer: Renderer, completion: Completion, stops: Sequence[str]) -> Answer:
    """Parse `completion` with the family (tool calls, reasoning), or cut it at the first stop string."""
    ids, logprobs = list(completion.token_ids), completion.logprobs
    cut = cut_at_stop(renderer, ids, stops)
    if cut is not None:
        keep, text, stop = cut
        return Answer(ids[:keep], None if logprobs is None else logprobs[:keep], AssistantRecord(content=text),
                      "stop", stop, "stop", None)
    parsed = renderer.parse_response(ids)
    m = parsed.message
    calls = tuple(ToolCallRecord(name=c.name, arguments=c.arguments_json(), id=f"call_{secrets.token_hex(12)}")
                  for c in m.tool_calls)
    content = m.content if isinstance(m.content, str) or m.content is None else m.text
    record = AssistantRecord(content=content, reasoning_content=m.reasoning_content, tool_calls=calls)
    return Answer(ids, logprobs, record, completion.finish_reason, completion.stop_reason, parsed.status, parsed.error)


def logprobs_content(renderer: Renderer, ids: Sequence[int], logprobs: Sequence[float] | None) -> list[Any]:
    """OpenAI's `logprobs.content`: one entry per completion token (token text, logprob, UTF-8 bytes)."""
    out = []
    for k, token in enumerate(ids):
        text = renderer.decode([token])
        lp = logprobs[k] if logprobs is not None and k < len(logprobs) else None
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []})
    return out


def image_ref_json(ref: ImageRef) -> dict[str, Any]:
    return {"id": ref.id, "offset": ref.offset, "length": ref.length, "grid_thw": list(ref.grid_thw)}


def assistant_json(record: AssistantRecord) -> dict[str, Any]:
    """The assistant message of a chat.completion choice."""
    message: dict[str, Any] = {"role": "assistant", "content": record.content}
    if record.reasoning_content is not None:
        message["reasoning_content"] = record.reasoning_content
    if record.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in record.tool_calls]
    return message


def chat_completion(
    *, completion_id: str, created: int, model: str, record: AssistantRecord, finish_reason: str,
    prompt_ids: Sequence[int], completion_ids: Sequence[int], logprobs: list[Any] | None, extra: dict[str, Any],
) -> dict[str, Any]:
    """An OpenAI chat.completion with vLLM's token-id fields (`prompt_token_ids`, a choice's
    `token_ids`) and rollwire's own under `rollwire`."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": assistant_json(record), "finish_reason": finish_reason,
                     "logprobs": None if logprobs is None else {"content": logprobs},
                     "token_ids": list(completion_ids)}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids),
                  "total_tokens": len(prompt_ids) + len(completion_ids)},
        "prompt_token_ids": list(prompt_ids),
        "rollwire": extra,
    }
