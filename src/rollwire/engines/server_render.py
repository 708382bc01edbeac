"""`rollwire serve`'s `POST /v1/chat/completions/render`: chat messages to token ids and features.

vLLM's render endpoint, answered by the server's own renderer (the one sharing its image cache),
so a client can take the prompt from the server instead of rendering it itself. Images must be
data: URLs: this server reads no files and fetches no URLs. Features come back as uint8 patch
rows in the `features` payload a generate request takes.
"""

from __future__ import annotations

import uuid
from typing import Any

from rollwire.engines.server_images import ServedImages
from rollwire.engines.server_requests import RenderBody, bad_request, check_model, decode_body, internal_error
from rollwire.engines.wire import features_payload
from rollwire.errors import ImageError, MessageError, PlaceholderError, RenderError, RollwireError
from rollwire.messages import parse_messages

__all__ = ["render"]


def render(raw: bytes, images: ServedImages, served_model_name: str) -> tuple[int, dict[str, Any]]:
    """(200, vLLM's render answer) for the request body `raw`; raises `HTTPFailure` otherwise."""
    body = decode_body(raw, RenderBody)
    check_model(body.model, served_model_name)
    try:
        messages = parse_messages(body.messages)
        for index, message in enumerate(messages):
            for part in message.images:
                if not (isinstance(part.image, str) and part.image[:5].lower() == "data:"):
                    raise bad_request(f"messages[{index}]: images must be data: URLs (this server reads "
                                      "no files and fetches no URLs)")
        renderer, store = images.renderer()
        rendered = renderer.render(messages, body.tools, add_generation_prompt=body.add_generation_prompt)
        features = None
        if rendered.images:
            assert store is not None
            features, _ = features_payload(rendered.images, store, pixel_format="uint8")
    except (MessageError, ImageError, RenderError, PlaceholderError) as exc:
        raise bad_request(str(exc)) from None
    except RollwireError as exc:
        raise internal_error(f"render failed: {type(exc).__name__}: {exc}") from None
    return 200, {"request_id": f"render-{uuid.uuid4().hex}", "model": served_model_name,
                 "token_ids": rendered.token_ids, "features": features}
