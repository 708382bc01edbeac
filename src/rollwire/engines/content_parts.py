"""The `content_parts` wire mode: encoded images the server processes itself, checked afterwards.

The prompt carries one image-pad token per image (`collapse`); each image goes as a data URL with
rollwire's content id as `uuid`, and later by `uuid` alone while the server holds it. The data is
the user's original encoded bytes (`Original`) where the server was found to process that kind of
image exactly as rollwire does (originals.py asks it once per kind); otherwise a lossless PNG of
the image rollwire's processor resized (rebuilt from its own patch rows), which the server's
processor, resizing nothing at that size, reads as exactly rollwire's pixels.

The server expands each pad into the image's run and returns `prompt_token_ids` and
`mm_placeholders` (`return_token_ids`); `check_expansion` compares them with rollwire's own full
render, so a server that counts or places an image differently is an error, not a silent drift
of token identity or of the pixels a trainer will see.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
from PIL import Image

from rollwire.errors import ExpansionMismatchError, UnsupportedServerError, WireError
from rollwire.features import FeatureStore, ImageFeatures, ImageProcessor
from rollwire.render.types import ImageRef

from .hints import RUST_FRONTEND
from .types import GenerateRequest
from .vllm_wire import ContentPart, GenerateResponse, Range
from .wire import generate_body


def collapse(token_ids: Sequence[int], images: Sequence[ImageRef], pad_id: int) -> list[int]:
    """The prompt with each image's placeholder run replaced by one pad token (what the server
    expands). The runs were validated (in order, inside the prompt, all pads) before this."""
    out: list[int] = []
    at = 0
    for ref in sorted(images, key=lambda r: r.offset):
        out.extend(token_ids[at:ref.offset])
        out.append(pad_id)
        at = ref.end
    out.extend(token_ids[at:])
    return out


def expand(token_ids: Sequence[int], images: Sequence[ImageFeatures], *, pad_id: int,
           ) -> tuple[list[int], tuple[ImageRef, ...]]:
    """The server side of `collapse`: the i-th pad token becomes image i's run of pads."""
    at = [i for i, t in enumerate(token_ids) if t == pad_id]
    if len(at) != len(images):
        raise WireError(f"the prompt has {len(at)} image pad tokens for {len(images)} content_parts images")
    out: list[int] = []
    refs: list[ImageRef] = []
    prev = 0
    for pos, feats in zip(at, images, strict=True):
        out.extend(token_ids[prev:pos])
        refs.append(ImageRef(feats.id, len(out), feats.num_tokens, feats.grid_thw))
        out.extend([pad_id] * feats.num_tokens)
        prev = pos + 1
    out.extend(token_ids[prev:])
    return out, tuple(refs)


def check_processor(processor: ImageProcessor) -> None:
    """content_parts needs patch rows that can be turned back into the resized image (Qwen-VL's
    layout); other processors are refused before anything is sent."""
    if not all(isinstance(getattr(processor, k, None), int) for k in ("patch_size", "temporal_patch_size")):
        raise UnsupportedServerError(
            f"--wire content-parts needs an image processor whose patch rows rebuild the image (Qwen-VL's); "
            f"{type(processor).__name__} has none: use --wire features")


def resized_image(features: ImageFeatures, processor: ImageProcessor) -> Image.Image:
    """The RGB image rollwire's processor patchified, rebuilt from its uint8 rows; re-processing it
    must give the same rows (checked), so the server cannot see other pixels."""
    check_processor(processor)
    p, t, m = processor.patch_size, processor.temporal_patch_size, processor.merge_size  # type: ignore[attr-defined]
    _, gh, gw = features.grid_thw
    rows = features.pixel_values.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    pixels = np.ascontiguousarray(rows.transpose(0, 2, 5, 1, 3, 6, 4)).reshape(gh * p, gw * p, 3)
    image = Image.fromarray(pixels, "RGB")
    again, grid = processor.process(image)
    if grid != features.grid_thw or not np.array_equal(again, features.pixel_values):
        raise WireError(f"image {features.id[:12]}: its patch rows do not rebuild into one image that processes "
                        "to the same rows (frames differ?): use --wire features")
    return image


def image_url(features: ImageFeatures, processor: ImageProcessor) -> str:
    """The resized image as a lossless PNG data URL (exact on any server that does not resize it)."""
    buf = io.BytesIO()
    resized_image(features, processor).save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Original:
    """An image's encoded bytes as the user gave them, in a form a server decodes to rollwire's RGB
    pixels: decoded mode RGB, no transparency to composite, no EXIF orientation to apply."""

    data: bytes
    format: str  # PIL's name: "JPEG", "PNG", "WEBP", ...
    resized: bool  # rollwire's processor resizes it, so the server's must resize it the same way

    @property
    def kind(self) -> tuple[str, bool]:
        """What a server is checked for once: its decoder for the format, its resize if any."""
        return self.format, self.resized

    def describe(self) -> str:
        return f"{self.format} images that {'need' if self.resized else 'need no'} resize"

    def url(self) -> str:
        mime = Image.MIME.get(self.format, f"image/{self.format.lower()}")
        return f"data:{mime};base64," + base64.b64encode(self.data).decode("ascii")


