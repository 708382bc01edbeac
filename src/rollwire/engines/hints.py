"""What a vLLM server's refusal means, and what to change: one place reads status codes and
error texts (a misconfigured server otherwise surfaces as a bare 403, a pixel-format error, or
a 500 that names nothing)."""

from __future__ import annotations

from typing import Any

from rollwire.errors import ServerError, ServerPausedError

RUST_FRONTEND = ("the opt-in Rust frontend (VLLM_USE_RUST_FRONTEND=1) has no `features` support: "
                 "use --wire content-parts (or auto), or unset VLLM_USE_RUST_FRONTEND")
ENGINE_DEAD = ("EngineCore encountered an issue", "Engine loop is not running", "EngineDeadError",
               "engine core died", "engine is dead")


def error_text(payload: Any) -> str:
    """The message of a vLLM / FastAPI error body (`{"error": {"message"}}`, `{"detail"}`, ...)."""
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload))
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return ""


def server_hint(status: int | None, message: str = "") -> str:
    """What to change on the server for the statuses and messages a misconfigured vLLM answers."""
    lowered = message.lower()
    if status == 403:
        return (" - vLLM answers 403 on the token-in/token-out endpoints unless it is started with "
                "--enable-scale-out")
    if status == 404:
        return (" - the server has no such endpoint: rollwire needs vLLM >= 0.30 (POST /inference/v1/generate "
                "and /v1/chat/completions/render, which a --tokens-only server lacks: start it without that flag); "
                + RUST_FRONTEND)
    tokens_only = "tokens-only" in lowered or "skip-tokenizer-init" in lowered
    if tokens_only or ("does not load" in lowered and "tokenizer" in lowered):
        return (" - the server runs with --tokens-only / --skip-tokenizer-init, which does not work for vision "
                "models: start it without that flag")
    if status in (400, 422) and ("features" in lowered or "kwargs_data" in lowered or "mm_hashes" in lowered) and (
            "unknown" in lowered or "not supported" in lowered or "unexpected" in lowered):
        return " - " + RUST_FRONTEND
    return ""


def is_paused(status: int | None, message: str) -> bool:
    """vLLM 0.33 answers 503 "Generation is paused" during a weight update (retryable)."""
    return status == 503 and "paused" in message.lower()


def is_engine_dead(status: int | None, message: str) -> bool:
    """vLLM's generic answer once its engine core has died (it does not recover by retrying)."""
    lowered = message.lower()
    return status is not None and status >= 500 and any(m.lower() in lowered for m in ENGINE_DEAD)


def is_content_cache_miss(status: int | None, message: str) -> bool:
    """vLLM's answer to a `content_parts` item sent by uuid only that its cache no longer holds."""
    return status is not None and status in (400, 500) and "cache miss for image" in message.lower()


def give_up_error(base_url: str, status: int | None, error: str, *, attempts: int, elapsed: float,
                  deadline_s: float | None) -> ServerError:
    """The error for a request that failed past the retry deadline: a pause that outlasted it is
    named as one (and what ends it), anything else is a `ServerError` with the last answer."""
    if is_paused(status, error):
        return ServerPausedError(
            f"{base_url} kept answering 503 'Generation is paused' for {elapsed:.1f} s, past the retry deadline "
            f"({deadline_s} s): resume it (POST /resume) or allow a longer pause with RetryPolicy(deadline_s=...)",
            status=status)
    return ServerError(f"{base_url} failed after {attempts} attempts in {elapsed:.1f} s: {error}", status=status)
