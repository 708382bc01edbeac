"""Fuzz targets for every rollwire decoder, shared by the CI tests and `scripts/fuzz.py`.

A target takes bytes and feeds them to one decoder the way rollwire does. The property is the
same everywhere: the decoder returns a valid value or raises a `RollwireError`; any other
exception (RecursionError, TypeError, MemoryError, ...) or an invalid value is a finding.
Seeds are real payloads from rollwire's own encoders; `mutate` derives hostile ones from them
(bit flips, interesting bytes, truncation, duplication, splicing).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from PIL import Image

from rollwire.engines.types import Completion, GenerateRequest, SamplingParams
from rollwire.engines.vllm import parse_choices
from rollwire.engines.wire import decode_image_kwargs, encode_image_kwargs, features_payload, generate_body
from rollwire.errors import RollwireError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.render.types import ImageRef
from rollwire.rollout.types import AssistantRecord, Step, Trajectory
from rollwire.transport.codec import decode, encode
from rollwire.transport.packing import MAGIC, PackedBatch, pack, unpack

GENERATE = "/inference/v1/generate"
_FRAME = struct.Struct("<4sBIQ")  # packing's frame: magic, version, crc32(body), len(body)


class Finding(AssertionError):
    """A decoder broke the property: an untyped exception or an invalid value."""


def frame(body: bytes) -> bytes:
    """A packed-batch frame around `body` with a correct checksum (so mutations reach the decoder)."""
    return _FRAME.pack(MAGIC, 1, zlib.crc32(body), len(body)) + body


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def trajectory(store: FeatureStore, traj_id: str = "t0", turns: int = 3) -> Trajectory:
    """A small multi-turn trajectory with one image, built as the rollout loop builds one."""
    feats = store.get_or_process(image(56, 56, seed=len(traj_id)))
    prompt = [1, 2, 3, *([9] * feats.num_tokens), 4]
    refs = (ImageRef(feats.id, 3, feats.num_tokens, feats.grid_thw),)
    steps = []
    for k in range(turns):
        completion = [10 + k, 11, 12]
        steps.append(Step(prompt_ids=list(prompt), images=refs, completion_ids=completion,
                          completion_logprobs=[-0.5, -0.25, -1.0], finish_reason="stop", stop_reason=12,
                          status="stop", message=AssistantRecord(content=f"turn {k}"), bridged=k > 0,
                          render_reason=None if k else "first turn", timings={"generate": 0.5}))
        prompt = prompt + completion + [5, 6]
    return Trajectory(id=traj_id, env="maze", prompt_index=0, sample_index=0, seed=1, steps=steps,
                      rewards=[0.0] * turns, reward=1.0, messages=[{"role": "user", "content": "hi"}],
                      env_info={"size": [3, 3]}, metrics={"turns": float(turns)}, finish="max_turns")


@dataclass
class Context:
    """What targets need, built on first use; `close()` stops the server if one was started."""

    model_dir: Path | None = None  # a tiny vision model directory, for the server target
    _server: Any = field(default=None, repr=False)
    _seeds: dict[str, list[bytes]] = field(default_factory=dict, repr=False)

    def seeds(self, name: str) -> list[bytes]:
        """The target's seeds, built once."""
        if name not in self._seeds:
            self._seeds[name] = TARGETS[name].seeds(self)
        return self._seeds[name]

    @cached_property
    def store(self) -> FeatureStore:
        return FeatureStore(VisionConfig.qwen2_vl())

    @cached_property
    def meta_host(self) -> list[Any]:
        return _meta_host(self)

    def server(self) -> Any:
        if self._server is None:
            from rollwire.engines.server import EngineServer

            if self.model_dir is None:
                raise RuntimeError("the server target needs a tiny model directory")
            self._server = EngineServer(self.model_dir, served_model_name="tiny", max_model_len=512).start()
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# --- the targets ------------------------------------------------------------------------------


def _codec_any(data: bytes, ctx: Context) -> None:
    decode(data)


