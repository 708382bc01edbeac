"""An OpenAI-compatible front (`/v1/chat/completions`) that renders and bridges with rollwire,
generates token-in/token-out and records each session as a trajectory."""

from rollwire.front.app import FrontServer

__all__ = ["FrontServer"]
