"""The front's open sessions: looked up by session id, most recently used last, at most `max_sessions`.

A session that ends or is evicted stays on disk; a later call with its id opens a new session whose
trajectory id is fresh in the run directory (`<id>~<k>`), so no row is ever overwritten by another
session's.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from rollwire.front.sessions import Session

__all__ = ["SessionTable"]


class SessionTable:
    """Open sessions by key, and every trajectory id used in the run directory (`used_ids`)."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.used_ids: set[str] = set()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, key: str | None) -> Session:
        """The open session `key` (created when new); a one-call session when `key` is None."""
        with self._lock:
            if key is None:
                one_off = self._fresh_id(None)
                return Session(key=one_off, trajectory_id=one_off)
            session = self._sessions.get(key)
            if session is not None and not session.ended:
                self._sessions.move_to_end(key)
                return session
            session = Session(key=key, trajectory_id=self._fresh_id(key))
            self._sessions[key] = session
            while len(self._sessions) > self.max_sessions:
                _, evicted = self._sessions.popitem(last=False)
                evicted.ended = True  # on disk already; a later call continues under a new id
            return session

    def end(self, key: str) -> Session | None:
        """Close the open session `key` (a call waiting on it continues in a fresh one); None if none is open."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            with session.lock:
                session.ended = True
        return session

    def _fresh_id(self, key: str | None) -> str:
        """A trajectory id not used in this run directory: the session id, else `<id>~<k>`."""
        base = key or f"chatcmpl-{secrets.token_hex(12)}"
        candidate, k = base, 1
        while candidate in self.used_ids:
            candidate, k = f"{base}~{k}", k + 1
        self.used_ids.add(candidate)
        return candidate