def _codec_trajectory(data: bytes, ctx: Context) -> None:
    if not isinstance(decode(data, Trajectory), Trajectory):
        raise Finding("decode(..., Trajectory) returned something else")


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, PackedBatch) or not all(isinstance(t, Trajectory) for t in batch.trajectories):
        raise Finding("unpack returned something that is not a batch of trajectories")
    for traj in batch.trajectories:
        for step in traj.steps:
            if not all(type(t) is int for t in (*step.prompt_ids, *step.completion_ids)):
                raise Finding("unpack returned non-int token ids")


def _unpack(data: bytes, ctx: Context) -> None:
    _check_batch(unpack(data))


def _unpack_body(data: bytes, ctx: Context) -> None:
    _check_batch(unpack(frame(data)))


def _meta_host(ctx: Context) -> list[Any]:
    """A real packed body (pixels left out) as its msgpack list, to carry a fuzzed metadata block."""
    store = ctx.store
    body = pack([trajectory(store, "a", 3), trajectory(store, "bb", 2)], store, include_pixels=False)[_FRAME.size:]
    return list(msgspec.msgpack.decode(body))


def _unpack_meta(data: bytes, ctx: Context) -> None:
    host = ctx.meta_host
    body = [*host[:7], len(data), zlib.compress(data, 1)]
    _check_batch(unpack(frame(msgspec.msgpack.encode(body))))


def _unpack_meta_seeds(ctx: Context) -> list[bytes]:
    return [zlib.decompress(ctx.meta_host[8])]


_KWARGS_RESULT_DTYPES = {"uint8", "float32", "float16", "bfloat16", "int64"}


def _kwargs_item(data: bytes, ctx: Context) -> None:
    pixels, grid, dtype = decode_image_kwargs(base64.b64encode(data).decode("ascii"))
    if pixels.ndim != 2 or len(grid) != 3 or min(grid) <= 0 or pixels.shape[0] != grid[0] * grid[1] * grid[2]:
        raise Finding(f"decode_image_kwargs returned pixels {pixels.shape} for grid {grid}")
    if dtype not in _KWARGS_RESULT_DTYPES:
        raise Finding(f"decode_image_kwargs returned dtype {dtype!r}")


def _response(data: bytes, ctx: Context) -> None:
    try:
        payload = msgspec.json.decode(data)  # what the client does first (not JSON: a ServerError there)
    except (msgspec.DecodeError, RecursionError):
        return
    for n, logprobs in ((1, True), (1, False), (2, False)):
        try:
            completions = parse_choices(payload, n=n, logprobs=logprobs)
        except RollwireError:
            continue
        for c in completions:
            if not (isinstance(c, Completion) and all(type(t) is int and t >= 0 for t in c.token_ids)):
                raise Finding(f"parse_choices returned {c!r:.200}")
            if c.finish_reason not in ("stop", "length", "abort", "error"):
                raise Finding(f"parse_choices returned finish_reason {c.finish_reason!r}")
            if c.logprobs is not None and (len(c.logprobs) != len(c.token_ids)
                                           or not all(type(v) is float for v in c.logprobs)):
                raise Finding(f"parse_choices returned logprobs {c.logprobs!r:.200}")


