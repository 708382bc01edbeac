"""A hostile corpus for every decoder: real payloads from rollwire's encoders, mutated (truncated,
flipped, wrong extension, dtype, shape or length, deep nesting, huge declared sizes), each of which
must give the decoder's typed error with a message that says what is wrong."""

from __future__ import annotations

import base64
import json
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import fuzz_targets as ft

from rollwire.engines.server import EngineServer
from rollwire.engines.vllm import parse_choices
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs
from rollwire.errors import CodecError, MalformedResponseError, ServerError, WireError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.rollout.types import Trajectory
from rollwire.transport.codec import decode, encode
from rollwire.transport.packing import TOKENS_PER_BYTE, pack, unpack

STORE = FeatureStore(VisionConfig.qwen2_vl())
TRAJ = ft.trajectory(STORE, "t0", 3)
Ext = msgspec.msgpack.Ext


def _array_ext(dtype: str, shape: tuple[int, ...], raw: bytes, code: int = 1, version: int = 1) -> bytes:
    name = dtype.encode("latin-1")
    header = bytes((version, len(name))) + name + bytes((len(shape),)) + b"".join(struct.pack("<Q", d) for d in shape)
    return msgspec.msgpack.encode(Ext(code, header + raw))


def _nested(depth: int, opener: bytes = b"\x91") -> bytes:
    return opener * depth + b"\xc0"


GOOD_TRAJ = encode(TRAJ)
GOOD_ARRAY = encode(np.arange(6, dtype=np.float32).reshape(2, 3))

# --- codec ------------------------------------------------------------------------------------

CODEC_ANY = [
    ("nested-1k-arrays", _nested(1024), "nested deeper"),
    ("nested-100k-arrays", _nested(100_000), "nested deeper"),
    ("nested-maps", b"\x81\xa1k" * 5000 + b"\xc0", "nested deeper"),
    ("nested-array16", b"\xdc\x00\x01" * 3000 + b"\xc0", "nested deeper"),
    ("empty", b"", "truncated"),
    ("trailing-bytes", GOOD_ARRAY + b"\xc0", "trailing"),
    ("array32-declares-4G", b"\xdd\xff\xff\xff\xff", "truncated"),
    ("map32-declares-4G", b"\xdf\xff\xff\xff\xff", "truncated"),
    ("str32-declares-4G", b"\xdb\xff\xff\xff\xff", "truncated"),
    ("bin32-declares-4G", b"\xc6\xff\xff\xff\xff", "truncated"),
    ("ext32-declares-4G", b"\xc9\xff\xff\xff\xff\x01", "truncated"),
    ("invalid-utf8", b"\xa2\xff\xfe", "UTF-8"),
    ("reserved-byte", b"\xc1", "malformed"),
    ("unknown-ext-code", msgspec.msgpack.encode(Ext(7, b"x")), "unknown msgpack extension code 7"),
    ("bad-timestamp", b"\xc7\x03\xff\x00\x00\x00", "timestamp"),
    ("array-version-2", _array_ext("uint8", (2,), b"\0\0", version=2), "format version 2"),
    ("array-truncated-header", msgspec.msgpack.encode(Ext(1, b"\x01")), "truncated"),
    ("array-dtype-object", _array_ext("object", (1,), b"\0" * 8), "not allowed"),
    ("array-dtype-non-ascii", _array_ext("\xe9", (1,), b"\0"), "non-ASCII"),
    ("array-33-dims", _array_ext("uint8", (1,) * 33, b"\0"), "33 dimensions"),
    ("array-dims-truncated", msgspec.msgpack.encode(Ext(1, b"\x01\x05uint8\x02" + b"\0" * 9)), "truncated"),
    ("array-short-data", _array_ext("float32", (2, 3), b"\0" * 23), "needs 24 bytes"),
    ("array-long-data", _array_ext("float32", (2, 3), b"\0" * 25), "needs 24 bytes"),
    ("array-huge-dim", _array_ext("uint8", (2**63,), b""), "implausible"),
    ("array-empty-huge-dims", _array_ext("float32", (0, 2**48, 2**48), b""), "implausible"),
    ("tensor-empty-huge-dims", _array_ext("float32", (0, 2**40, 2**40), b"", code=2), "implausible"),
    ("array-truncated-in-payload", GOOD_ARRAY[:-1], "truncated"),
]


