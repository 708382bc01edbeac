"""`rollwire serve`'s glue to `GenerationPause`: vLLM's RL endpoints, and generate gated by the pause.

The endpoints as vLLM has them (`VLLM_SERVER_DEV_MODE=1`): `POST /pause?mode=abort|wait`
(clearing the image cache unless `clear_cache=false`), `POST /resume`, `GET /is_paused`,
`POST /update_weight_version`, `GET /weight_info`. A generate request is answered 503 while
paused; its choices carry `weight_versions`, or end "abort" when a `/pause?mode=abort` came
while it ran. The pause state itself is `engines/pausing.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from rollwire.engines.httpd import error_body
from rollwire.engines.pausing import GenerationPause
from rollwire.engines.server_requests import bad_request

__all__ = ["Answer", "Handler", "generate_unless_paused", "pausing_routes"]

Answer = tuple[int, dict[str, Any] | None]  # (status, JSON body); status 0 drops the connection
Handler = Callable[[bytes], Answer]


def pausing_routes(pausing: GenerationPause, path: str,
                   forget_cache: Callable[[], None]) -> dict[str, tuple[str, Handler]]:
    """route: (method, handler) of the pause endpoints; `path` is the request's, with its query."""
    return {
        "/pause": ("POST", lambda _: _pause(pausing, path, forget_cache)),
        "/resume": ("POST", lambda _: _resume(pausing)),
        "/is_paused": ("GET", lambda _: (200, {"is_paused": pausing.paused})),
        "/update_weight_version": ("POST", lambda raw: _update_weight_version(pausing, raw)),
        "/weight_info": ("GET", lambda _: (200, {"weight_version": pausing.version})),
    }


def generate_unless_paused(pausing: GenerationPause, generate: Handler, raw: bytes) -> Answer:
    """`generate(raw)` unless paused (503); choices carry `weight_versions`, or end "abort" if
    /pause?mode=abort came while it ran."""
    ticket = pausing.enter()
    if ticket is None:
        return 503, error_body("Generation is paused", 503, "ServiceUnavailableError")
    try:
        status, payload = generate(raw)
    finally:
        aborted = pausing.leave(ticket)
    for choice in (payload or {}).get("choices", []) if status == 200 else []:
        if aborted:
            choice.update(finish_reason="abort", stop_reason=None, token_ids=[],
                          logprobs=None if choice["logprobs"] is None else {"content": []})
        else:
            choice["weight_versions"] = [{"version": ticket.version, "start": 0, "end": len(choice["token_ids"])}]
    return status, payload


def _pause(pausing: GenerationPause, path: str, forget_cache: Callable[[], None]) -> Answer:
    query = dict(part.partition("=")[::2] for part in path.partition("?")[2].split("&") if part)
    mode = query.get("mode", "abort")
    if mode not in ("abort", "wait"):
        raise bad_request(f"pause mode {mode!r} is not supported by rollwire serve (abort or wait)")
    if not pausing.pause(mode):
        return 500, {"error": f"requests still running after the wait timeout: failed to pause ({mode})"}
    if query.get("clear_cache", "true").lower() != "false":
        forget_cache()  # vLLM clears its multimodal cache on pause
    return 200, {"status": "paused"}


def _resume(pausing: GenerationPause) -> Answer:
    pausing.resume()
    return 200, {"status": "resumed"}


def _update_weight_version(pausing: GenerationPause, raw: bytes) -> Answer:
    try:
        version = msgspec.json.decode(raw).get("new_version")
    except (msgspec.DecodeError, AttributeError):
        version = None
    if not isinstance(version, str) or not version:
        raise bad_request("update_weight_version needs {\"new_version\": \"...\"}")
    pausing.set_version(version)
    return 200, {"success": True, "new_version": version}
