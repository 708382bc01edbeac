"""Benchmark images: noise (incompressible, the worst case) and photo-like pictures (smooth
gradients and shapes, compressible as real photos are), drawn with PIL, the same for each seed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth two-colour gradient with a few soft shapes and mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = ((x / max(width - 1, 1)) * 0.6 + (y / max(height - 1, 1)) * 0.4)[..., None]
    base = a * (1 - mix) + b * mix
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.uniform(0, width * 0.8)), int(rng.uniform(0, height * 0.8))
        x1, y1 = x0 + int(rng.uniform(width * 0.05, width * 0.3)), y0 + int(rng.uniform(height * 0.05, height * 0.3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, width / 300)))
    grain = rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """The image's bytes as a client would send them (JPEG quality 90, or PNG)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()
