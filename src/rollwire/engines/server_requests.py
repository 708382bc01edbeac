"""`rollwire serve`'s request decoding and its answers: vLLM's wire, checked as strictly as vLLM or more.

A request body becomes the client's own structs (`vllm_wire`), and `sampling_params` becomes
`SamplingParams`; whatever the local engine cannot honour (stop strings, penalties, top
logprobs, a non-ban `logit_bias`) is a 400 naming the field, never silently ignored. Failures are
vLLM's JSON error bodies (`HTTPFailure`), including its opaque 500 whose reason goes to the log
only. The lines vLLM answers with (the context-length messages) are vLLM's, word for word.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from rollwire.engines.httpd import error_body
from rollwire.engines.types import Completion, SamplingParams
from rollwire.engines.vllm_wire import Choice, LogprobEntry, Logprobs, Sampling
from rollwire.engines.wire import BAN_BIAS

__all__ = ["INTERNAL_ERROR_BODY", "MAX_N", "HTTPFailure", "RenderBody", "bad_request", "check_model", "choice",
           "decode_body", "internal_error", "sampling_params"]

logger = logging.getLogger("rollwire.server")

MAX_N = 256  # completions per request; a larger n would be held in memory at once
# What vLLM answers for an exception inside the engine (e.g. a cached image it does not hold).
INTERNAL_ERROR_BODY = error_body("Internal server error", 500, "InternalServerError")


class HTTPFailure(Exception):
    """Ends a request with `status` and a JSON `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def bad_request(message: str) -> HTTPFailure:
    return HTTPFailure(400, error_body(message))


def internal_error(log_reason: str) -> HTTPFailure:
    """vLLM's opaque 500: the reason goes to the log only, as vLLM does."""
    logger.warning("answering 500: %s", log_reason)
    return HTTPFailure(500, INTERNAL_ERROR_BODY)


def decode_body(raw: bytes, kind: type[Any]) -> Any:
    """`raw` JSON as a `kind` struct; a 400 saying what is wrong otherwise."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not JSON: {exc}") from None
    except RecursionError:  # msgspec's depth check on an `Any` field (content_parts, messages)
        raise bad_request("request body is nested too deeply") from None


def check_model(model: str | None, served_model_name: str) -> None:
    """vLLM's 404 for a `model` the server does not serve (None: any)."""
    if model is not None and model != served_model_name:
        raise HTTPFailure(404, error_body(f"The model `{model}` does not exist.", 404, "NotFoundError", "model"))


class RenderBody(msgspec.Struct):
    """`POST /v1/chat/completions/render`: the messages to render, as the chat endpoint takes them."""

    messages: list[Any]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


_UNSUPPORTED_DEFAULTS = {
    "min_tokens": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repetition_penalty": 1.0, "ignore_eos": False, "prompt_logprobs": None,
}


def sampling_params(sp: Sampling, *, prompt_len: int, max_model_len: int) -> SamplingParams:
    """`SamplingParams` from vLLM `sampling_params`; raises `HTTPFailure` 400."""
    for name, neutral in _UNSUPPORTED_DEFAULTS.items():
        if getattr(sp, name) != neutral:
            raise bad_request(f"sampling_params.{name}={getattr(sp, name)!r} is not supported by rollwire serve")
    if sp.stop:
        raise bad_request("sampling_params.stop (stop strings) is not supported: this server does not "
                          "detokenize; use stop_token_ids")
    if sp.logprobs is not None and sp.logprobs != 0:
        raise bad_request(f"sampling_params.logprobs={sp.logprobs} is not supported: only 0 (the sampled "
                          "token's logprob) is")
    if not 1 <= sp.n <= MAX_N:
        raise bad_request(f"sampling_params.n={sp.n} is out of range: rollwire serve samples 1 to {MAX_N} "
                          "completions per request")
    if any(t < 0 for t in sp.stop_token_ids or ()):
        raise bad_request(f"sampling_params.stop_token_ids {sp.stop_token_ids!r:.100} holds a negative id")
    banned: list[int] = []
    for key, bias in (sp.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):  # int() would take " 1_0 " as 10
            raise bad_request(f"logit_bias key {key!r:.40} is not a token id")
        token = int(key)
        if bias <= BAN_BIAS:
            banned.append(token)
        elif bias != 0:
            raise bad_request(f"logit_bias {bias} for token {token}: only bans are supported "
                              f"(a bias <= {BAN_BIAS:g})")
    if prompt_len >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your "
                          f"request has {prompt_len} input tokens. Please reduce the length of the input.")
    max_tokens = sp.max_tokens if sp.max_tokens is not None else max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you "
                          f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                          f"{max_tokens} in the completion). Please reduce the length of the prompt or "
                          "max_tokens.")
    if sp.top_k < -1:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or positive, got {sp.top_k}")
    return SamplingParams(
        max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0),
        seed=sp.seed, stop_token_ids=tuple(sp.stop_token_ids or ()), banned_token_ids=tuple(banned),
        logprobs=sp.logprobs is not None, n=sp.n)


def choice(index: int, completion: Completion) -> Choice:
    """One completion as a response choice (`weight_versions` is added by the pausing glue)."""
    logprobs = None
    if completion.logprobs is not None:
        # rank is not known to the local engine (it keeps only the sampled token's logprob).
        logprobs = Logprobs(content=[LogprobEntry(token_id=t, logprob=lp)
                                     for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)])
    return Choice(index=index, finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                  token_ids=completion.token_ids, logprobs=logprobs)