def original(features: ImageFeatures, store: FeatureStore) -> Original | None:
    """The image's original, if the store kept its encoded bytes and they can go as they are."""
    data = store.encoded(features.id)
    patch = getattr(store.config, "patch_size", None)
    if data is None or not isinstance(patch, int):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only
            fmt, mode, size, info = image.format, image.mode, image.size, image.info
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # it decoded once; a header PIL cannot read again goes as the PNG
        return None
    if not fmt or mode != "RGB" or "transparency" in info or orientation != 1:
        return None
    _, gh, gw = features.grid_thw
    return Original(data, fmt, resized=(gw * patch, gh * patch) != size)


def data_url(features: ImageFeatures, store: FeatureStore, accepts: Callable[[Original], bool] | None = None) -> str:
    """The original where `accepts` (the server's verdict for its kind) says so, else the PNG."""
    if accepts is not None and (found := original(features, store)) is not None and accepts(found):
        return found.url()
    return image_url(features, store.config)


def content_parts(images: Sequence[ImageRef], store: FeatureStore, *, by_id_only: Collection[str] = (),
                  accepts: Callable[[Original], bool] | None = None) -> tuple[list[ContentPart], int]:
    """One part per image occurrence, in prompt order, and the bytes of image data in them. Held
    ids go by `uuid` only; an image not held goes with its data at every occurrence (vLLM looks
    all of a request's uuids up before it processes any); originals go where `accepts` says."""
    urls: dict[str, str] = {}
    parts: list[ContentPart] = []
    nbytes = 0
    for ref in sorted(images, key=lambda r: r.offset):
        if ref.id in by_id_only:
            parts.append(ContentPart("image_url", uuid=ref.id))
            continue
        url = urls.get(ref.id) or urls.setdefault(ref.id, data_url(store.get(ref.id), store, accepts))
        nbytes += len(url)
        parts.append(ContentPart("image_url", url=url, uuid=ref.id))
    return parts, nbytes


def request_body(request: GenerateRequest, store: FeatureStore, *, model: str, pad_id: int,
                 by_id_only: Collection[str], accepts: Callable[[Original], bool] | None) -> tuple[bytes, int]:
    """A content_parts request body (the prompt collapsed, the server asked to return its expansion)
    and the bytes of image data in it."""
    parts, nbytes = content_parts(request.images, store, by_id_only=by_id_only, accepts=accepts)
    prompt = collapse(request.prompt_token_ids, request.images, pad_id)
    short = msgspec.structs.replace(request, prompt_token_ids=prompt)
    return generate_body(short, model=model, features=None, content_parts=parts, return_token_ids=True), nbytes


def check_expansion(response: GenerateResponse, prompt_token_ids: Sequence[int], images: Sequence[ImageRef],
                    *, base_url: str, required: bool = True) -> None:
    """The server's expanded prompt and placeholder runs must equal rollwire's render exactly.

    `required=False` (features mode, where the server expands nothing) lets an older server that
    returns no prompt pass; a server that returns the prompt but no placeholders ignored the images.
    """
    if response.prompt_token_ids is None:
        if not required:
            return
        raise UnsupportedServerError(
            f"{base_url} did not return prompt_token_ids (return_token_ids), so its image expansion cannot be "
            "checked: content_parts needs vLLM >= 0.32; use --wire features")
    if images and not (response.mm_placeholders or {}).get("image"):
        raise UnsupportedServerError(f"{base_url} ignored the request's images (it returned no placeholders): "
                                     f"{RUST_FRONTEND}")
    theirs = list(response.prompt_token_ids)
    if theirs != list(prompt_token_ids):
        at = next((i for i, (a, b) in enumerate(zip(theirs, prompt_token_ids, strict=False)) if a != b),
                  min(len(theirs), len(prompt_token_ids)))
        raise ExpansionMismatchError(
            f"{base_url} expanded the prompt to {len(theirs)} tokens, rollwire's render has {len(prompt_token_ids)}; "
            f"first difference at token {at} (server {theirs[at:at + 1]}, rollwire "
            f"{list(prompt_token_ids[at:at + 1])}): the server's processor settings differ from the model "
            "directory's", status=200)
    want = [Range(r.offset, r.length) for r in sorted(images, key=lambda r: r.offset)]
    got = list((response.mm_placeholders or {}).get("image", []))
    if got != want:
        raise ExpansionMismatchError(
            f"{base_url} placed the images at {[(r.offset, r.length) for r in got]}, rollwire's render at "
            f"{[(r.offset, r.length) for r in want]}", status=200)
