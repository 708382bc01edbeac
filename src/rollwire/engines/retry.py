"""How the vLLM client waits and retries: capped exponential backoff with jitter and a deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, for refused connections, 429, 5xx (vLLM answers 503
    while paused for a weight update) and a truncated or malformed 200 body.

    Retries go on until `deadline_s` seconds have passed since the first failure (a vLLM restart
    takes about 40 s), or `attempts` tries when that is set.
    """

    deadline_s: float = 60.0
    attempts: int | None = None
    base_s: float = 0.25
    cap_s: float = 4.0
    jitter: float = 0.5  # the delay is multiplied by a factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int) -> float:
        raw = min(self.cap_s, self.base_s * 2**attempt)
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)

    def next_delay(self, attempt: int, first_failure: float) -> float | None:
        """The wait before try `attempt + 2`, or None when the policy gives up (never past the deadline)."""
        if self.attempts is not None and attempt + 1 >= self.attempts:
            return None
        remaining = self.deadline_s - (time.monotonic() - first_failure)
        if remaining <= 0:
            return None
        return min(self.delay(attempt), remaining)
