"""Transport: the msgpack codec (zero-copy arrays, no pickle) and packed batches (unique images once)."""

from __future__ import annotations

import copy
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import FIGURES, make_image
from rollwire.errors import CodecError, RollwireError, UnknownImageError
from rollwire.features import FeatureStore, ImageFeatures, VisionConfig
from rollwire.render.types import ImageRef
from rollwire.rollout.types import AssistantRecord, RolloutError, Step, ToolCallRecord, Trajectory
from rollwire.transport.codec import (
    ALLOWED_DTYPES,
    EXT_NDARRAY,
    EXT_TENSOR,
    Codec,
    codec_for,
    decode,
    encode,
)
from rollwire.transport.packing import FORMAT_VERSION, MAGIC, PackedBatch, pack, unpack

NUMPY_DTYPES = [d for d in ALLOWED_DTYPES if d != "bfloat16"]  # numpy bfloat16 needs ml_dtypes


def _ext_payload(dtype: str, shape: tuple[int, ...], raw: bytes, *, version: int = 1) -> bytes:
    name = dtype.encode()
    return bytes((version, len(name))) + name + bytes((len(shape),)) + b"".join(
        struct.pack("<Q", d) for d in shape) + raw


def _crafted(payload: bytes, code: int = EXT_NDARRAY) -> bytes:
    return msgspec.msgpack.encode({"x": msgspec.msgpack.Ext(code, payload)})


# --- codec: arrays --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip_is_zero_copy(dtype: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    data = encode({"a": arr, "n": 1})
    out = decode(data)["a"]
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))  # a view of the input
    assert not out.flags.writeable  # bytes are immutable, so is the view


def test_numpy_layouts_and_edge_shapes() -> None:
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    cases = [base[::2, 1::3], base.T, np.asfortranarray(base), np.arange(5, dtype=">i4"),
             np.array(7.5, dtype=np.float32), np.zeros((0, 3), dtype=np.float16), np.ones((2, 0, 4), dtype=bool)]
    for arr in cases:
        out = decode(encode(arr))
        assert out.shape == arr.shape and out.dtype == arr.dtype.newbyteorder("=")
        assert np.array_equal(out, arr)


def test_bytearray_input_gives_writable_views_of_it() -> None:
    buf = bytearray(encode(np.arange(4, dtype=np.int64)))
    out = decode(buf)
    assert out.flags.writeable and np.shares_memory(out, np.frombuffer(buf, dtype=np.uint8))


def test_numpy_scalars_encode_as_numbers() -> None:
    assert decode(encode([np.float32(0.5), np.int64(-3), np.bool_(True)])) == [0.5, -3, True]


@pytest.mark.parametrize("arr", [np.array([object(), 1], dtype=object), np.zeros(3, dtype=np.complex64),
                                 np.zeros(2, dtype=np.uint64), np.zeros(2, dtype="datetime64[s]"),
                                 np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]), np.zeros(2, dtype="S3")])
def test_disallowed_dtypes_are_refused_on_encode(arr: np.ndarray) -> None:
    with pytest.raises(CodecError, match="not allowed"):
        encode({"x": arr})


def test_crafted_extensions_are_rejected() -> None:
    good = _ext_payload("int32", (2, 3), bytes(24))
    assert decode(_crafted(good))["x"].shape == (2, 3)
    bad = {
        "dtype outside the allow-list": _ext_payload("object", (2,), bytes(16)),
        "complex dtype": _ext_payload("complex128", (1,), bytes(16)),
        "length mismatch (short)": _ext_payload("int32", (2, 3), bytes(20)),
        "length mismatch (long)": _ext_payload("int32", (2, 3), bytes(28)),
        "huge shape": _ext_payload("float64", (2**40, 2**40), bytes(8)),
        "implausible dimension with zero size": _ext_payload("uint8", (0, 2**60), b""),
        "too many dimensions": _ext_payload("uint8", (1,) * 40, b"\0"),
        "truncated header": _ext_payload("int32", (2, 3), b"")[:8],
        "unknown format version": _ext_payload("int32", (1,), bytes(4), version=9),
        "empty": b"",
    }
    for what, payload in bad.items():
        with pytest.raises(CodecError):
            decode(_crafted(payload))
        with pytest.raises(CodecError):
            decode(_crafted(payload, EXT_TENSOR))
        assert what


