"""What a request must satisfy before any byte of it leaves for a server.

Placeholders are valid (DESIGN invariant 3: a too long run kills a vLLM 0.32 engine core, a wrong
one is accepted with HTTP 200 and silently changes the output) and the prompt plus `max_tokens`
fits the server's `max_model_len` (vLLM would answer 400 after the images were sent).
"""

from __future__ import annotations

from rollwire.errors import InvalidRequestError, PromptTooLongError
from rollwire.features import FeatureStore
from rollwire.render.placeholders import validate_placeholders

from .types import GenerateRequest


def check_request(request: GenerateRequest, *, store: FeatureStore | None, image_pad_id: int | None,
                  merge_size: int, max_model_len: int | None) -> None:
    if request.sampling.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1")
    if request.images:
        if store is None or image_pad_id is None:
            raise InvalidRequestError("this engine was built without a feature store / image pad id")
        validate_placeholders(request.prompt_token_ids, request.images, pad_id=image_pad_id,
                              merge_size=merge_size, known_ids=store)
    elif image_pad_id is not None and image_pad_id in request.prompt_token_ids:
        validate_placeholders(request.prompt_token_ids, (), pad_id=image_pad_id, merge_size=merge_size)
    n = len(request.prompt_token_ids)
    if max_model_len is not None and n + request.sampling.max_tokens > max_model_len:
        raise PromptTooLongError(f"prompt of {n} tokens + max_tokens {request.sampling.max_tokens} exceeds the "
                                 f"server's max_model_len {max_model_len}")
