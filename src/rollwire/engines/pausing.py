"""Pause, resume and the weight version of `rollwire serve`, as vLLM's RL endpoints have them.

vLLM (`VLLM_SERVER_DEV_MODE=1`): `POST /pause?mode=abort|wait` (abort ends what runs with
finish_reason "abort"; wait lets it finish; both clear the multimodal cache), `POST /resume`,
`GET /is_paused`, `POST /update_weight_version {"new_version"}`, `GET /weight_info`; each choice
reports `weight_versions` spans. A request that arrives while paused is answered 503 (vLLM 0.33's
"Generation is paused", retryable). Thread-safe: the server runs one thread per connection.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

DEFAULT_VERSION = "default"  # vLLM's label before any update


@dataclass(frozen=True)
class Ticket:
    """What a request saw when it started: the weight version and the pause epoch."""

    version: str
    epoch: int


class GenerationPause:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._epoch = 0  # increments on every abort: requests started before it are aborted
        self._in_flight = 0
        self.version = DEFAULT_VERSION

    @property
    def paused(self) -> bool:
        return self._paused

    def enter(self) -> Ticket | None:
        """A ticket for a request that may run, or None while paused (answer 503)."""
        with self._cond:
            if self._paused:
                return None
            self._in_flight += 1
            return Ticket(self.version, self._epoch)

    def leave(self, ticket: Ticket) -> bool:
        """The request is done; True when a pause with mode=abort happened while it ran."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
            return ticket.epoch != self._epoch

    def pause(self, mode: str, timeout_s: float = 600.0) -> bool:
        """Stop taking requests; mode "abort" aborts those running, "wait" waits for them (up to
        `timeout_s`; False if they did not finish)."""
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._epoch += 1
                return True
            deadline = time.monotonic() + timeout_s
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def resume(self) -> None:
        with self._cond:
            self._paused = False

    def set_version(self, version: str) -> None:
        with self._cond:
            self.version = version


__all__ = ["DEFAULT_VERSION", "GenerationPause", "Ticket"]
