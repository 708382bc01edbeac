"""Which pixel format a vLLM server expects, asked once per server (DESIGN invariant 4).

vLLM >= 0.2x normalises Qwen-VL pixels on its side and wants uint8 patch rows by default; with
`--no-mm-device-do-normalize` it wants normalised floats. Either is accepted with HTTP 200, and
the wrong one gives different tokens, so rollwire asks the server's render endpoint to process a
probe image and reads the dtype and values it produced.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from PIL import Image

from rollwire.errors import PixelFormatError, ServerError, WireError
from rollwire.features import FeatureStore, PixelFormat, compute_features

from .hints import server_hint
from .wire import RENDER_PATH, decode_image_kwargs

PostJson = Callable[[str, Any], Awaitable[Any]]


async def settle_pixel_format(post_json: PostJson, store: FeatureStore, *, model: str | None, base_url: str,
                              given: PixelFormat | None) -> PixelFormat | None:
    """The format to send: the detected one; an explicit `given` must agree with it when the
    server can be asked, and stands alone when it cannot (no render endpoint)."""
    try:
        detected = await detect_pixel_format(post_json, store, model=model, base_url=base_url)
    except PixelFormatError as exc:
        if given is None or exc.probe_answered:
            raise
        return given
    if given is not None and given != detected:
        raise PixelFormatError(f"pixel_format={given!r} was given, but {base_url} expects {detected!r} "
                               "(it would accept the request and compute something else)")
    return detected


async def detect_pixel_format(post_json: PostJson, store: FeatureStore, *, model: str | None,
                              base_url: str) -> PixelFormat:
    """Ask the server to render a probe image and read the dtype (and values) it wants.

    The probe needs no resize, so its pixels must equal rollwire's exactly (uint8) or to float
    tolerance (normalised floats); anything else is an error, not a guess.
    """
    config = store.config
    side = config.unresized_side()
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    buf = io.BytesIO()
    probe.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "probe"}]}]
    try:
        answer = await post_json(RENDER_PATH, {"model": model, "messages": messages})
    except ServerError as exc:  # no render endpoint to ask (or it is down)
        raise PixelFormatError(
            f"cannot ask {base_url} which pixel format it expects ({exc}){server_hint(exc.status)}; "
            "pass pixel_format='uint8' (vLLM >= 0.2x default) or 'float32' (--no-mm-device-do-normalize)",
            probe_answered=not (exc.status is None or 400 <= exc.status < 500), status=exc.status) from None
    try:
        pixels, grid, dtype_name = decode_image_kwargs(answer["features"]["kwargs_data"]["image"][0], config)
    except (KeyError, IndexError, TypeError, WireError) as exc:
        raise PixelFormatError(f"{base_url}'s render answer carries no readable pixels ({exc})") from None
    ours = compute_features(probe, config)
    if grid != ours.grid_thw:
        raise PixelFormatError(f"server grid {grid} != rollwire grid {ours.grid_thw} for the probe image: "
                               "the server's processor settings differ from the model directory's")
    if dtype_name == "uint8":
        if not np.array_equal(pixels, ours.pixel_values):
            raise PixelFormatError("server uint8 pixels differ from rollwire's for the probe image")
        return "uint8"
    if dtype_name == "float32" and np.array_equal(pixels, ours.pixel_values):
        # The HF processor's PIL backend (--mm-processor-kwargs '{"use_fast": false}') hands the unrescaled
        # values as floats; the server still normalises on its side and takes uint8 rows (measured, vLLM 0.32).
        return "uint8"
    for name in ("float32", "bfloat16"):
        if dtype_name != name:
            continue
        expected = ours.normalized(config, np.float32)
        tol = 1e-2 if name == "bfloat16" else 1e-5
        if not np.allclose(pixels.astype(np.float32), expected, atol=tol):
            raise PixelFormatError(f"server {dtype_name} pixels are not rollwire's normalised pixels")
        return name
    raise PixelFormatError(f"server expects pixel dtype {dtype_name!r}, which rollwire does not send")