def test_length_is_checked_before_allocating() -> None:
    claims = _ext_payload("float64", (4096, 4096), bytes(8))  # claims 128 MiB, holds 8 bytes
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="needs 134217728 bytes"):
            decode(_crafted(claims))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_unknown_extension_code_is_an_error() -> None:
    for code in (0, 3, 42, -5):
        with pytest.raises(CodecError, match="unknown msgpack extension code"):
            decode(_crafted(_ext_payload("int32", (1,), bytes(4)), code))


def test_malformed_msgpack_and_type_mismatch_are_codec_errors() -> None:
    for data in (b"\xc1", b"\x92\x01", b""):
        with pytest.raises(CodecError):
            decode(data)
    with pytest.raises(CodecError):
        decode(encode({"id": 3}), type=Trajectory)
    assert issubclass(CodecError, RollwireError) and issubclass(CodecError, ValueError)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickle would have run this",))


def test_no_pickle_fallback() -> None:
    for obj in (_Evil(), {"nested": [_Evil()]}, object(), complex(1, 2)):
        with pytest.raises(CodecError, match=r"no pickle|cannot encode"):
            encode(obj)


# --- codec: torch ---------------------------------------------------------------------------


def test_torch_tensors_round_trip() -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(4, 6, generator=gen), torch.randn(3, 5, generator=gen).to(torch.bfloat16),
             torch.arange(-5, 20, dtype=torch.int64).reshape(5, 5), torch.randn(6, 4, generator=gen).t(),
             torch.randn(3, requires_grad=True, generator=gen), torch.zeros(0, 2, dtype=torch.bfloat16)]
    for t in cases:
        out = decode(encode({"t": t}))["t"]
        assert isinstance(out, torch.Tensor) and out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out, t.detach())
    # bfloat16 travels as its raw 16-bit payload: identical bits, not a float32 round trip
    bf = cases[1]
    assert torch.equal(decode(encode(bf)).view(torch.int16), bf.view(torch.int16))
    with pytest.raises(CodecError, match="not allowed"):
        encode(torch.zeros(2, dtype=torch.complex64))


# --- codec: structs -------------------------------------------------------------------------


def _step(k: int = 0) -> Step:
    return Step(prompt_ids=[1, 2, 3, k], images=(ImageRef("ab" * 16, 1, 2, (1, 4, 4)),), completion_ids=[5, 6],
                completion_logprobs=[-0.25, -1.5], finish_reason="stop", stop_reason=6, status="stop",
                message=AssistantRecord(content="hi", tool_calls=(ToolCallRecord(name="f", arguments="{}"),)),
                bridged=k > 0, render_reason=None if k else "first turn", timings={"generate": 0.5})


def _trajectory(steps: list[Step], traj_id: str = "t0") -> Trajectory:
    return Trajectory(id=traj_id, env="maze", prompt_index=3, sample_index=1, seed=7, steps=steps,
                      rewards=[0.0, 1.0], reward=1.0,
                      messages=[{"role": "user", "content": [{"type": "image", "image_id": "ab" * 16}]}],
                      env_info={"size": [3, 3]}, metrics={"turns": 2.0}, finish="max_turns",
                      error=RolloutError(kind="env_error", message="boom", step=1))


def test_structs_round_trip_typed() -> None:
    traj = _trajectory([_step(0), _step(1)])
    assert decode(encode(traj), type=Trajectory) == traj
    assert decode(encode(_step(2)), type=Step) == _step(2)
    assert codec_for(list[Trajectory]).decode(encode([traj, traj])) == [traj, traj]
    typed: Codec[Step] = Codec(Step)
    assert typed.decode(typed.encode(_step(1))) == _step(1)
    as_any = decode(encode(traj))  # untyped: plain msgpack values, never an object guessed from the bytes
    assert isinstance(as_any, dict) and as_any["id"] == "t0"


# --- packing: realistic rollouts ------------------------------------------------------------

IM_START, IM_END, NL, USER, ASSISTANT, SYSTEM_ROLE = 151644, 151645, 198, 872, 77091, 8948
VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655


def _text(rng: np.random.Generator, n: int | np.integer[Any]) -> list[int]:
    return rng.integers(0, 151_000, int(n)).tolist()


