"""The one place that checks image placeholders against the token stream (DESIGN invariant 3).

vLLM accepts a wrong placeholder count or offset with HTTP 200 and silently changes the
output; a trainer fails later with "Image features and image tokens do not match". So every
request and every training sample passes through `validate_placeholders` first.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence

import numpy as np

from rollwire.errors import PlaceholderError
from rollwire.render.types import ImageRef


def expected_length(grid_thw: Sequence[int], merge_size: int) -> int:
    """Pad tokens an image of this grid takes: t*h*w / merge_size²."""
    return math.prod(int(g) for g in grid_thw) // (merge_size * merge_size)


def validate_placeholders(
    token_ids: Sequence[int] | np.ndarray,
    images: Sequence[ImageRef],
    *,
    pad_id: int,
    merge_size: int,
    known_ids: Container[str] | None = None,
) -> None:
    """Raise `PlaceholderError` unless every pad run is exactly one image range and vice versa.

    Checks, in order: ranges sorted, non-overlapping and inside the stream; each range's
    length equals what its grid implies; each range covers only pad tokens and is a whole run
    (no pad token right before or after it); no pad token stands outside a range; every id is
    known (when `known_ids` is given).
    """
    ids = np.asarray(token_ids)
    n = int(ids.shape[0])
    is_pad = ids == pad_id
    covered = 0
    previous_end = 0
    for k, ref in enumerate(images):
        where = f"image {k} ({ref.id[:12]})"
        if ref.offset < previous_end:
            raise PlaceholderError(f"{where}: range at {ref.offset} overlaps or precedes the previous one")
        if ref.length <= 0 or ref.offset < 0 or ref.end > n:
            raise PlaceholderError(
                f"{where}: range [{ref.offset}, {ref.end}) is empty or outside the {n} tokens"
            )
        want = expected_length(ref.grid_thw, merge_size)
        if ref.length != want:
            raise PlaceholderError(
                f"{where}: range length {ref.length} but grid {tuple(ref.grid_thw)} implies {want}"
            )
        if not bool(is_pad[ref.offset : ref.end].all()):
            bad = ref.offset + int(np.argmin(is_pad[ref.offset : ref.end]))
            raise PlaceholderError(f"{where}: token {bad} inside the range is not the image pad token")
        if (ref.offset > 0 and is_pad[ref.offset - 1]) or (ref.end < n and is_pad[ref.end]):
            raise PlaceholderError(f"{where}: the pad run around [{ref.offset}, {ref.end}) is longer")
        if known_ids is not None and ref.id not in known_ids:
            raise PlaceholderError(f"{where}: unknown image id {ref.id!r}")
        covered += ref.length
        previous_end = ref.end
    total = int(is_pad.sum())
    if total != covered:
        outside = is_pad.copy()
        for ref in images:
            outside[ref.offset : ref.end] = False
        raise PlaceholderError(
            f"{total - covered} image pad token(s) stand outside every image range "
            f"(first at {int(np.argmax(outside))})"
        )