class _Unexpected(logging.Handler):
    """Catches the server's 'unexpected error' log record: an untyped exception inside a handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _server_request(data: bytes, ctx: Context) -> None:
    server = ctx.server()
    handler = _Unexpected()
    log = logging.getLogger("rollwire.server")
    log.addHandler(handler)
    try:
        status, _ = server.handle("POST", GENERATE, data)
    finally:
        log.removeHandler(handler)
    if handler.records:
        exc = handler.records[0].exc_info
        raise Finding(f"the server hit an untyped {exc[0].__name__ if exc and exc[0] else 'error'}: "
                      f"{exc[1] if exc else handler.records[0].getMessage()}")
    if status not in (200, 400, 404, 500):
        raise Finding(f"the server answered {status}")


# --- seeds ------------------------------------------------------------------------------------


def _codec_seeds(ctx: Context) -> list[bytes]:
    traj = trajectory(ctx.store)
    return [encode(traj), encode([traj, traj]),
            encode({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, "x", b"y", 1.5, None, True]}),
            encode({"ids": np.arange(5, dtype=np.int64), "nested": [[[{"k": -1}]]]})]


def _unpack_seeds(ctx: Context) -> list[bytes]:
    store = ctx.store
    t0, t1 = trajectory(store, "a", 3), trajectory(store, "bb", 2)
    return [pack([t0], store), pack([t0, t1], store, include_pixels=False), pack([], store)]


def _unpack_body_seeds(ctx: Context) -> list[bytes]:
    return [s[_FRAME.size:] for s in _unpack_seeds(ctx)]


def _kwargs_seeds(ctx: Context) -> list[bytes]:
    store = ctx.store
    feats = store.get_or_process(image(56, 84, seed=3))
    return [base64.b64decode(encode_image_kwargs(feats, store, fmt)) for fmt in ("uint8", "float32", "bfloat16")]


def _response_seeds(ctx: Context) -> list[bytes]:
    lp = {"content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 7, "logprob": -1.25}]}
    old = {"content": [{"token": "token_id:5", "logprob": -9999.0}, {"token": "token_id:7", "logprob": -0.1}]}
    return [json.dumps(p).encode() for p in (
        {"choices": [{"index": 0, "token_ids": [5, 7], "finish_reason": "stop", "stop_reason": 7, "logprobs": lp}]},
        {"choices": [{"index": 1, "token_ids": [5, 7], "finish_reason": "length", "logprobs": old},
                     {"index": 0, "token_ids": [], "finish_reason": None, "stop_reason": "x", "logprobs": None}]},
        {"request_id": "r", "choices": [{"token_ids": [1], "finish_reason": "abort"}], "usage": {}},
    )]


def _server_seeds(ctx: Context) -> list[bytes]:
    store = ctx.store
    feats = store.get_or_process(image(56, 56, seed=5))
    sampling = SamplingParams(max_tokens=2, temperature=0.0, stop_token_ids=(3,), banned_token_ids=(9,))
    text = GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=sampling, request_id="r1")
    ref = ImageRef(feats.id, 2, feats.num_tokens, feats.grid_thw)
    prompt = [1, 151652, *([151655] * feats.num_tokens), 151653, 4]
    with_image = GenerateRequest(prompt_token_ids=prompt, images=(ref,), sampling=sampling)
    features, _ = features_payload(with_image.images, store, pixel_format="uint8")
    return [generate_body(text, model="tiny", features=None),
            generate_body(with_image, model="tiny", features=features)]


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes, Context], None]
    seeds: Callable[[Context], list[bytes]]
    kind: str = "bytes"  # how `mutate` may edit the input: "msgpack" and "json" also edit the decoded value
    needs_model: bool = False


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("codec_any", _codec_any, _codec_seeds, "msgpack"),
    Target("codec_trajectory", _codec_trajectory, _codec_seeds, "msgpack"),
    Target("unpack", _unpack, _unpack_seeds),
    Target("unpack_body", _unpack_body, _unpack_body_seeds, "msgpack"),
    Target("unpack_meta", _unpack_meta, _unpack_meta_seeds, "msgpack"),
    Target("kwargs_item", _kwargs_item, _kwargs_seeds, "msgpack"),
    Target("response", _response, _response_seeds, "json"),
    Target("server_request", _server_request, _server_seeds, "json", needs_model=True),
)}


def check(target: Target, data: bytes, ctx: Context) -> None:
    """Run `target` on `data`; raises `Finding` unless it returned a valid value or a RollwireError."""
    try:
        target.run(data, ctx)
    except Finding:
        raise
    except RollwireError:
        return
    except Exception as exc:  # the property: nothing but rollwire's typed errors (MemoryError included)
        raise Finding(f"{target.name}: untyped {type(exc).__name__}: {exc!s:.300}") from exc


# --- mutation ---------------------------------------------------------------------------------

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC9, 0xD4, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x91, 0x81)
_NESTERS = (b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xd9\x00")


def _mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """One to four byte edits: bit flips, interesting bytes, truncation, duplication, deletion,
    insertion, splicing with another seed, a plausible length field, deep nesting."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(buf)
        pos = rng.randrange(n) if n else 0
        if op == 0 and n:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[pos] = rng.choice(_INTERESTING)
        elif op == 2:
            del buf[rng.randrange(n + 1):]
        elif op == 3 and n:
            end = min(n, pos + rng.randint(1, 64))
            buf[pos:pos] = buf[pos:end] * rng.randint(1, 32)
        elif op == 4 and n:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 5:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 6 and others:
            other = rng.choice(others)
            buf = buf[:pos] + bytearray(other[rng.randrange(len(other) + 1):])
        elif op == 7 and n >= 4:
            value = rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 2**16, rng.randrange(2**32)))
            buf[pos:pos + 4] = value.to_bytes(4, "big")
        elif op == 8:
            buf[pos:pos] = rng.choice(_NESTERS) * rng.randint(100, 3000)
    return bytes(buf)