@dataclass
class Rollouts:
    """Trajectories built turn by turn, with what the floor counts: each step's new prompt tokens."""

    store: FeatureStore
    rng: np.random.Generator
    trajectories: list[Trajectory] = field(default_factory=list)
    deltas: dict[tuple[str, int], int] = field(default_factory=dict)

    def image(self) -> ImageFeatures:
        w, h = (int(x) for x in self.rng.integers(56, 113, 2))
        return self.store.get_or_process(make_image(w, h, seed=int(self.rng.integers(1 << 30))))

    def floor(self, trajectories: list[Trajectory] | None = None) -> int:
        trajs = self.trajectories if trajectories is None else trajectories
        tokens = sum(self.deltas[(t.id, k)] + len(s.completion_ids) for t in trajs for k, s in enumerate(t.steps))
        logprobs = sum(len(s.completion_logprobs or ()) for t in trajs for s in t.steps)
        unique = {ref.id for t in trajs for s in t.steps for ref in s.images}
        return 4 * tokens + 4 * logprobs + sum(self.store.get(i).nbytes for i in unique)


def _user_block(rng: np.random.Generator, images: list[ImageFeatures], at: int,
                lead: list[int]) -> tuple[list[int], list[ImageRef]]:
    """`lead` + a user message (text, images, text) + the assistant generation prompt."""
    toks = [*lead, IM_START, USER, NL, *_text(rng, rng.integers(10, 60))]
    refs = []
    for feats in images:
        toks.append(VISION_START)
        refs.append(ImageRef(feats.id, at + len(toks), feats.num_tokens, feats.grid_thw))
        toks += [IMAGE_PAD] * feats.num_tokens + [VISION_END]
    toks += [*_text(rng, rng.integers(5, 40)), IM_END, NL, IM_START, ASSISTANT, NL]
    return toks, refs


class History:
    """One conversation: its current prompt and refs; `step` samples, `extend` adds a turn."""

    def __init__(self, r: Rollouts, traj_id: str, images: list[ImageFeatures], *, branch: int = 0,
                 system: list[int] | None = None) -> None:
        self.r, self.traj_id, self.branch = r, traj_id, branch
        self.system = system if system is not None else [IM_START, SYSTEM_ROLE, NL, *_text(r.rng, 24), IM_END, NL]
        block, refs = _user_block(r.rng, images, len(self.system), [])
        self.prompt, self.refs, self.bridged = self.system + block, refs, False
        self.delta = len(self.prompt)
        self.last: Step | None = None

    def step(self, steps: list[Step]) -> Step:
        rng = self.r.rng
        n = int(rng.integers(30, 160))
        completion = [*_text(rng, n - 1), IM_END]
        logprobs = (-np.abs(rng.standard_normal(n)) * 2).astype(np.float32).tolist()  # engines give float32
        step = Step(prompt_ids=list(self.prompt), images=tuple(self.refs), completion_ids=completion,
                    completion_logprobs=logprobs, finish_reason="stop", stop_reason=IM_END, status="stop",
                    message=AssistantRecord(content=f"turn {len(steps)}"), bridged=self.bridged,
                    render_reason=None if self.bridged else "first turn", branch=self.branch,
                    timings={"generate": 0.25})
        self.r.deltas[(self.traj_id, len(steps))] = self.delta
        steps.append(step)
        self.last = step
        return step

    def extend(self, images: list[ImageFeatures]) -> None:
        assert self.last is not None
        base = [*self.prompt, *self.last.completion_ids]
        block, refs = _user_block(self.r.rng, images, len(base), [NL])
        self.prompt, self.refs, self.delta, self.bridged = base + block, [*self.refs, *refs], len(block), True


def _traj(traj_id: str, steps: list[Step], sample: int = 0) -> Trajectory:
    return Trajectory(id=traj_id, env="visual-maze", prompt_index=0, sample_index=sample, seed=sample,
                      steps=steps, rewards=[0.0] * len(steps), reward=1.0, finish="max_turns")


@pytest.fixture(scope="module")
def store() -> FeatureStore:
    return FeatureStore(VisionConfig.qwen2_vl())


def linear(r: Rollouts, turns: int = 32) -> Rollouts:
    steps: list[Step] = []
    h = History(r, "linear", [r.image()])
    for turn in range(turns):
        h.step(steps)
        if turn < turns - 1:
            h.extend([r.image()])
    r.trajectories.append(_traj("linear", steps))
    return r


