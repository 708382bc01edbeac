"""The vLLM token-in/token-out wire format (`POST /inference/v1/generate`), without importing vLLM.

The body's structs are in `vllm_wire` (shared with `rollwire serve`); this module builds them.
One versioned encoder: `VLLM_WIRE` names the vLLM versions whose multimodal `kwargs_data`
layout it writes (the layout is version-specific; older vLLM used another one). Pixels are
sent in the format the server expects (`PixelFormat`), which the client negotiates; a wrong
format is accepted by the server with HTTP 200 and silently changes the output.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np

from rollwire.errors import FeatureError, WireError
from rollwire.features import FeatureStore, ImageFeatures, ImageProcessor, PixelFormat, VisionConfig, WireField
from rollwire.render.types import ImageRef

from .types import GenerateRequest, SamplingParams
from .vllm_wire import VLLM_WIRE_VERSIONS, ContentPart, Features, GenerateBody, Range, Sampling, encode_body

VLLM_WIRE = f"vllm {', '.join(VLLM_WIRE_VERSIONS)} (msgpack kwargs_data with ExtType(3) raw arrays)"
_RAW_ARRAY_EXT = 3  # vLLM's msgpack extension code for raw C-order array bytes
BAN_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]: -100 is its ban
GENERATE_PATH = "/inference/v1/generate"
RENDER_PATH = "/v1/chat/completions/render"


def _array(arr: np.ndarray, dtype_name: str) -> list[Any]:
    data = np.ascontiguousarray(arr)
    return [dtype_name, list(data.shape), msgspec.msgpack.Ext(_RAW_ARRAY_EXT, data.data.cast("B"))]


def pixel_array(features: ImageFeatures, store: FeatureStore, pixel_format: PixelFormat) -> tuple[np.ndarray, str]:
    """The image's pixel rows as the server wants them, with the dtype name vLLM uses."""
    if pixel_format == "uint8":
        return features.pixel_values, "uint8"
    if pixel_format == "float32":
        return features.normalized(store.config, np.float32), "float32"
    # bfloat16 without torch: round-to-nearest-even truncation of float32 to its top 16 bits.
    f32 = np.ascontiguousarray(features.normalized(store.config, np.float32))
    bits = f32.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, "bfloat16"


def _layout(field: WireField, arr: np.ndarray) -> list[Any]:
    if field.layout == "flat":
        return ["flat", {"keep_on_cpu": field.keep_on_cpu, "slices": [[[0, int(arr.shape[0]), None]]], "dim": 0}]
    return ["batched", {"keep_on_cpu": field.keep_on_cpu}]


def encode_image_kwargs(features: ImageFeatures, store: FeatureStore, pixel_format: PixelFormat) -> str:
    """One `kwargs_data` item: base64 of msgpack of the processor outputs for one image, laid out
    as the processor's `wire_fields` table says."""
    processor = store.config
    pixels, dtype_name = pixel_array(features, store, pixel_format)
    others = processor.wire_arrays(features)
    payload: dict[str, Any] = {}
    for field in processor.wire_fields:
        arr, name = (pixels, dtype_name) if field.pixels else (others[field.name], others[field.name].dtype.name)
        if field.pixels and field.pad_rows > arr.shape[0]:  # zero is 0.0 in every pixel format
            arr = np.concatenate([arr, np.zeros((field.pad_rows - arr.shape[0], *arr.shape[1:]), arr.dtype)])
        payload[field.name] = {"data": _array(arr, name), "field": _layout(field, arr)}
    return base64.b64encode(msgspec.msgpack.encode(payload)).decode("ascii")


def image_features(
    images: Sequence[ImageRef],
    store: FeatureStore,
    *,
    pixel_format: PixelFormat,
    by_id_only: Iterable[str] = (),
) -> tuple[Features, int]:
    """The request's `features` and the bytes of pixel data in them.

    Images whose id is in `by_id_only` are sent as a null `kwargs_data` item: the server uses
    its cached copy (and answers an error naming the hash when it has none).
    """
    skip = set(by_id_only)
    sent: dict[str, str] = {}  # an image repeated in one prompt is encoded once
    items: list[str | None] = []
    image_bytes = 0
    for ref in images:
        if ref.id in skip:
            items.append(None)
            continue
        if ref.id not in sent:
            sent[ref.id] = encode_image_kwargs(store.get(ref.id), store, pixel_format)
            image_bytes += len(sent[ref.id])
        items.append(sent[ref.id])
    features = Features(mm_hashes={"image": [ref.id for ref in images]},
                        mm_placeholders={"image": [Range(ref.offset, ref.length) for ref in images]},
                        kwargs_data={"image": items})
    return features, image_bytes


def features_payload(
    images: Sequence[ImageRef],
    store: FeatureStore,
    *,
    pixel_format: PixelFormat,
    by_id_only: Iterable[str] = (),
) -> tuple[dict[str, Any], int]:
    """`image_features` as the plain JSON object (for callers that inspect or edit it)."""
    features, image_bytes = image_features(images, store, pixel_format=pixel_format, by_id_only=by_id_only)
    return msgspec.to_builtins(features), image_bytes


