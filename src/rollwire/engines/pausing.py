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
from typing import Any

from rollwire.errors import MalformedResponseError

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
        self.pauses = 0  # /pause calls taken (a driver pausing many rollout workers pauses each server once)
        self.refused = 0  # requests answered 503 because they came while paused

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def in_flight(self) -> int:
        """Generate requests running now."""
        return self._in_flight

    def enter(self) -> Ticket | None:
        """A ticket for a request that may run, or None while paused (answer 503)."""
        with self._cond:
            if self._paused:
                self.refused += 1
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
            self.pauses += 1
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


def policy_version_of(spans: Any, where: str = "a choice") -> int | str | None:
    """The label of the weights that sampled a choice, from vLLM's `weight_versions` spans
    (`[{"version", "start", "end"}]`, as dicts or structs): the oldest when an update happened
    mid-completion; None when there are none. A decimal label is read as the integer it spells
    (trainers count versions by step)."""
    if not spans:
        return None
    first = spans[0] if isinstance(spans, list) else None
    version = first.get("version") if isinstance(first, dict) else getattr(first, "version", None)
    if not isinstance(version, str):
        raise MalformedResponseError(f"{where} has weight_versions {spans!r:.100} (a list of version spans)")
    return int(version) if version.isascii() and version.isdecimal() and len(version) < 19 else version[:200]


__all__ = ["DEFAULT_VERSION", "GenerationPause", "Ticket", "policy_version_of"]