def compacting(r: Rollouts, turns: int = 16, compact_at: int = 8) -> Rollouts:
    steps: list[Step] = []
    h = History(r, "compact", [r.image()])
    last_image = None
    for turn in range(turns):
        h.step(steps)
        if turn == compact_at - 1:  # history rewritten to a summary that re-shows the last image
            assert last_image is not None
            h = History(r, "compact", [last_image, r.image()], branch=1, system=h.system)
        elif turn < turns - 1:
            last_image = r.image()
            h.extend([last_image])
    r.trajectories.append(_traj("compact", steps))
    return r


def interleaved(r: Rollouts, turns: int = 16) -> Rollouts:
    steps: list[Step] = []
    a = History(r, "agents", [r.image()])
    b = History(r, "agents", [r.image()], system=a.system)
    for turn in range(turns):
        for h in (a, b):
            h.step(steps)
        if turn < turns - 1:
            for h in (a, b):
                h.extend([r.image()])
    r.trajectories.append(_traj("agents", steps))
    return r


def grpo(r: Rollouts, group: int = 16, turns: int = 3) -> Rollouts:
    first = History(r, "grpo-0", [r.image()])
    for i in range(group):
        h = copy.copy(first)
        h.traj_id = f"grpo-{i}"
        steps: list[Step] = []
        for turn in range(turns):
            h.step(steps)
            if turn < turns - 1:
                h.extend([])  # text-only tool results
        r.trajectories.append(_traj(f"grpo-{i}", steps, sample=i))
    return r


SHAPES: dict[str, Callable[[Rollouts], Rollouts]] = {
    "linear-32": linear, "compaction": compacting, "interleaved-AB": interleaved, "grpo-16x3": grpo}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_pack_round_trip_and_byte_floor(shape: str, store: FeatureStore) -> None:
    r = SHAPES[shape](Rollouts(store, np.random.default_rng(len(shape))))
    before = [encode(t) for t in r.trajectories]
    data = pack(r.trajectories, store)
    assert [encode(t) for t in r.trajectories] == before  # inputs untouched

    batch = unpack(data)
    assert batch.trajectories == r.trajectories
    for got, want in zip(batch.trajectories, r.trajectories, strict=True):
        for gs, ws in zip(got.steps, want.steps, strict=True):
            assert gs.prompt_ids == ws.prompt_ids and gs.images == ws.images
            assert gs.completion_logprobs == ws.completion_logprobs  # float32 values: exact
    unique = {ref.id for t in r.trajectories for s in t.steps for ref in s.images}
    assert set(batch.images) == unique == set(batch.image_ids)
    for image_id, feats in batch.images.items():
        assert feats == store.get(image_id) and not feats.pixel_values.flags.writeable
        assert np.shares_memory(feats.pixel_values, np.frombuffer(data, dtype=np.uint8))

    floor = r.floor()
    ratio = len(data) / floor
    FIGURES[f"transport pack {shape}: bytes/floor"] = f"{ratio:.4f} ({len(data)} / {floor} B)"
    print(f"{shape}: {len(data)} bytes, floor {floor}, ratio {ratio:.4f}")
    assert floor <= len(data) <= 1.05 * floor


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prompts_are_delta_encoded_against_the_right_base(shape: str, store: FeatureStore) -> None:
    """Without pixels the batch is its token floor plus a little: every step found its base
    (the last step of its own history; none after compaction). Whole prompts would cost far more."""
    r = SHAPES[shape](Rollouts(store, np.random.default_rng(1)))
    unique = {ref.id for t in r.trajectories for s in t.steps for ref in s.images}
    token_floor = r.floor() - sum(store.get(i).nbytes for i in unique)
    whole_prompts = 4 * sum(len(s.prompt_ids) + 2 * len(s.completion_ids) for t in r.trajectories for s in t.steps)
    small = pack(r.trajectories, store, include_pixels=False)
    assert unpack(small).trajectories == r.trajectories
    assert len(small) <= 1.10 * token_floor < whole_prompts / 1.5