def sampling_struct(params: SamplingParams) -> Sampling:
    """vLLM `sampling_params`; banned ids get a -100 logit bias (vLLM's bound)."""
    return Sampling(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1, n=params.n, seed=params.seed,
        stop_token_ids=list(params.stop_token_ids) or None,
        logit_bias={str(t): BAN_BIAS for t in params.banned_token_ids} or None,
        logprobs=0 if params.logprobs else None,  # the sampled token's own logprob only
        skip_special_tokens=False, detokenize=False)


def sampling_payload(params: SamplingParams) -> dict[str, Any]:
    return msgspec.to_builtins(sampling_struct(params))


def generate_body(
    request: GenerateRequest,
    *,
    model: str,
    features: Features | dict[str, Any] | None,
    content_parts: list[ContentPart] | None = None,
    return_token_ids: bool | None = None,
) -> bytes:
    """The JSON body of one generate request (images as `features` XOR `content_parts`)."""
    if isinstance(features, dict):
        features = msgspec.convert(features, Features)
    body = GenerateBody(
        token_ids=request.prompt_token_ids, sampling_params=sampling_struct(request.sampling), model=model,
        request_id=request.request_id, features=features if request.images else None,
        content_parts=content_parts if request.images else None, return_token_ids=return_token_ids)
    return encode_body(body)


_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16, "int64": np.int64}
_MAX_ELEMENTS = 2**40  # no image's features come near; keeps numpy's shape arithmetic in range


def _decode_array(obj: Any, where: str) -> np.ndarray:
    """A `[dtype_name, shape, Ext(3, bytes)]` array, checked before anything is allocated."""
    if not (isinstance(obj, list) and len(obj) == 3):
        raise WireError(f"{where}: expected [dtype, shape, data]")
    dtype_name, shape, ext = obj
    if dtype_name == "bfloat16":
        dtype: Any = np.uint16  # kept as raw bits; the caller widens them
    elif isinstance(dtype_name, str) and dtype_name in _DTYPES:
        dtype = _DTYPES[dtype_name]
    else:
        raise WireError(f"{where}: dtype {dtype_name!r:.40} is not allowed")
    if not (isinstance(shape, list) and len(shape) <= 4
            and all(type(d) is int and 0 <= d <= 2**31 for d in shape)):
        raise WireError(f"{where}: bad shape {shape!r:.80}")
    if not (isinstance(ext, msgspec.msgpack.Ext) and ext.code == _RAW_ARRAY_EXT):
        raise WireError(f"{where}: data is not a raw array extension")
    data = memoryview(ext.data).cast("B")
    want = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
    if data.nbytes != want:
        raise WireError(f"{where}: {data.nbytes} bytes for shape {shape} of {dtype_name} (want {want})")
    if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:  # an empty array's other dims count too
        raise WireError(f"{where}: bad shape {shape!r:.80}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype_name == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _field_data(obj: dict[Any, Any], name: str) -> Any:
    field = obj.get(name)
    if not isinstance(field, dict) or "data" not in field:
        raise WireError(f"kwargs_data item: {name} is not an object with data")
    return field["data"]


def decode_image_kwargs(
    item: str, processor: ImageProcessor | None = None,
) -> tuple[np.ndarray, tuple[int, int, int], str]:
    """(pixel rows, grid, dtype name) of one `kwargs_data` item laid out as `processor`'s
    `wire_fields` say (default: Qwen-VL's); anything malformed is a WireError.

    Pixel rows are a view of the decoded bytes (bfloat16: widened to float32, one copy of twice
    the size), so the output is at most 2x the item's length; the msgpack nesting is bounded by
    the recursion limit. The processor checks that the other arrays fit the pixels; rows past
    the grid's (a padded layout's padding, checked zero by the processor) are cut off.
    """
    processor = processor if processor is not None else VisionConfig()
    if not isinstance(item, (str, bytes)):
        raise WireError(f"kwargs_data item is a {type(item).__name__}, not a base64 string")
    try:
        obj = msgspec.msgpack.decode(base64.b64decode(item, validate=True))
    except (ValueError, msgspec.DecodeError) as exc:
        raise WireError(f"kwargs_data item is not base64 msgpack: {exc}") from None
    except RecursionError:
        raise WireError("kwargs_data item is nested too deeply") from None
    fields = processor.wire_fields
    missing = [f.name for f in fields if not isinstance(obj, dict) or f.name not in obj]
    if missing:
        raise WireError(f"kwargs_data item lacks {' or '.join(missing)}")
    pixels, dtype_name = np.empty((0, 0), np.uint8), ""
    arrays: dict[str, np.ndarray] = {}
    for field in fields:
        data = _field_data(obj, field.name)
        arrays[field.name] = _decode_array(data, field.name)
        if field.pixels:
            pixels, dtype_name = arrays[field.name], str(data[0])
    try:
        grid = processor.from_wire(pixels, arrays)
    except FeatureError as exc:
        raise WireError(str(exc)) from None
    return pixels[: math.prod(grid)], grid, dtype_name