def _hostile(rng: random.Random, json_only: bool) -> Any:
    """A value a decoder must not trust: wrong type, out of range, deep, huge declared size."""
    depth = rng.randint(200, 3000)
    values: list[Any] = [
        None, True, False, -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 1.5, -1e308, 1e308, "", "x", "token_id:9",
        "\ud7ff\u0000", [], {}, [[[]]], {"a": [1]}, [-1, 2**40], ["uint8", [1, 2], None], {"data": 1},
        msgspec.Raw(b"[" * depth + b"]" * depth) if json_only else msgspec.Raw(b"\x91" * depth + b"\xc0"),
    ]
    if not json_only:
        header = bytes((1, 5)) + b"uint8" + bytes((2,)) + struct.pack("<QQ", rng.choice((0, 1, 2**40)), 2**47)
        values += [b"\x00" * rng.randint(0, 9), float("nan"), float("inf"),
                   msgspec.msgpack.Ext(rng.choice((1, 2, 3, 4, -1, 127)), header + rng.randbytes(rng.randint(0, 4))),
                   msgspec.msgpack.Ext(3, b""), msgspec.Raw(b"\xdd\xff\xff\xff\xff"),
                   msgspec.Raw(b"\xc9\x7f\xff\xff\xff\x01")]
    return rng.choice(values)


def _nodes(obj: Any, path: tuple[Any, ...], out: list[tuple[Any, ...]]) -> None:
    out.append(path)
    if isinstance(obj, dict):
        for key, value in obj.items():
            _nodes(value, (*path, key), out)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _nodes(value, (*path, i), out)


def _mutate_tree(obj: Any, rng: random.Random, json_only: bool) -> Any:
    """Replace, drop, duplicate or retype one node of a decoded payload."""
    paths: list[tuple[Any, ...]] = []
    _nodes(obj, (), paths)
    path = rng.choice(paths)
    if not path:
        return _hostile(rng, json_only)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.randrange(5)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, list):
        parent[key:key] = [parent[key]] * rng.randint(1, 8)
    elif op == 2 and isinstance(parent, list):
        del parent[key:]
    elif op == 3 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = rng.choice((-parent[key], parent[key] + 1, parent[key] * 1000, -1, 2**31 - 1))
    else:
        parent[key] = _hostile(rng, json_only)
    return obj


def mutate(data: bytes, rng: random.Random, others: list[bytes], kind: str = "bytes") -> bytes:
    """A hostile variant of `data`: byte edits, or for "msgpack"/"json" payloads, half the time an
    edit of the decoded value (re-encoded, so it reaches past the parser into the checks)."""
    if kind in ("msgpack", "json") and rng.random() < 0.5:
        try:
            if kind == "json":
                obj = msgspec.json.decode(data)
                for _ in range(rng.randint(1, 3)):
                    obj = _mutate_tree(obj, rng, json_only=True)
                return msgspec.json.encode(obj)
            obj = msgspec.msgpack.decode(data)
            for _ in range(rng.randint(1, 3)):
                obj = _mutate_tree(obj, rng, json_only=False)
            return msgspec.msgpack.encode(obj)
        except (msgspec.DecodeError, RecursionError, TypeError, ValueError, OverflowError):
            pass  # a seed that is already mangled: fall back to byte edits
    return _mutate_bytes(data, rng, others)