def test_grpo_group_costs_one_image(store: FeatureStore) -> None:
    r = grpo(Rollouts(store, np.random.default_rng(5)))
    group = r.trajectories
    (image_id,) = {ref.id for t in group for s in t.steps for ref in s.images}
    image_bytes = store.get(image_id).nbytes
    single = len(pack(group[:1], store))
    # each further trajectory adds its own tokens and logprobs (4 bytes each), not the image again
    expected = single + sum(r.floor([t]) - image_bytes for t in group[1:])
    got = len(pack(group, store))
    print(f"grpo: {got} bytes, expected {expected}, naive (image per trajectory) {single * len(group)}")
    assert got < 1.2 * expected
    assert abs(got - expected) < 0.05 * expected
    assert got < single * len(group) / 3


def test_duplicate_trajectory_adds_no_image_bytes(store: FeatureStore) -> None:
    r = linear(Rollouts(store, np.random.default_rng(2)), turns=6)
    traj = r.trajectories[0]
    image_bytes = sum(store.get(i).nbytes for i in traj.image_ids)
    one, two = len(pack([traj], store)), len(pack([traj, traj], store))
    assert two - one <= 1.05 * (r.floor() - image_bytes)  # the copy's tokens and logprobs, no pixels
    batch = unpack(pack([traj, traj], store))
    assert batch.trajectories == [traj, traj] and len(batch.images) == 6


def test_exact_values_that_need_wide_arrays(store: FeatureStore) -> None:
    steps = [_step(0), _step(1)]
    steps[1] = msgspec.structs.replace(steps[1], prompt_ids=[*steps[0].prompt_ids, *steps[0].completion_ids, 2**40],
                                       completion_logprobs=[0.1, -1 / 3], completion_ids=[7, -2])
    edge = msgspec.structs.replace(_step(2), completion_ids=[], completion_logprobs=None, prompt_ids=[])
    traj = _trajectory([*steps, edge])
    batch = unpack(pack([traj], store, include_pixels=False))
    assert batch.trajectories == [traj] and batch.images == {}
    assert list(batch.trajectories[0].steps[1].completion_logprobs) == [0.1, -1 / 3]  # float64 kept when needed


def test_images_not_followed_by_base_are_stored_whole(store: FeatureStore) -> None:
    a, b = ImageRef("aa" * 16, 1, 2, (1, 4, 4)), ImageRef("bb" * 16, 9, 2, (1, 4, 4))
    s0 = msgspec.structs.replace(_step(0), prompt_ids=list(range(12)), images=(a, b))
    s1 = msgspec.structs.replace(_step(1), prompt_ids=[*range(12), 5, 6, 99], images=(b,))  # extends, drops a
    traj = _trajectory([s0, s1])
    assert unpack(pack([traj], store, include_pixels=False)).trajectories == [traj]


def test_store_into_copies_and_counts(store: FeatureStore) -> None:
    r = linear(Rollouts(store, np.random.default_rng(3)), turns=3)
    data = pack(r.trajectories, store)
    batch = unpack(data)
    fresh = FeatureStore(VisionConfig.qwen2_vl())
    assert batch.store_into(fresh) == 3 and batch.store_into(fresh) == 0
    for image_id, feats in batch.images.items():
        stored = fresh.get(image_id)
        assert stored == feats and not np.shares_memory(stored.pixel_values, np.frombuffer(data, dtype=np.uint8))


def test_missing_image_is_a_typed_error(store: FeatureStore) -> None:
    with pytest.raises(UnknownImageError):
        pack([_trajectory([_step(0)])], store)


def test_bad_inputs_are_refused(store: FeatureStore) -> None:
    with pytest.raises(CodecError):
        pack([msgspec.structs.replace(_trajectory([_step(0)]), steps=[
            msgspec.structs.replace(_step(0), prompt_ids=[1.5, 2.0])])], store, include_pixels=False)
    with pytest.raises(CodecError):
        pack([{"id": "x"}], store)  # type: ignore[list-item]


# --- packing: corruption --------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(store: FeatureStore) -> tuple[bytes, list[Trajectory]]:
    r = interleaved(Rollouts(store, np.random.default_rng(4)), turns=3)
    return pack(r.trajectories, store), r.trajectories


