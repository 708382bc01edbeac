"""Thumbnails of a run's archived images as data: URLs, so a page embeds them without a network.

Each image is shrunk to at most `max_side` pixels a side (never enlarged) and encoded once: JPEG
for opaque images, lossy WebP (which keeps the alpha channel, at a third of PNG's size) when there
is transparency. A page therefore grows with the number of *unique* images times a bounded
thumbnail, however large the originals (1024² noise, the worst case: 18 KB JPEG, 46 KB WebP).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from rollwire.errors import RollwireError
from rollwire.images import to_rgb
from rollwire.store import RunReader

MAX_SIDE = 256
JPEG_QUALITY = 82


def thumbnail(image: Image.Image, max_side: int = MAX_SIDE) -> tuple[str, bytes, tuple[int, int]]:
    """(mime type, encoded bytes, (width, height)) of `image` shrunk to fit `max_side`."""
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    small = image.convert("RGBA") if alpha else to_rgb(image)
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if alpha:
        small.save(buf, format="WEBP", quality=JPEG_QUALITY, alpha_quality=50, method=4)
        return "image/webp", buf.getvalue(), small.size
    small.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "image/jpeg", buf.getvalue(), small.size


class Thumbnails:
    """Data URLs of a run's images by id, made once each; an image the run did not archive (or
    cannot decode) is None, with the reason in `missing`."""

    def __init__(self, reader: RunReader, max_side: int = MAX_SIDE) -> None:
        self.reader = reader
        self.max_side = max_side
        self.urls: dict[str, str | None] = {}
        self.sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # id -> (thumbnail, original)
        self.missing: dict[str, str] = {}

    def url(self, image_id: str) -> str | None:
        if image_id not in self.urls:
            try:
                image = self.reader.image(image_id)
                mime, data, size = thumbnail(image, self.max_side)
            except (RollwireError, OSError, ValueError) as exc:  # PIL raises OSError / ValueError on odd modes
                self.missing[image_id] = f"{type(exc).__name__}: {exc}"
                self.urls[image_id] = None
            else:
                self.sizes[image_id] = (size, image.size)
                self.urls[image_id] = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return self.urls[image_id]
