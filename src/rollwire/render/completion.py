"""The check a sampled completion passes where it enters a rollout (model output is not trusted).

An engine can return ids the tokenizer cannot decode (padding rows of a larger embedding), a
vision or template-structure token that would be re-sent to the server and trained on, a stop
token before the end, or a logprob that is NaN or positive: each is a `CompletionError` naming
the position, raised before the completion is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rollwire.errors import CompletionError

# A raw logprob is a log-softmax value: <= 0 up to float rounding.
LOGPROB_TOLERANCE = 1e-4


def validate_completion(
    token_ids: Sequence[object],
    logprobs: Sequence[object] | None,
    *,
    vocab_size: int,
    stop_token_ids: Sequence[int],
    forbidden_token_ids: Sequence[int],
) -> None:
    """Raise `CompletionError` unless every id is an int in [0, vocab_size), none is forbidden
    (vision, template structure), a stop id appears only last, and each logprob (when given, one
    per id) is a finite number <= 0."""
    stops, forbidden = set(stop_token_ids), set(forbidden_token_ids)
    last = len(token_ids) - 1
    for k, t in enumerate(token_ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise CompletionError(f"completion token {k} is {type(t).__name__} {t!r}, not an int", position=k)
        if not 0 <= t < vocab_size:
            raise CompletionError(f"completion token {k} is id {t}, outside the vocabulary [0, {vocab_size})",
                                  position=k)
        if t in forbidden:
            raise CompletionError(f"completion token {k} is id {t}, a vision or template-structure token the "
                                  "model must not sample", position=k)
        if t in stops and k != last:
            raise CompletionError(f"completion token {k} is stop id {t} but the completion goes on", position=k)
    if logprobs is None:
        return
    if len(logprobs) != len(token_ids):
        raise CompletionError(f"{len(logprobs)} logprobs for {len(token_ids)} completion tokens")
    for k, lp in enumerate(logprobs):
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > LOGPROB_TOLERANCE:
            raise CompletionError(f"completion logprob {k} is {lp!r}: not a finite value <= 0", position=k)