@pytest.mark.parametrize(("data", "needle"), [pytest.param(d, n, id=i) for i, d, n in CODEC_ANY])
def test_codec_refuses_hostile_bytes(data: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        decode(data)


def _with(obj: dict[str, Any], **changes: Any) -> bytes:
    return msgspec.msgpack.encode({**obj, **changes})


_TRAJ_DICT = msgspec.msgpack.decode(GOOD_TRAJ)
CODEC_TRAJ = [
    ("truncated-at-1", GOOD_TRAJ[:1], "truncated"),
    ("truncated-at-half", GOOD_TRAJ[: len(GOOD_TRAJ) // 2], "truncated"),
    ("truncated-by-1", GOOD_TRAJ[:-1], "truncated"),
    ("not-a-map", encode([1, 2, 3]), "Expected `object`"),
    ("id-an-int", _with(_TRAJ_DICT, id=5), "Expected `str`"),
    ("seed-a-float", _with(_TRAJ_DICT, seed=1.5), "Expected `int`"),
    ("steps-a-map", _with(_TRAJ_DICT, steps={"a": 1}), "Expected `array`"),
    ("finish-unknown", _with(_TRAJ_DICT, finish="exploded"), "Invalid enum value"),
    ("env-info-nested-2k", msgspec.msgpack.encode({**_TRAJ_DICT, "env_info": {}})[:-1]
     + b"\x81\xa1k" + _nested(2000), "nested deeper"),
    ("reward-a-string", _with(_TRAJ_DICT, reward="high"), "Expected `float`"),
]


@pytest.mark.parametrize(("data", "needle"), [pytest.param(d, n, id=i) for i, d, n in CODEC_TRAJ])
def test_typed_decode_refuses_hostile_bytes(data: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        decode(data, Trajectory)


# --- packing ----------------------------------------------------------------------------------

PACKED = pack([TRAJ, ft.trajectory(STORE, "t1", 2)], STORE)
_FRAME = struct.Struct("<4sBIQ")
_BODY = list(msgspec.msgpack.decode(PACKED[_FRAME.size:]))
_META = list(msgspec.msgpack.decode(zlib.decompress(_BODY[8])))


def _body(**changes: Any) -> bytes:
    """The real batch with body fields replaced (positional: see packing's _Body), reframed."""
    names = ["version", "step_fields", "trajectory_fields", "image_ids", "pixels", "tokens", "logprobs",
             "meta_size", "meta"]
    body = list(_BODY)
    for name, value in changes.items():
        body[names.index(name)] = value
    return ft.frame(msgspec.msgpack.encode(body))


def _meta(edit: Callable[[list[Any]], None]) -> bytes:
    """The real batch with its metadata edited (trajectories, heads, rests), recompressed."""
    meta = msgspec.msgpack.decode(msgspec.msgpack.encode(_META))
    edit(meta)
    raw = msgspec.msgpack.encode(meta)
    return _body(meta_size=len(raw), meta=zlib.compress(raw))


def _head(t: int, k: int, field: int, value: Any) -> Callable[[list[Any]], None]:
    def edit(meta: list[Any]) -> None:
        meta[1][t][k][field] = value  # head: base, refs_extend, new_tokens, completion_tokens, logprobs, refs
    return edit


def _ref(field: int, value: Any) -> Callable[[list[Any]], None]:
    def edit(meta: list[Any]) -> None:
        meta[1][0][0][5][0][field] = value  # ref: image, offset, length, grid_thw
    return edit


def _ext(arr: np.ndarray) -> Ext:
    """An array as the msgpack extension value the body holds."""
    value: Ext = msgspec.msgpack.decode(encode(arr))
    return value


def _bomb() -> bytes:
    """A delta-encoded expansion: one stored prompt re-used by thousands of steps that add nothing."""
    steps = 5000
    prompt = np.arange(2000, dtype=np.int32)
    heads = [[[-1, False, len(prompt), 0, -1, []]] + [[k - 1, False, 0, 0, -1, []] for k in range(1, steps)]]
    rest = _META[2][1][0]
    meta = msgspec.msgpack.encode([[_META[0][0]], heads, [[rest] * steps]])
    return _body(image_ids=[], pixels=[], tokens=_ext(prompt), logprobs=_ext(np.zeros(0, np.float32)),
                 meta_size=len(meta), meta=zlib.compress(meta, 9))


def _nested_meta() -> bytes:
    raw = msgspec.msgpack.encode(_META)
    # the first trajectory's env_info value (an `Any`) becomes a 2000-deep array
    marker = msgspec.msgpack.encode([3, 3])
    raw = raw.replace(marker, _nested(2000), 1)
    return _body(meta_size=len(raw), meta=zlib.compress(raw))


PACKING = [
    ("frame-truncated", PACKED[:10], "truncated"),
    ("body-truncated", PACKED[:-1], "truncated"),
    ("bad-magic", b"XXXX" + PACKED[4:], "bad magic"),
    ("version-9", PACKED[:4] + b"\x09" + PACKED[5:], "format 9"),
    ("flipped-body-byte", PACKED[:-5] + bytes([PACKED[-5] ^ 0x10]) + PACKED[-4:], "checksum"),
    ("body-not-msgpack", ft.frame(b"\xc1\xc1"), "cannot decode"),
    ("body-nested-2k", ft.frame(_nested(2000)), "cannot decode"),
    ("schema-version-2", _body(version=2), "format 2"),
    ("schema-other-step-fields", _body(step_fields=["x"]), "Step fields"),
    ("image-id-twice", _body(image_ids=[_BODY[3][0], _BODY[3][0]]), "twice|pixel arrays"),
    ("meta-size-beyond-bound", _body(meta_size=2**31), "the bound is"),
    ("meta-size-negative", _body(meta_size=-1), "the bound is"),
    ("meta-size-mismatch", _body(meta_size=_BODY[7] - 1), "inflates to"),
    ("meta-not-zlib", _body(meta=b"not zlib"), "does not inflate"),
    ("meta-zlib-bomb", _body(meta_size=2**22, meta=zlib.compress(b"\0" * 2**22, 9)), "the bound is"),
    ("meta-nested-2k", _nested_meta(), "nested deeper"),
    ("tokens-float32", _body(tokens=_ext(np.zeros(3, np.float32))), "tokens must be"),
    ("tokens-2d", _body(tokens=_ext(np.zeros((1, 3), np.int32))), "tokens must be"),
    ("tokens-a-list", _body(tokens=[1, 2, 3]), "cannot decode"),
    ("logprobs-int", _body(logprobs=_ext(np.zeros(3, np.int32))), "logprobs must be"),
    ("pixels-not-uint8", _body(pixels=[[_ext(np.zeros((4, 1176), np.float32)), [1, 2, 2], 2]]), "uint8"),
    ("pixels-for-no-image", _body(image_ids=[]), "outside the batch"),
    ("pixels-grid-mismatch", _body(pixels=[[_BODY[4][0][0], [1, 2, 4], 2]]), "does not match"),
    ("base-is-self", _meta(_head(0, 1, 0, 1)), "names base step 1"),
    ("base-out-of-range", _meta(_head(0, 1, 0, 7)), "names base step 7"),
    ("base-below-minus-one", _meta(_head(0, 1, 0, -2)), "names base step -2"),
    ("extend-without-base", _meta(_head(0, 0, 1, True)), "names base step -1"),
    ("negative-new-tokens", _meta(_head(0, 0, 2, -1)), "negative counts"),
    ("completion-past-array", _meta(_head(0, 0, 3, 1000)), "reads past"),
    ("logprobs-past-array", _meta(_head(1, 1, 4, 10**6)), "reads past"),
    ("logprobs-below-minus-one", _meta(_head(0, 0, 4, -2)), "negative counts"),
    ("ref-image-outside", _meta(_ref(0, 5)), "outside the batch"),
    ("ref-negative-offset", _meta(_ref(1, -3)), "image ref at offset -3"),
    ("ref-zero-length", _meta(_ref(2, 0)), "length 0"),
    ("ref-zero-grid", _meta(_ref(3, [0, 2, 2])), r"grid \(0, 2, 2\)"),
    ("ref-bool-offset", _meta(_ref(1, True)), "Expected `int`"),
    ("heads-shorter", _meta(lambda m: m[1][0].pop()), "unequal head and step"),
    ("trajectory-lists-differ", _meta(lambda m: m[0].pop()), "differ in length"),
    ("tokens-left-over", _meta(_head(1, 1, 3, 0)), "no step accounts for|reads past"),
    ("rest-status-unknown", _meta(lambda m: m[2][0][0].__setitem__(2, "exploded")), "Invalid enum|Expected"),
    ("delta-expansion-bomb", _bomb(), "decodes to more than"),
]


@pytest.mark.parametrize(("data", "needle"), [pytest.param(d, n, id=i) for i, d, n in PACKING])
def test_unpack_refuses_hostile_batches(data: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        unpack(data)


def test_expansion_bound_is_a_stated_multiple_and_can_be_set() -> None:
    bomb = _bomb()
    assert TOKENS_PER_BYTE * len(bomb) < 5000 * 2000  # 10M tokens from a few KB: refused by default
    with pytest.raises(CodecError, match="max_tokens"):
        unpack(bomb)
    trajs = [TRAJ, ft.trajectory(STORE, "t1", 2)]
    items = sum(len(s.prompt_ids) + len(s.completion_ids) + len(s.images) for t in trajs for s in t.steps)
    assert unpack(PACKED, max_tokens=items).trajectories == trajs  # exactly at the bound: decodes
    with pytest.raises(CodecError, match=f"more than {items - 1} tokens"):
        unpack(PACKED, max_tokens=items - 1)


def test_valid_batches_still_decode_zero_copy() -> None:
    batch = unpack(PACKED)
    assert batch.trajectories[0] == TRAJ
    pixels = next(iter(batch.images.values())).pixel_values
    assert not pixels.flags.owndata and not pixels.flags.writeable  # a view of the packed buffer


# --- wire kwargs items ------------------------------------------------------------------------

FEATS = STORE.get_or_process(ft.image(56, 84, seed=3))
ITEM = msgspec.msgpack.decode(base64.b64decode(encode_image_kwargs(FEATS, STORE, "uint8")))


def _item(pixels: Any = None, grid: Any = None, raw: Any = None) -> str:
    obj = msgspec.msgpack.decode(msgspec.msgpack.encode(ITEM))
    if pixels is not None:
        obj["pixel_values"]["data"] = pixels
    if grid is not None:
        obj["image_grid_thw"]["data"] = grid
    return base64.b64encode(msgspec.msgpack.encode(raw if raw is not None else obj)).decode()


def _grid(values: list[Any], dtype: str = "int64") -> list[Any]:
    return [dtype, [len(values)], Ext(3, np.asarray(values, dtype=dtype).tobytes())]


_T, _H, _W = FEATS.grid_thw
_ROWS = ITEM["pixel_values"]["data"]
KWARGS = [
    ("not-a-string", 5, "not a base64 string"),
    ("none", None, "not a base64 string"),
    ("not-base64", "!!!!", "not base64 msgpack"),
    ("base64-of-garbage", base64.b64encode(b"\xc1").decode(), "not base64 msgpack"),
    ("nested-2k", base64.b64encode(_nested(2000)).decode(), "nested too deeply"),
    ("not-a-map", _item(raw=[1, 2]), "lacks pixel_values"),
    ("pixel-values-a-list", _item(raw={"pixel_values": [1], "image_grid_thw": {}}), "not an object with data"),
    ("data-not-a-triple", _item(pixels=["uint8", [1]]), "expected \\[dtype, shape, data\\]"),
    ("dtype-a-list", _item(pixels=[["uint8"], _ROWS[1], _ROWS[2]]), "dtype \\['uint8'\\] is not allowed"),
    ("dtype-object", _item(pixels=["object", _ROWS[1], _ROWS[2]]), "not allowed"),
    ("shape-bools", _item(pixels=["uint8", [True, True], Ext(3, b"\0")]), "bad shape"),
    ("shape-negative", _item(pixels=["uint8", [-1, 4], Ext(3, b"")]), "bad shape"),
    ("shape-floats", _item(pixels=["uint8", [1.0, 4.0], Ext(3, b"\0" * 4)]), "bad shape"),
    ("shape-5-dims", _item(pixels=["uint8", [1] * 5, Ext(3, b"\0")]), "bad shape"),
    ("empty-huge-dims", _item(pixels=["uint8", [0, 2**31, 2**31, 2**31], Ext(3, b"")]), "bad shape"),
    ("ext-code-1", _item(pixels=[_ROWS[0], _ROWS[1], Ext(1, _ROWS[2].data)]), "raw array extension"),
    ("data-short", _item(pixels=[_ROWS[0], _ROWS[1], Ext(3, _ROWS[2].data[:-1])]), "bytes for shape"),
    ("pixels-1d", _item(pixels=["uint8", [8], Ext(3, b"\0" * 8)]), "must be 2-D"),
    ("grid-float-nan", _item(grid=_grid([float("nan"), _H, _W], "float32")), "must be int64"),
    ("grid-float-inf", _item(grid=_grid([float("inf"), _H, _W], "float32")), "must be int64"),
    ("grid-negative-pair", _item(grid=_grid([-_T, -_H, _W])), "must be positive"),
    ("grid-zero", _item(grid=_grid([0, _H, _W])), "must be positive"),
    ("grid-int64-wraps", _item(grid=_grid([2**62, 4, _T * _H * _W])), "implies"),
    ("grid-two-values", _item(grid=_grid([_H, _W])), "3 values"),
    ("grid-mismatch", _item(grid=_grid([_T, _H, _W + 2])), "implies"),
]


@pytest.mark.parametrize(("item", "needle"), [pytest.param(d, n, id=i) for i, d, n in KWARGS])
def test_kwargs_decoder_refuses_hostile_items(item: Any, needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        decode_image_kwargs(item)


def test_kwargs_valid_item_still_decodes_as_a_view() -> None:
    pixels, grid, dtype = decode_image_kwargs(encode_image_kwargs(FEATS, STORE, "uint8"))
    assert (grid, dtype) == (FEATS.grid_thw, "uint8") and np.array_equal(pixels, FEATS.pixel_values)
    assert not pixels.flags.owndata


# --- response bodies --------------------------------------------------------------------------


def _choice(**changes: Any) -> dict[str, Any]:
    choice = {"index": 0, "token_ids": [5, 7], "finish_reason": "stop", "stop_reason": None,
              "logprobs": {"content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 7, "logprob": -1.0}]}}
    return {"choices": [{**choice, **changes}]}


def _entry(**changes: Any) -> dict[str, Any]:
    return _choice(token_ids=[5], logprobs={"content": [{"token_id": 5, "logprob": -0.5, **changes}]})


RESPONSES = [
    ("payload-null", None, "no choices"),
    ("payload-a-list", [1], "no choices"),
    ("choices-a-map", {"choices": {"0": {}}}, "no choices"),
    ("choice-a-list", {"choices": [[1]]}, "not an object"),
    ("index-a-string", _choice(index="0"), "has index '0'"),
    ("index-a-list", _choice(index=[0]), "has index"),
    ("index-bool", _choice(index=True), "has index True"),
    ("token-ids-missing", {"choices": [{"index": 0}]}, "no token_ids"),
    ("token-ids-strings", _choice(token_ids=["5", "7"]), "no token_ids"),
    ("token-ids-bools", _choice(token_ids=[True, False]), "no token_ids"),
    ("token-ids-negative", _choice(token_ids=[-1, 7]), "no token_ids"),
    ("token-ids-huge", _choice(token_ids=[2**40, 7]), "no token_ids"),
    ("token-ids-floats", _choice(token_ids=[5.0, 7.0]), "no token_ids"),
    ("token-ids-nested", _choice(token_ids=[[5], [7]]), "no token_ids"),
    ("finish-reason-a-list", _choice(finish_reason=["stop"]), "finish_reason \\['stop'\\]"),
    ("finish-reason-an-int", _choice(finish_reason=1), "finish_reason 1"),
    ("stop-reason-a-list", _choice(stop_reason=[7]), "stop_reason \\[7\\]"),
    ("stop-reason-bool", _choice(stop_reason=True), "stop_reason True"),
    ("logprobs-a-list", _choice(logprobs=[-0.5, -1.0]), "not an object"),
    ("logprobs-content-missing", _choice(logprobs={}), "no logprob entries"),
    ("logprobs-too-few", _choice(logprobs={"content": [{"token_id": 5, "logprob": -0.5}]}), "1 logprob entries"),
    ("logprob-a-string", _entry(logprob="-0.5"), "malformed"),
    ("logprob-bool", _entry(logprob=False), "malformed"),
    ("logprob-null", _entry(logprob=None), "malformed"),
    ("entry-a-number", _choice(token_ids=[5], logprobs={"content": [-0.5]}), "malformed"),
    ("entry-token-id-float", _entry(token_id=5.0), "has token id 5.0"),
    ("entry-token-id-bool", _entry(token_id=True), "has token id True"),
    ("entry-token-id-negative", _entry(token_id=-5), "has token id -5"),
    ("entry-token-id-other", _entry(token_id=6), "is for token 6"),
    ("old-token-exponent", _choice(token_ids=[5], logprobs={"content": [{"token": "token_id:5e0", "logprob": -1}]}),
     "has token id '5e0'"),
    ("old-token-no-prefix", _choice(token_ids=[5], logprobs={"content": [{"token": "5", "logprob": -1}]}),
     "names no token id"),
]


@pytest.mark.parametrize(("payload", "needle"), [pytest.param(d, n, id=i) for i, d, n in RESPONSES])
def test_response_parser_refuses_malformed_bodies(payload: Any, needle: str) -> None:
    payload = json.loads(json.dumps(payload))  # exactly what a JSON body decodes to
    with pytest.raises(MalformedResponseError, match=needle) as info:
        parse_choices(payload, n=1, logprobs=True)
    assert isinstance(info.value, ServerError) and isinstance(info.value, WireError) and info.value.status == 200


def test_response_parser_keeps_valid_shapes() -> None:
    [c] = parse_choices(_choice(stop_reason="</s>"), n=1, logprobs=True)
    assert (c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) == ([5, 7], [-0.5, -1.0], "stop", "</s>")
    [c] = parse_choices(_choice(logprobs=None, finish_reason=None), n=1, logprobs=False)
    assert (c.logprobs, c.finish_reason) == (None, "error")


# --- server request bodies --------------------------------------------------------------------

GENERATE = "/inference/v1/generate"


@pytest.fixture(scope="module")
def server(tiny: Callable[[str], Path]) -> Iterator[EngineServer]:
    with EngineServer(tiny("qwen2_vl"), served_model_name="tiny", max_model_len=512) as srv:
        yield srv


def _request(**changes: Any) -> bytes:
    body: dict[str, Any] = {"model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}}
    sampling = changes.pop("sampling", None)
    if sampling:
        body["sampling_params"] = {**body["sampling_params"], **sampling}
    return json.dumps({**body, **changes}).encode()


_ITEM_TEXT = encode_image_kwargs(FEATS, STORE, "uint8")


def _features(item: Any, offset: int = 1, length: int = 4) -> dict[str, Any]:
    return {"mm_hashes": {"image": ["h"]}, "mm_placeholders": {"image": [{"offset": offset, "length": length}]},
            "kwargs_data": {"image": [item]}}


SERVER = [
    ("empty", b"", "not JSON"),
    ("not-utf8", b'{"token_ids": "\xff\xfe"}', "not JSON|invalid"),
    # content_parts is a typed list of parts now (vllm_wire.ContentPart): refused at the first level.
    ("nested-5k", b'{"token_ids": [1], "sampling_params": {}, "content_parts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "Expected `object`, got `array` - at `\\$.content_parts\\[0\\]`"),
    ("render-style-nested", b'{"token_ids": [1], "sampling_params": {}, "features": ' + b"[" * 5000 + b"]" * 5000
     + b"}", "invalid request"),
    ("a-list", b"[]", "Expected `object`"),
    ("token-ids-bools", _request(token_ids=[True]), "Expected `int`"),
    ("token-ids-beyond-int64", _request(token_ids=[2**64]), "flat list of ints|Expected|range"),
    ("n-a-billion", _request(sampling={"n": 10**9}), "n=1000000000 is out of range"),
    ("n-zero", _request(sampling={"n": 0}), "out of range"),
    ("stop-id-negative", _request(sampling={"stop_token_ids": [-3]}), "negative id"),
    ("bias-key-underscore", _request(sampling={"logit_bias": {"1_0": -100}}), "is not a token id"),
    ("bias-key-space", _request(sampling={"logit_bias": {" 10": -100}}), "is not a token id"),
    ("bias-inf", b'{"token_ids":[1],"sampling_params":{"logit_bias":{"1":-1e999}}}', "out of range"),
    ("kwargs-item-an-int", _request(features=_features(5)), "Expected `str | null`"),
    ("kwargs-item-garbage", _request(features=_features("!!!")), "not base64 msgpack"),
    ("kwargs-item-nested", _request(features=_features(base64.b64encode(_nested(3000)).decode())),
     "nested too deeply"),
    ("kwargs-grid-negative", _request(features=_features(_item(grid=_grid([-_T, -_H, _W]))), length=1),
     "must be positive"),
    ("placeholder-bool", _request(features={**_features(_ITEM_TEXT), "mm_placeholders": {"image": [
        {"offset": True, "length": 1}]}}), "Expected `int`"),
]


@pytest.mark.parametrize(("body", "needle"), [pytest.param(d, n, id=i) for i, d, n in SERVER])
def test_server_refuses_hostile_bodies_with_400(server: EngineServer, body: bytes, needle: str) -> None:
    status, answer = server.handle("POST", GENERATE, body)
    assert status == 400, answer
    assert answer is not None and answer["error"]["type"] == "BadRequestError"
    assert re.search(needle, answer["error"]["message"]), answer["error"]["message"]