def test_truncated_buffers_are_codec_errors(packed: tuple[bytes, list[Trajectory]]) -> None:
    data, _ = packed
    for cut in (0, 3, 16, 17, 18, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            unpack(data[:cut])
    with pytest.raises(CodecError):
        unpack(data + b"\0")


def test_corrupted_bytes_are_codec_errors(packed: tuple[bytes, list[Trajectory]]) -> None:
    data, _ = packed
    rng = np.random.default_rng(0)
    for pos in [0, 4, 5, 9, 17, *rng.integers(17, len(data), 40).tolist()]:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CodecError):
            unpack(bytes(bad))


def _reframe(body: Any) -> bytes:
    raw = encode(body)
    return struct.pack("<4sBIQ", MAGIC, FORMAT_VERSION, zlib.crc32(raw), len(raw)) + raw


# body: [version, step_fields, trajectory_fields, image_ids, pixels, tokens, logprobs, meta_size, meta];
# meta (zlib msgpack): [trajectories, heads, rests]; head: [base, refs_extend, new, completion, logprobs, refs]
BODY_CASES: dict[str, Any] = {
    "tokens missing": lambda b, m: b.__setitem__(5, b[5][:-3]),
    "extra tokens": lambda b, m: b.__setitem__(5, np.concatenate([b[5], b[5][:2]])),
    "float tokens": lambda b, m: b.__setitem__(5, b[5].astype(np.float32)),
    "2-D logprobs": lambda b, m: b.__setitem__(6, b[6].reshape(1, -1)),
    "pixels of the wrong dtype": lambda b, m: b[4][0].__setitem__(0, b[4][0][0].astype(np.int16)),
    "pixels not matching the grid": lambda b, m: b[4][0].__setitem__(0, b[4][0][0][:-1]),
    "other Step fields": lambda b, m: b[1].append("extra"),
    "unknown version": lambda b, m: b.__setitem__(0, 99),
    "duplicate image id": lambda b, m: b[3].__setitem__(1, b[3][0]),
    "fewer pixel arrays": lambda b, m: b[4].pop(),
    "base in the future": lambda b, m: m[1][0][0].__setitem__(0, 5),
    "extends without base": lambda b, m: (m[1][0][0].__setitem__(0, -1), m[1][0][0].__setitem__(1, True)),
    "image index out of range": lambda b, m: m[1][0][0][5][0].__setitem__(0, 999),
    "negative image index": lambda b, m: m[1][0][0][5][0].__setitem__(0, -1),
    "negative count": lambda b, m: m[1][0][1].__setitem__(3, -1),
    "bad step field value": lambda b, m: m[2][0][0].__setitem__(2, "sleeping"),
    "missing trajectory fields": lambda b, m: m[0][0].pop(),
    "a trajectory without heads": lambda b, m: m[1].pop(),
}


@pytest.mark.parametrize("case", list(BODY_CASES))
def test_well_framed_but_inconsistent_bodies_are_codec_errors(case: str,
                                                              packed: tuple[bytes, list[Trajectory]]) -> None:
    data, trajectories = packed

    def rebuilt(fn: Any = None) -> bytes:
        body = [np.array(x) if isinstance(x, np.ndarray) else x for x in decode(data[17:])]
        meta = decode(zlib.decompress(bytes(body[8])))
        if fn is not None:
            fn(body, meta)
        raw = encode(meta)
        body[7], body[8] = len(raw), zlib.compress(raw)
        return _reframe(body)

    assert unpack(rebuilt()).trajectories == trajectories  # the re-framing itself is sound
    with pytest.raises(CodecError):
        unpack(rebuilt(BODY_CASES[case]))


def test_bad_metadata_compression_is_a_codec_error(packed: tuple[bytes, list[Trajectory]]) -> None:
    data, _ = packed
    body = decode(data[17:])
    size, meta = body[7], body[8]
    for override in [(size - 1, meta), (size + 1, meta), (size, b"not zlib"), (size, meta[:-4]),
                     (size, meta + b"junk"), (10**12, zlib.compress(bytes(10**6)))]:
        bad = [*body[:7], *override]
        with pytest.raises(CodecError):
            unpack(_reframe(bad))
    with pytest.raises(CodecError, match="declares"):
        unpack(data, max_meta_bytes=body[7] - 1)


def test_packed_batch_type() -> None:
    batch = unpack(pack([], FeatureStore()))
    assert isinstance(batch, PackedBatch) and batch.trajectories == [] and batch.images == {}
