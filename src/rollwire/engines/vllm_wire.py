"""vLLM's `POST /inference/v1/generate` body and answer, declared once as msgspec structs.

The client (engines/vllm.py) encodes `GenerateBody` and decodes `GenerateResponse`; `rollwire
serve` (engines/server.py) decodes the same `GenerateBody` and encodes the same response, so the
two sides cannot drift. Field names and defaults are vLLM's (`SamplingParams`, the token-in/
token-out protocol); bodies are written with `omit_defaults`, so a field left at vLLM's default is
not sent. `VLLM_WIRE_VERSIONS` names the vLLM versions this layout was read from.

A response is decoded straight from bytes into typed structs; a body of the wrong shape is a
`MalformedResponseError` whose message names the field and the value, never a guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from rollwire.errors import InvalidRequestError, MalformedResponseError

from .pausing import policy_version_of
from .types import Completion, FinishReason

VLLM_WIRE_VERSIONS = ("0.32.0", "0.33.0")  # vllm/entrypoints/scale_out/token_in_token_out/protocol.py
OLD_LOGPROB_CLAMP = -9999.0  # older servers clamp -inf to this

WireMode: TypeAlias = Literal["features", "content_parts", "auto"]  # how images reach the server
TokenId: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
OutputMode: TypeAlias = Literal["tokens", "text", "derender"]  # "derender": vLLM 0.33


class Range(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One placeholder run in the prompt (vLLM's `PlaceholderRangeInfo`)."""

    offset: int
    length: int


class Features(msgspec.Struct, frozen=True):
    """Processed images: per-modality hashes, placeholder runs and base64 msgpack items (a null
    item: "use your cached copy of this hash")."""

    mm_hashes: dict[str, list[str]]
    mm_placeholders: dict[str, list[Range]]
    kwargs_data: dict[str, list[str | None]] | None = None


class ContentPart(msgspec.Struct, frozen=True):
    """One raw image the server processes itself; `url` None asks for the server's copy of `uuid`.
    `type` is required and always written: vLLM silently skips a part without it."""

    type: str
    url: str | None = None
    uuid: str | None = None


class Sampling(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """vLLM's `sampling_params` (the subset rollwire sends or `rollwire serve` accepts), with
    vLLM's defaults."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    stop: list[str] | str | None = None
    min_tokens: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True


class GenerateBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """The request. `features` and `content_parts` are mutually exclusive (vLLM checks it)."""

    token_ids: Sequence[int]
    sampling_params: Sampling
    model: str | None = None
    request_id: str | None = None
    features: Features | None = None
    content_parts: list[ContentPart] | None = None
    stream: bool = False
    cache_salt: str | None = None
    priority: int = 0
    return_token_ids: bool | None = None
    output_mode: OutputMode = "tokens"


class TopLogprob(msgspec.Struct, frozen=True):
    token_id: TokenId
    logprob: float
    rank: int | None = None


class LogprobEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One completion token's logprob: `token_id` (0.32+), or the older `token: "token_id:123"`.
    `top_logprobs` lists k or (0.33) k + 1 candidates, the sampled token first."""

    logprob: float
    token_id: TokenId | None = None
    token: str | None = None
    rank: int | None = None
    top_logprobs: list[TopLogprob] = []


class Logprobs(msgspec.Struct, frozen=True):
    content: list[LogprobEntry] | None  # required; null only when the server had none to give


class WeightVersionSpan(msgspec.Struct, frozen=True):
    """Output tokens [start, end) were sampled by weights labelled `version`."""

    version: str
    start: int
    end: int


class Choice(msgspec.Struct, frozen=True):
    token_ids: list[TokenId]
    index: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: Logprobs | None = None
    weight_versions: list[WeightVersionSpan] | None = None


class GenerateResponse(msgspec.Struct, frozen=True):
    """The answer; `prompt_token_ids` and `mm_placeholders` come back with `return_token_ids`
    (the prompt after the server expanded each image's placeholder)."""

    choices: list[Choice]
    request_id: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    mm_placeholders: dict[str, list[Range]] | None = None
    usage: dict[str, Any] | None = None
    output_mode: OutputMode = "tokens"


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(GenerateResponse)


def wire_mode(wire: str) -> WireMode:
    """`features`, `content_parts` (or `content-parts`) or `auto`; anything else is refused."""
    mode = wire.replace("-", "_")
    if mode not in ("features", "content_parts", "auto"):
        raise InvalidRequestError(f"wire={wire!r}: choose features, content-parts or auto")
    return mode  # type: ignore[return-value]


def encode_body(body: GenerateBody) -> bytes:
    return _ENCODER.encode(body)


def decode_response(content: bytes | memoryview) -> GenerateResponse:
    """A generate answer from its JSON bytes; any other shape is a `MalformedResponseError`."""
    try:
        return _DECODER.decode(content)
    except msgspec.ValidationError as exc:
        raise _malformed(exc, lambda: msgspec.json.decode(content)) from None
    except (msgspec.DecodeError, RecursionError):
        raise MalformedResponseError("generate response body is not JSON (truncated?)") from None


def convert_response(payload: Any) -> GenerateResponse:
    """`decode_response` for a body already decoded to Python objects."""
    try:
        return msgspec.convert(payload, GenerateResponse)
    except msgspec.ValidationError as exc:
        raise _malformed(exc, lambda: payload) from None


_PATH = re.compile(r"\$((?:\.\w+|\[\d+\])*)`?$")
_MISSING = re.compile(r"missing required field `(\w+)`")


def _malformed(exc: msgspec.ValidationError, raw: Any) -> MalformedResponseError:
    """Say which field of which choice is wrong, and show its value (the body is re-read loosely
    for that, on the error path only)."""
    text = str(exc)
    where = text.rsplit(" - at `", 1)[-1] if " - at `" in text else "$"
    match = _PATH.search(where)
    keys: list[str | int] = [int(k[1:-1]) if k.startswith("[") else k[1:]
                             for k in re.findall(r"\.\w+|\[\d+\]", match.group(1) if match else "")]
    missing = _MISSING.search(text)
    if missing:
        keys.append(missing.group(1))
    try:
        value: Any = raw()
        for key in keys:
            value = value[key] if isinstance(value, (dict, list)) else None  # type: ignore[index]
    except (KeyError, IndexError, TypeError, msgspec.DecodeError, RecursionError):
        value = None
    return MalformedResponseError(_describe(keys, value, missing is not None, text))


def _describe(keys: list[str | int], value: Any, missing: bool, text: str) -> str:
    if len(keys) < 2 or keys[0] != "choices":
        return f"generate response has no choices or a malformed {'.'.join(map(str, keys)) or 'body'}: {text}"
    k, rest = keys[1], keys[2:]
    if not rest:
        return f"generate response choice {k} is a {type(value).__name__}, not an object"
    where, name = f"choice {k}", rest[0]
    if name == "token_ids":
        return f"{where} has no token_ids (a list of ints in [0, 2**31)): {value!r:.100}"
    if name == "logprobs":
        if len(rest) == 1:
            return f"{where} has logprobs that are not an object: {value!r:.100}"
        if len(rest) == 2:
            return f"{where} has no logprob entries ({'missing' if missing else f'{value!r:.100}'})"
        entry = rest[2]
        if len(rest) > 3 and rest[3] == "token_id":
            return f"logprob entry {entry} has token id {value!r:.40}"
        return f"logprob entry {entry} is malformed ({'.'.join(map(str, rest[3:])) or 'not an object'}: "\
               f"{value!r:.100})"
    expected = {"index": "an int", "finish_reason": "a string or null", "stop_reason": "an int, string or null"}
    return f"{where} has {name} {value!r:.100} ({expected.get(str(name), text)})"


_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def _entry_token_id(entry: LogprobEntry, k: int) -> int:
    if entry.token_id is not None:
        return entry.token_id
    token = entry.token
    if not (isinstance(token, str) and token.startswith("token_id:")):
        raise MalformedResponseError(f"logprob entry {k} names no token id: {msgspec.to_builtins(entry)!r:.100}")
    digits = token.removeprefix("token_id:")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 10 and int(digits) < 2**31):
        raise MalformedResponseError(f"logprob entry {k} has token id {digits!r:.40}")
    return int(digits)


