"""Whether a server processes an image's original bytes exactly as rollwire does, asked once per kind.

In content_parts mode the server decodes and resizes what it is sent itself. The original (a JPEG,
say) is the fewest bytes, but the server's pixels equal rollwire's only if its decoder and its
image processor match rollwire's: vLLM 0.32 runs the HF processor's torchvision backend by
default, whose resize differs from the PIL one rollwire follows (measured: up to 2 levels on a
few % of values), while an image that needs no resize decodes to the same pixels. That is a
property of the server's software, so each kind (format x needs a resize or not) is checked
once per server: the first such image goes to `POST /v1/chat/completions/render`, and the
server's features must equal rollwire's bit for bit. Equal: originals of that kind go as they
are. Different, or no render endpoint: the resized PNG (exact, bigger), and the reason is logged
once. Never a silent difference.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np

from rollwire.errors import ServerError, WireError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.render.types import ImageRef

from .content_parts import Original, original
from .held import HeldImages
from .hints import server_hint
from .wire import RENDER_PATH, decode_image_kwargs

logger = logging.getLogger("rollwire.engines")

PostJson = Callable[[str, Any], Awaitable[Any]]
SLOW_PROCESSOR = ("start vLLM with --mm-processor-kwargs '{\"use_fast\": false}' (the HF processor's PIL "
                  "backend, which resizes as rollwire does)")


class ServerOriginals:
    """The verdicts for one server: which kinds of original it may be sent as they are. They hold for
    the server's software, so a weight update keeps them; a restart (`held` saw the server unreachable
    and answering again: it may run with other flags now) forgets them, and each kind is asked again."""

    def __init__(self, post_json: PostJson, *, base_url: str, held: HeldImages | None = None) -> None:
        self._post, self.base_url, self._held = post_json, base_url, held
        self._restarts = 0
        self._verdicts: dict[tuple[str, bool], bool] = {}
        self._lock = asyncio.Lock()
        self.refused: str | None = None  # why the server cannot be asked at all
        self.checks = 0  # render requests made

    def accepts(self, found: Original) -> bool:
        return self._verdicts.get(found.kind, False)

    def verdicts(self) -> dict[str, bool]:
        return {f"{fmt}{' resized' if resized else ''}": ok for (fmt, resized), ok in self._verdicts.items()}

    async def check(self, images: Iterable[ImageRef], store: FeatureStore, model: str | None) -> None:
        """Ask the server about each kind among `images` it has not been asked about yet."""
        if self._held is not None and self._held.restarts != self._restarts:
            self._restarts = self._held.restarts
            self._verdicts.clear()
            self.refused = None
        if self.refused is not None:
            return
        todo = await asyncio.to_thread(self._unasked, list(images), store)
        if not todo:
            return
        async with self._lock:
            for features, found in todo:
                if found.kind not in self._verdicts and self.refused is None:
                    await self._ask(features, found, store, model=model)

    def _unasked(self, images: list[ImageRef], store: FeatureStore) -> list[tuple[ImageFeatures, Original]]:
        out: dict[tuple[str, bool], tuple[ImageFeatures, Original]] = {}
        for ref in images:
            if store.encoded(ref.id) is None:
                continue
            features = store.get(ref.id)
            found = original(features, store)
            if found is not None and found.kind not in self._verdicts:
                out.setdefault(found.kind, (features, found))
        return list(out.values())

    async def _ask(self, features: ImageFeatures, found: Original, store: FeatureStore, *, model: str | None) -> None:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": found.url()}},
                                                 {"type": "text", "text": "probe"}]}]
        self.checks += 1
        try:
            answer = await self._post(RENDER_PATH, {"model": model, "messages": messages})
        except ServerError as exc:  # after the connection's own retries
            if exc.status is None:
                logger.info("%s: cannot check %s now (%s); they go as PNG until it answers", self.base_url,
                            found.describe(), exc)
                return  # unreachable (restarting?): no verdict, asked again with the next such image
            self.refused = f"it cannot be asked how it processes them ({exc}){server_hint(exc.status)}"
            logger.warning("%s: every image goes as the resized PNG rollwire processed, not as the user's original: "
                           "%s", self.base_url, self.refused)
            return
        difference = compare(answer, features, store)
        self._verdicts[found.kind] = difference is None
        if difference is None:
            logger.info("%s processes %s as rollwire does: they go as they are", self.base_url, found.describe())
            return
        cause = (f"the server's processor resizes differently: {SLOW_PROCESSOR}" if found.resized else
                 f"the server decodes {found.format} to other pixels than rollwire's Pillow (another build)")
        logger.warning("%s: %s go as the resized PNG rollwire processed (exact, bigger), not as they are: %s; %s",
                       self.base_url, found.describe(), difference, cause)


def compare(answer: Any, features: ImageFeatures, store: FeatureStore) -> str | None:
    """What differs between a render answer's image features and rollwire's (None: bit for bit equal).

    uint8 rows must be equal; float32 rows (a server that normalises on its side hands its PIL
    backend's unrescaled floats, one that does not hands normalised ones) must be those values."""
    try:
        pixels, grid, dtype = decode_image_kwargs(answer["features"]["kwargs_data"]["image"][0], store.config)
    except (KeyError, IndexError, TypeError, WireError) as exc:
        return f"its render answer carries no readable pixels ({exc})"
    if grid != features.grid_thw:
        return f"its processor makes grid {grid}, rollwire's {features.grid_thw}"
    ours = features.pixel_values
    if dtype == "uint8":
        theirs = pixels.astype(np.int16)
    elif dtype == "float32" and np.array_equal(pixels, ours):
        return None
    elif dtype == "float32":  # normalised: a one-level difference is ~0.015, far above the tolerance
        if np.allclose(pixels, features.normalized(store.config, np.float32), atol=1e-5):
            return None
        return "its float32 pixels are neither rollwire's values nor their normalised form"
    else:
        return f"its pixels are {dtype}, which cannot be compared with rollwire's bit for bit"
    diff = np.abs(theirs - ours.astype(np.int16))
    if not diff.any():
        return None
    return f"{np.count_nonzero(diff) / diff.size:.2%} of its pixel values differ from rollwire's, by up to {diff.max()}"