def logprob_values(entries: list[LogprobEntry] | None, token_ids: list[int]) -> list[float]:
    """One logprob per completion token, of the sampled token (entry `logprob`; `top_logprobs`,
    k or k + 1 long depending on the vLLM version, is not needed for it). The ids must match the
    completion's; the old -9999.0 clamp is restored to -inf."""
    if entries is None or len(entries) != len(token_ids):
        raise MalformedResponseError(f"{len(entries) if entries is not None else 'no'} logprob entries for "
                                     f"{len(token_ids)} completion tokens")
    out = []
    for k, (entry, expected) in enumerate(zip(entries, token_ids, strict=True)):
        token_id = _entry_token_id(entry, k)
        if token_id != expected:
            raise MalformedResponseError(f"logprob entry {k} is for token {token_id}, the completion has {expected}")
        out.append(-math.inf if entry.logprob <= OLD_LOGPROB_CLAMP else float(entry.logprob))
    return out


def parse_logprobs(entries: Any, token_ids: list[int]) -> list[float]:
    """`logprob_values` for entries already decoded to Python objects (either shape)."""
    payload = {"choices": [{"token_ids": list(token_ids), "logprobs": {"content": entries}}]}
    [choice] = convert_response(payload).choices
    assert choice.logprobs is not None
    return logprob_values(choice.logprobs.content, list(choice.token_ids))


def parse_choices(payload: Any, *, n: int, logprobs: bool) -> list[Completion]:
    """`n` completions from a generate answer already decoded to Python objects; anything else
    is a `MalformedResponseError` (a `WireError` and a `ServerError`), never a guess."""
    return completions(convert_response(payload), n=n, logprobs=logprobs)


def completions(response: GenerateResponse, *, n: int, logprobs: bool) -> list[Completion]:
    """The `n` completions, ordered by index; logprobs must be there when they were asked for."""
    choices = sorted(response.choices, key=lambda c: c.index)
    if len(choices) != n:
        raise MalformedResponseError(f"generate response has {len(choices)} choices for n={n}")
    out = []
    for choice in choices:
        if logprobs and choice.logprobs is None:
            raise MalformedResponseError(f"choice {choice.index} has no logprobs although they were requested")
        values = logprob_values(choice.logprobs.content, choice.token_ids) if choice.logprobs else None
        out.append(Completion(token_ids=list(choice.token_ids), logprobs=values,
                              finish_reason=_FINISH.get(choice.finish_reason, "error"),
                              stop_reason=choice.stop_reason,
                              policy_version=policy_version_of(choice.weight_versions, f"choice {choice.index}")))
    return out
