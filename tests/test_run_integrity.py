"""Run integrity under hostile input: environment values that a run directory cannot hold, images
in modes PNG cannot hold, hostile rows, frames and blobs, symlinks and unwritable directories, a
full disk, resume of failed rollouts, the run manifest, and retries against a server that is down.

Every case is real: real rollouts, real files on disk, a real HTTP server on a socket. Faults are
injected at the OS boundary (`os.open`, `os.write` raising the errno the kernel would).
"""

from __future__ import annotations

import asyncio
import errno
import http.server
import json
import math
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, SamplingParams, Timings
from rollwire.engines.vllm import RetryPolicy, VLLMEngine
from rollwire.errors import EngineError, ManifestMismatchError, ServerError, StoreError
from rollwire.images import load_image
from rollwire.messages import Message
from rollwire.render import create_renderer
from rollwire.rollout import EnvStep, Observation, RolloutConfig, RunConfig, register, run_rollout, run_rollouts
from rollwire.rollout.envs.shapes import ShapesEnv
from rollwire.rollout.runner import model_fingerprint, run_manifest
from rollwire.rollout.values import MAX_DEPTH, honest_value
from rollwire.store import MANIFEST, ROWS, RunReader, RunWriter, archive_image
from rollwire.training import SampleBuilder


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


class Answer:
    """An engine that answers every turn "2" (a real completion: the renderer's tokens + im_end)."""

    def __init__(self, renderer: Any) -> None:
        self.ids = [*renderer.tokenizer.encode_ids("2"), renderer.im_end_id]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return GenerateResult(completions=[Completion(token_ids=list(self.ids), logprobs=[-0.5] * len(self.ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


# --- values crossing the environment boundary ------------------------------------------------


class HostileEnv:
    """Puts `value` at one place an environment hands values to the rollout."""

    name = "hostile"

    def __init__(self, where: str, value: Any) -> None:
        self.where, self.value = where, value

    async def reset(self, seed: int) -> Observation:
        v, w = self.value, self.where
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": v}}}] if w == "tools" else None
        return Observation(messages=[{"role": "user", "content": v if w == "reset_text" else "hi"}], tools=tools,
                           info={"x": v} if w == "reset_info" else {"ok": 1})

    async def step(self, message: Message) -> EnvStep:
        v, w = self.value, self.where
        if w == "step_info":
            return EnvStep(info={"x": v}, reward=1.0, done=True)
        if w == "step_info_key":
            return EnvStep(info={v: 1}, reward=1.0, done=True)
        if w == "reward":
            return EnvStep(reward=v, done=True)
        if w == "step_text":
            return EnvStep(messages=[{"role": "user", "content": v}], reward=1.0)
        return EnvStep(reward=1.0, done=True)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


BAD_VALUES = {
    "surrogate": "a\ud800b", "path": Path("/etc/passwd"), "object": object(), "int 2**70": 2**70,
    "int -2**70": -(2**70), "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "bytes": b"\x00\xff",
    "set": {1, 2}, "frozenset": frozenset({1}), "ndarray": np.zeros(3), "complex": 1j, "function": print,
    "np.float64 nan": np.float64("nan"), "np.float32 inf": np.float32("inf"), "deep": _nested(MAX_DEPTH + 5),
    "tuple key": {(1, 2): 3}, "int key": {1: 2}, "None key": {None: 1}, "surrogate key": {"\udfff": 1},
    "list of bad": [1, object(), 2],
}
PLACES = ["reset_info", "step_info", "tools"]
BAD_KEYS = {"tuple": (1, 2), "int": 7, "None": None, "surrogate": "\ud800", "frozenset": frozenset()}
BAD_REWARDS = {"str": "1.0", "None": None, "nan": math.nan, "inf": math.inf, "huge int": 10**400,
               "np nan": np.float64("nan"), "list": [1.0], "complex": 1j, "Path": Path("x")}
BAD_TEXT = {"lone high surrogate": "\ud800", "lone low surrogate": "x\udc80y", "surrogate pair halves": "\ud83d"}


def _check_written(result: Any, renderer: Any, run_dir: Path) -> dict[str, Any]:
    """The rollout is written and reads back with its error; nothing crashes on the way."""
    with RunWriter(run_dir, renderer.feature_store) as writer:
        writer.write(result.trajectory, result.originals)
    (row,) = RunReader(run_dir).rows()
    assert RunReader(run_dir).trajectory(row).id == result.trajectory.id
    return row


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", sorted(BAD_VALUES))
async def test_a_bad_env_value_is_a_typed_env_error_and_the_rollout_is_written(
        renderer: Any, tmp_path: Path, place: str, name: str) -> None:
    r = await run_rollout(HostileEnv(place, BAD_VALUES[name]), renderer, Answer(renderer),
                          RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="h")
    t = r.trajectory
    assert t.error is not None and t.error.kind == "env_error" and t.finish == "error"
    field = {"reset_info": "env_info", "step_info": "env_steps[0].info", "tools": "tools"}[place]
    assert "EnvValueError" in t.error.message and field in t.error.message
    row = _check_written(r, renderer, tmp_path)
    assert row["error"]["kind"] == "env_error"
    if place == "step_info":
        assert row["rewards"] == [1.0] and len(row["metrics"]) > 0  # what was done is kept


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
async def test_a_bad_info_key_is_dropped_and_named(renderer: Any, tmp_path: Path, name: str) -> None:
    r = await run_rollout(HostileEnv("step_info_key", BAD_KEYS[name]), renderer, Answer(renderer),
                          RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="k")
    assert r.trajectory.error is not None and "env_steps[0].info" in r.trajectory.error.message
    row = _check_written(r, renderer, tmp_path)
    assert row["error"]["kind"] == "env_error"


@pytest.mark.parametrize("name", sorted(BAD_REWARDS))
async def test_a_bad_reward_is_a_typed_env_error(renderer: Any, tmp_path: Path, name: str) -> None:
    r = await run_rollout(HostileEnv("reward", BAD_REWARDS[name]), renderer, Answer(renderer),
                          RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="r")
    t = r.trajectory
    assert t.error is not None and t.error.kind == "env_error" and "rewards[0]" in t.error.message
    assert t.rewards == [] and len(t.steps) == 1
    assert _check_written(r, renderer, tmp_path)["reward"] == 0.0


@pytest.mark.parametrize("place", ["reset_text", "step_text"])
@pytest.mark.parametrize("name", sorted(BAD_TEXT))
async def test_message_text_that_is_not_utf8_is_a_typed_env_error(
        renderer: Any, tmp_path: Path, place: str, name: str) -> None:
    r = await run_rollout(HostileEnv(place, BAD_TEXT[name]), renderer, Answer(renderer),
                          RolloutConfig(max_turns=3, max_tokens=4), seed=0, trajectory_id="s")
    t = r.trajectory
    assert t.error is not None and t.error.kind == "env_error" and "messages[" in t.error.message
    row = _check_written(r, renderer, tmp_path)
    assert row["error"]["kind"] == "env_error"
    assert all(isinstance(m, dict) for m in row["messages"])


async def test_numpy_scalars_are_the_numbers_they_equal(renderer: Any, tmp_path: Path) -> None:
    """A user writing np.mean(...) into info or as a reward means the number: converted, no error."""
    info = {"mean": np.float32(0.5), "n": np.int64(3), "flag": np.bool_(True), "pair": (np.uint8(7), "a")}
    r = await run_rollout(HostileEnv("step_info", info), renderer, Answer(renderer),
                          RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="np")
    assert r.trajectory.error is None
    got = r.trajectory.metadata["env_steps"][0]["x"]
    assert got == {"mean": 0.5, "n": 3, "flag": True, "pair": [7, "a"]}
    assert type(got["mean"]) is float and type(got["n"]) is int and type(got["flag"]) is bool
    r = await run_rollout(HostileEnv("reward", np.float64(0.25)), renderer, Answer(renderer),
                          RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="npr")
    assert r.trajectory.error is None and r.trajectory.rewards == [0.25]
    assert _check_written(r, renderer, tmp_path)["reward"] == 0.25


def test_honest_value_replaces_and_names() -> None:
    clean, problems = honest_value({"t": "a\ud800b", "p": Path("x"), "k": {(1,): 2, "ok": [1, math.inf]}}, "info")
    assert clean == {"t": "a\ufffdb", "p": None, "k": {"ok": [1, None]}}
    assert len(problems) == 4
    assert any(p.startswith("info['t']: ") and "surrogate" in p for p in problems)
    assert any(p.startswith("info['k']['ok'][1]: ") for p in problems)
    json.dumps(clean, allow_nan=False)  # the cleaned value is honest JSON


# --- images archived losslessly ----------------------------------------------------------------


def _image(mode: str) -> Image.Image:
    rng = np.random.default_rng(3)
    if mode == "F":
        return Image.fromarray((rng.normal(size=(9, 11)) * 1e3).astype(np.float32), "F")
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (9, 11), dtype=np.int32), "I")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16))
    if mode == "CMYK":
        return Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8), "CMYK")
    return Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["CMYK", "F", "I", "I;16", "I;16B", "LAB", "YCbCr", "PA", "LA", "P", "RGBA", "L"])
def test_images_are_archived_losslessly(mode: str) -> None:
    image = _image(mode)
    ext, data = archive_image(image)
    back = load_image(data)
    assert back.mode == image.mode and back.size == image.size
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))
    assert ext == ("png" if mode == "P" else "tiff")  # TIFF: a copy, no zlib; palettes as PNG


class ModesEnv:
    """One question about pictures in modes PNG cannot hold."""

    name = "modes"

    async def reset(self, seed: int) -> Observation:
        pictures = [_image("CMYK").resize((56, 56)), _image("F").resize((56, 56))]
        return Observation(messages=[{"role": "user", "content": [
            *({"type": "image", "image": p} for p in pictures), {"type": "text", "text": "how many?"}]}])

    async def step(self, message: Message) -> EnvStep:
        return EnvStep(reward=1.0, done=True)


async def test_cmyk_and_float_images_survive_the_run_directory(renderer: Any, tmp_path: Path) -> None:
    env = ModesEnv()
    r = await run_rollout(env, renderer, Answer(renderer), RolloutConfig(max_turns=1, max_tokens=4), seed=0,
                          trajectory_id="m")
    assert r.trajectory.error is None and len(r.trajectory.image_ids) == 2
    _check_written(r, renderer, tmp_path)
    reader = RunReader(tmp_path)
    for image_id in r.trajectory.image_ids:
        original = r.originals[image_id]
        back = reader.image(image_id)
        assert back.mode == original.mode in ("CMYK", "F")
        np.testing.assert_array_equal(np.asarray(back), np.asarray(original))


# --- the store reader against hostile rows, frames and blobs -----------------------------------


@pytest.fixture(scope="module")
def base_run(renderer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run directory: two shapes rollouts with images."""
    run_dir = tmp_path_factory.mktemp("base")

    async def go() -> None:
        with RunWriter(run_dir, renderer.feature_store) as writer:
            await run_rollouts(RunConfig(env="shapes", n_prompts=2, rollout=RolloutConfig(max_turns=1, max_tokens=4),
                                         env_kwargs={"turns": 1}),
                               renderer, Answer(renderer), progress=False,
                               on_result=lambda r: writer.write(r.trajectory, r.originals))

    asyncio.run(go())
    return run_dir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


HOSTILE_LINES = {
    "a list": b"[1, 2]", "a string": b'"row"', "a number": b"5", "null": b"null", "no id": b'{"no": 1}',
    "int id": b'{"id": 5}', "empty id": b'{"id": ""}', "list id": b'{"id": ["a"]}', "not utf-8": b'{"id": "\xff\xfe"}',
    "broken json": b'{"id": "x"', "deep nesting": b"[" * 100_000 + b"]" * 100_000, "nan": b'{"id": NaN',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_a_hostile_row_is_a_store_error(run_copy: Path, name: str, renderer: Any) -> None:
    rows = run_copy / ROWS
    rows.write_bytes(rows.read_bytes() + HOSTILE_LINES[name] + b"\n")
    with pytest.raises(StoreError, match=r"rollouts.jsonl:3"):
        list(RunReader(run_copy).rows())
    with pytest.raises(StoreError, match=r"rollouts.jsonl:3"):
        RunWriter(run_copy, renderer.feature_store)


def test_a_truncated_last_row_is_refused_by_the_reader_and_repaired_by_the_writer(run_copy: Path,
                                                                                  renderer: Any) -> None:
    rows = run_copy / ROWS
    good = rows.read_bytes()
    rows.write_bytes(good + b'{"id": "half')
    with pytest.raises(StoreError, match="truncated"):
        list(RunReader(run_copy).rows())
    RunWriter(run_copy, renderer.feature_store).close()
    assert rows.read_bytes() == good


HOSTILE_FIELDS: dict[str, dict[str, Any]] = {
    "offset -1": {"offset": -1}, "offset 2**70": {"offset": 2**70}, "offset True": {"offset": True},
    "offset 1.5": {"offset": 1.5}, "offset '0'": {"offset": "0"}, "offset None": {"offset": None},
    "offset past the end": {"offset": 10**9}, "length -1": {"length": -1}, "length 2**64": {"length": 2**64},
    "length False": {"length": False}, "length wrong": {"length": 3}, "shard ../": {"shard": "../rollouts.jsonl"},
    "shard absolute": {"shard": "/etc/passwd"}, "shard traversal": {"shard": "../../../../etc/passwd"},
    "shard int": {"shard": 5}, "shard None": {"shard": None}, "shard missing": {"shard": "shard-00042.bin"},
    "shard name with slash": {"shard": "shard-00000.bin/x"}, "id of another": {"id": "other-id"},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FIELDS))
def test_a_row_pointing_somewhere_hostile_is_a_store_error(run_copy: Path, name: str) -> None:
    reader = RunReader(run_copy)
    row = next(reader.rows()) | HOSTILE_FIELDS[name]
    with pytest.raises(StoreError):
        reader.trajectory(row)


@pytest.mark.parametrize("row", [[1, 2], "row", None, {"shard": "shard-00000.bin"}, {"id": 3}])
def test_a_row_that_is_not_a_row_is_a_store_error(run_copy: Path, row: Any) -> None:
    with pytest.raises(StoreError):
        RunReader(run_copy).trajectory(row)


def test_a_shard_that_is_a_directory_or_a_symlink_is_a_store_error(run_copy: Path, tmp_path: Path) -> None:
    reader = RunReader(run_copy)
    row = next(reader.rows())
    (run_copy / "shards" / "shard-00077.bin").mkdir()
    with pytest.raises(StoreError, match="regular file"):
        reader.trajectory(row | {"shard": "shard-00077.bin"})
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(run_copy / "shards" / row["shard"], outside)
    (run_copy / "shards" / "shard-00078.bin").symlink_to(outside)
    with pytest.raises(StoreError, match="regular file"):
        reader.trajectory(row | {"shard": "shard-00078.bin"})


def _frame(record: bytes, *, magic: bytes = b"RWT1", length: int | None = None, crc: int | None = None) -> bytes:
    return struct.pack("<4sQI", magic, len(record) if length is None else length,
                       zlib.crc32(record) if crc is None else crc) + record


HOSTILE_FRAMES = {
    "bad magic": lambda rec: _frame(rec, magic=b"EVIL"),
    "crc mismatch": lambda rec: _frame(rec, crc=zlib.crc32(rec) ^ 1),
    "length 2**63": lambda rec: _frame(rec, length=2**63),
    "nested msgpack": lambda rec: _frame(b"\x91" * 100_000 + b"\xc0"),
    "random bytes": lambda rec: _frame(bytes(np.random.default_rng(0).integers(0, 256, 519, dtype=np.uint8))),
    "an int": lambda rec: _frame(b"\x05"),
    "empty record": lambda rec: _frame(b""),
    "header only": lambda rec: _frame(rec)[:16],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FRAMES))
def test_a_hostile_shard_frame_is_a_store_error(run_copy: Path, name: str) -> None:
    reader = RunReader(run_copy)
    row = next(reader.rows())
    shard = run_copy / "shards" / row["shard"]
    data = shard.read_bytes()
    record = data[row["offset"] + 16: row["offset"] + 16 + row["length"]]
    evil = HOSTILE_FRAMES[name](record)
    (run_copy / "shards" / "shard-00099.bin").write_bytes(evil)
    length = struct.unpack("<Q", evil[4:12])[0] if len(evil) >= 16 else 0
    with pytest.raises(StoreError):
        reader.trajectory(row | {"shard": "shard-00099.bin", "offset": 0, "length": length})


HOSTILE_BLOBS: dict[str, Callable[[bytes], bytes]] = {
    "bad magic": lambda b: b"XXXX" + b[4:], "crc mismatch": lambda b: b[:8] + bytes([b[8] ^ 1]) + b[9:],
    "empty": lambda b: b"", "nested msgpack": lambda b: b"RWF1" + struct.pack("<I", zlib.crc32(
        b"\x91" * 50_000 + b"\xc0")) + b"\x91" * 50_000 + b"\xc0",
    "truncated": lambda b: b[: len(b) // 2],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BLOBS))
def test_a_hostile_features_blob_is_a_store_error(run_copy: Path, name: str) -> None:
    reader = RunReader(run_copy)
    image_id = next(reader.rows())["image_ids"][0]
    path = run_copy / "blobs" / image_id[:2] / f"{image_id}.features"
    path.write_bytes(HOSTILE_BLOBS[name](path.read_bytes()))
    with pytest.raises(StoreError):
        reader.features(image_id)


@pytest.mark.parametrize("image_id", ["../../etc", "", "ABC", "g" * 10, "a" * 500, 5, None])
def test_a_hostile_image_id_is_a_store_error(run_copy: Path, image_id: Any) -> None:
    with pytest.raises(StoreError):
        RunReader(run_copy).features(image_id)


def test_a_features_blob_that_is_a_directory_is_a_store_error(run_copy: Path) -> None:
    reader = RunReader(run_copy)
    image_id = next(reader.rows())["image_ids"][0]
    path = run_copy / "blobs" / image_id[:2] / f"{image_id}.features"
    path.unlink()
    path.mkdir()
    with pytest.raises(StoreError):
        reader.features(image_id)


# --- the writer: symlinks, unwritable directories, a full disk ---------------------------------


@pytest.mark.parametrize("entry", [ROWS, "shards", ".lock", MANIFEST])
def test_the_writer_refuses_a_symlink_out_of_the_run_directory(renderer: Any, tmp_path: Path, entry: str) -> None:
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    target = outside / "target"
    if entry == "shards":
        target.mkdir()
    else:
        target.write_text("precious\n")
    (run_dir / entry).symlink_to(target)
    with pytest.raises(StoreError, match="symlink"):
        RunWriter(run_dir, renderer.feature_store,
                  manifest=run_manifest(RunConfig(env="shapes")) if entry == MANIFEST else None)
    if entry != "shards":
        assert target.read_text() == "precious\n"  # not truncated, not appended to
    assert [p.name for p in outside.rglob("*")] == ["target"]


@pytest.mark.parametrize("entry", ["blobs", "blobs/xx", "blobs/xx/features", "blobs/xx/png", "blobs/xx/tiff"])
async def test_the_writer_refuses_symlinked_blobs(renderer: Any, tmp_path: Path, entry: str) -> None:
    r = await run_rollout(ShapesEnv(turns=1), renderer, Answer(renderer), RolloutConfig(max_turns=1, max_tokens=4),
                          seed=0, trajectory_id="b")
    image_id = r.trajectory.image_ids[0]
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (run_dir / "blobs" / image_id[:2]).mkdir(parents=True)
    name = {"blobs": "blobs", "blobs/xx": f"blobs/{image_id[:2]}",
            "blobs/xx/features": f"blobs/{image_id[:2]}/{image_id}.features",
            "blobs/xx/png": f"blobs/{image_id[:2]}/{image_id}.png",
            "blobs/xx/tiff": f"blobs/{image_id[:2]}/{image_id}.tiff"}[entry]
    link = run_dir / name
    shutil.rmtree(link) if link.is_dir() else None
    if entry.count("/") < 2:
        link.symlink_to(outside, target_is_directory=True)
    else:
        (outside / "f").write_bytes(b"precious")
        link.symlink_to(outside / "f")
    with RunWriter(run_dir, renderer.feature_store) as writer, pytest.raises(StoreError, match="symlink"):
        writer.write(r.trajectory, r.originals)
    assert sorted(p.name for p in outside.iterdir()) == ([] if entry.count("/") < 2 else ["f"])
    assert not (run_dir / ROWS).read_bytes()  # nothing committed


@pytest.fixture
def deny(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int], None]:
    """Make every open/mkdir under a folder fail with an errno, as a read-only mount or chmod would
    for a non-root user (tests run as root, where chmod does not deny)."""

    def install(root: Path, code: int) -> None:
        real_open, real_mkdir = os.open, os.mkdir

        def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).startswith(str(root)) and not os.path.isdir(path):
                raise OSError(code, os.strerror(code), str(path))
            real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    return install


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                             (errno.EPERM, "permission denied"), (errno.ENOSPC, "disk is full")])
@pytest.mark.parametrize("exists", [True, False])
def test_an_unwritable_run_directory_is_a_store_error(renderer: Any, tmp_path: Path, deny: Any, code: int,
                                                      words: str, exists: bool) -> None:
    run_dir = tmp_path / "run"
    if exists:
        run_dir.mkdir()
    deny(run_dir if exists else tmp_path, code)
    with pytest.raises(StoreError, match=words):
        RunWriter(run_dir, renderer.feature_store)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores chmod (the errno mapping is tested above)")
def test_a_chmod_read_only_run_directory_is_a_store_error(renderer: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(StoreError):
            RunWriter(tmp_path / "run", renderer.feature_store)
    finally:
        tmp_path.chmod(0o755)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], dict[str, Any]]:
    """A disk under `root` that fills up: while `state["full"]`, `os.write` or `os.writev` to any
    file under it writes a few bytes and then raises ENOSPC, as the kernel does."""

    def install(root: Path) -> dict[str, Any]:
        state: dict[str, Any] = {"full": False, "refused": 0}
        real_write, real_writev = os.write, os.writev

        def refuse(fd: int, first: Any) -> int | None:
            """None: write as asked; else the bytes a torn write wrote (or ENOSPC)."""
            if not state["full"]:
                return None
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(str(root)):
                return None
            state["refused"] += 1
            if len(first) > 8 and state["refused"] % 2:  # a torn write first, then nothing
                return real_write(fd, bytes(first[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def fake_write(fd: int, data: Any) -> int:
            torn = refuse(fd, data)
            return real_write(fd, data) if torn is None else torn

        def fake_writev(fd: int, buffers: Any) -> int:
            torn = refuse(fd, memoryview(buffers[0]).cast("B"))
            return real_writev(fd, buffers) if torn is None else torn

        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(os, "writev", fake_writev)
        return state

    return install


async def test_a_full_disk_gives_honest_counts_and_a_clean_resumable_directory(
        renderer: Any, tmp_path: Path, disk: Any) -> None:
    state = disk(tmp_path)
    config = RunConfig(env="shapes", n_prompts=6, concurrency=1, rollout=RolloutConfig(max_turns=1, max_tokens=4),
                       env_kwargs={"turns": 1})
    seen = 0
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        def write(r: Any) -> None:
            nonlocal seen
            seen += 1
            state["full"] = seen in (2, 3, 5)  # the disk fills and frees between rollouts
            writer.write(r.trajectory, r.originals)

        summary = await run_rollouts(config, renderer, Answer(renderer), on_result=write, progress=False)
    state["full"] = False
    assert (summary.done, summary.unwritten, summary.failed) == (3, 3, 0) and not summary.ok
    assert summary.top_errors(1)[0][1] == 3 and "disk is full" in summary.top_errors(1)[0][0]
    rows = list(RunReader(tmp_path).rows())
    assert len(rows) == 3 and all(RunReader(tmp_path).trajectory(r).error is None for r in rows)
    with RunWriter(tmp_path, renderer.feature_store) as writer:  # the disk was freed: resume writes the rest
        summary = await run_rollouts(config, renderer, Answer(renderer), skip_ids=set(writer.done_ids),
                                     on_result=lambda r: writer.write(r.trajectory, r.originals),
                                     progress=False)
    assert (summary.skipped, summary.done, summary.unwritten) == (3, 3, 0)
    reader = RunReader(tmp_path)
    assert sorted(r["prompt_index"] for r in reader.rows()) == list(range(6))
    assert all(t.error is None for t in reader.trajectories())


# --- resume retries failed rollouts; the manifest -----------------------------------------------


class FlakyEnv(ShapesEnv):
    name = "flaky"
    broken = True

    async def reset(self, seed: int) -> Observation:
        self.odd = seed % 2 == 1
        return await super().reset(seed)

    async def step(self, message: Message) -> EnvStep:
        if FlakyEnv.broken and self.odd:
            raise RuntimeError("the tool server is down")
        return await super().step(message)


async def test_resume_retries_failed_rollouts_and_readers_return_the_newest_row(
        renderer: Any, tmp_path: Path) -> None:
    register("flaky", FlakyEnv)
    config = RunConfig(env="flaky", n_prompts=4, rollout=RolloutConfig(max_turns=1, max_tokens=4),
                       env_kwargs={"turns": 1})

    async def run() -> Any:
        with RunWriter(tmp_path, renderer.feature_store) as writer:
            return await run_rollouts(config, renderer, Answer(renderer), skip_ids=set(writer.done_ids),
                                      on_result=lambda r: writer.write(r.trajectory, r.originals),
                                      progress=False)

    FlakyEnv.broken = True
    first = await run()
    assert (first.done, first.failed) == (2, 2)
    FlakyEnv.broken = False
    second = await run()
    assert (second.skipped, second.done, second.failed) == (2, 2, 0)
    reader = RunReader(tmp_path)
    newest = list(reader.rows())
    assert len(newest) == 4 and all(r["error"] is None for r in newest)
    everything = list(reader.rows(all_rows=True))
    assert len(everything) == 6 and sum(r["superseded"] for r in everything) == 2
    assert all(r["error"]["kind"] == "env_error" for r in everything if r["superseded"])
    assert all(t.error is None for t in reader.trajectories())
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        assert len(writer.done_ids) == 4


def test_a_resume_with_other_settings_is_refused_naming_each_difference(
        renderer: Any, tmp_path: Path, tiny: Callable[[str], Path]) -> None:
    model = tiny("qwen2_vl")
    config = RunConfig(env="shapes", rollout=RolloutConfig(temperature=1.0, max_turns=4))
    manifest = run_manifest(config, model_dir=model, family="qwen2_vl", server_url="http://a")
    RunWriter(tmp_path, renderer.feature_store, manifest=manifest).close()
    written = json.loads((tmp_path / MANIFEST).read_text())
    fingerprint = written["settings"]["model"]["fingerprint"]
    assert fingerprint == model_fingerprint(model) and len(fingerprint) == 64
    assert written["about"]["rollwire_version"] and written["settings"]["sampling"]["temperature"] == 1.0
    # same settings (another server URL is not a difference): resumes
    same = run_manifest(config, model_dir=model, family="qwen2_vl", server_url="http://b")
    RunWriter(tmp_path, renderer.feature_store, manifest=same).close()
    other = run_manifest(RunConfig(env="shapes", rollout=RolloutConfig(temperature=0.5, max_turns=2)),
                         model_dir=tiny("qwen2_5_vl"), family="qwen2_5_vl")
    with pytest.raises(ManifestMismatchError) as info:
        RunWriter(tmp_path, renderer.feature_store, manifest=other)
    assert set(info.value.differences) == {"sampling.temperature", "max_turns", "model.fingerprint", "model.family"}
    assert info.value.differences["max_turns"] == (4, 2) and "sampling.temperature" in str(info.value)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(StoreError, match="not a run manifest"):
        RunWriter(tmp_path, renderer.feature_store, manifest=manifest)


async def test_sample_builder_skips_failed_trajectories_unless_asked(renderer: Any) -> None:
    FlakyEnv.broken = True
    r = await run_rollout(FlakyEnv(turns=2), renderer, Answer(renderer), RolloutConfig(max_turns=2, max_tokens=4),
                          seed=1, trajectory_id="f")
    assert r.trajectory.error is not None and len(r.trajectory.steps) == 1
    assert SampleBuilder.for_renderer(renderer).build(r.trajectory) == []
    samples = SampleBuilder.for_renderer(renderer, include_failed=True).build(r.trajectory)
    assert len(samples) == 1 and samples[0].num_loss_tokens == len(r.trajectory.steps[0].completion_ids)


# --- retries against a server that is down, paused or answering garbage -----------------------


GOOD = {"choices": [{"index": 0, "token_ids": [5, 6], "finish_reason": "length", "logprobs": {
    "content": [{"token_id": 5, "logprob": -0.5}, {"token_id": 6, "logprob": -1.5}]}}]}


class _Flaky(http.server.BaseHTTPRequestHandler):
    """vLLM's two endpoints; the generate endpoint first answers `faults` (status, body) pairs."""

    faults: ClassVar[list[tuple[int, bytes]]] = []
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, json.dumps({"data": [{"id": "m", "max_model_len": 1000}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
        self._answer(*(fault or (200, json.dumps(GOOD).encode())))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server() -> Iterator[Callable[..., str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(port: int = 0, after_s: float = 0.0) -> str:
        port = port or _free_port()

        def up() -> None:
            time.sleep(after_s)
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Flaky)
            servers.append(server)
            server.serve_forever(poll_interval=0.05)

        threading.Thread(target=up, daemon=True).start()
        if not after_s:
            deadline = time.monotonic() + 5
            while not servers and time.monotonic() < deadline:
                time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _request() -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=2))


FAST = RetryPolicy(deadline_s=5.0, base_s=0.01, cap_s=0.05)
HTTP_FAULTS = {
    "503 paused": (503, b'{"error": {"message": "Generation is paused"}}'), "429": (429, b"{}"),
    "500": (500, b"{}"), "502": (502, b"bad gateway"), "504": (504, b""),
    "truncated 200": (200, json.dumps(GOOD).encode()[:20]), "200 not json": (200, b"<html>oops</html>"),
    "200 without choices": (200, b'{"choices": 5}'), "200 with bad ids": (200, b'{"choices": [{"token_ids": "x"}]}'),
}


@pytest.mark.parametrize("name", sorted(HTTP_FAULTS))
async def test_transient_faults_and_malformed_200s_are_retried(http_server: Any, name: str) -> None:
    _Flaky.faults = [HTTP_FAULTS[name]] * 3
    async with VLLMEngine(http_server(), feature_store=None, retry=FAST) as engine:
        result = await engine.generate(_request())
    assert result.completions[0].token_ids == [5, 6] and engine.stats.retries == 3


async def test_a_server_down_for_three_seconds_is_survived_with_the_default_deadline(http_server: Any) -> None:
    _Flaky.faults = []
    port = _free_port()
    url = http_server(port=port, after_s=3.0)  # refuses connections for 3 s, then comes up
    start = time.monotonic()
    async with VLLMEngine(url, feature_store=None) as engine:
        assert engine.retry.deadline_s >= 60
        result = await engine.generate(_request())
    assert result.completions[0].token_ids == [5, 6] and time.monotonic() - start >= 2.9


async def test_a_server_down_longer_than_the_deadline_is_a_typed_error(http_server: Any) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens
    start = time.monotonic()
    async with VLLMEngine(url, feature_store=None, retry=RetryPolicy(deadline_s=0.6, base_s=0.05)) as engine:
        with pytest.raises(ServerError, match="gave up") as info:
            await engine.generate(_request())
    assert isinstance(info.value, EngineError) and 0.5 <= time.monotonic() - start < 5
    _Flaky.faults = [(503, b"{}")] * 1000  # up, but paused for longer than the deadline
    async with VLLMEngine(http_server(), feature_store=None,
                          retry=RetryPolicy(deadline_s=0.5, base_s=0.05)) as engine:
        with pytest.raises(ServerError) as info:
            await engine.generate(_request())
    assert info.value.status == 503
    _Flaky.faults = []


async def test_the_runner_reaches_the_engine_before_the_first_rollout(renderer: Any) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    engine = VLLMEngine.for_renderer(url, renderer, retry=RetryPolicy(deadline_s=0.3, base_s=0.05))
    seen: list[Any] = []
    with pytest.raises(ServerError):
        await run_rollouts(RunConfig(env="shapes", n_prompts=2), renderer, engine, on_result=seen.append,
                           progress=False)
    assert seen == []  # no rollout was attempted (none recorded as failed)
    await engine.close()



def test_temporary_files_of_a_killed_writer_are_removed_on_reopen(run_copy: Path, renderer: Any) -> None:
    """A writer killed mid-write leaves `.<name>.<pid>.<tid>.tmp`; the next writer (holding the lock)
    removes those, and nothing else."""
    blob_dir = next(p for p in sorted((run_copy / "blobs").iterdir()) if p.is_dir())
    leftovers = [blob_dir / ".abc.png.123.456.tmp", run_copy / ".run.json.1.2.tmp"]
    keep = [blob_dir / "notes.tmp", blob_dir / ".abc.png.tmp"]
    outside = run_copy.parent / "outside.txt"
    outside.write_text("x")
    link = blob_dir / ".link.png.7.8.tmp"
    link.symlink_to(outside)
    for p in [*leftovers, *keep]:
        p.write_bytes(b"partial")
    rows_before = list(RunReader(run_copy).rows())
    RunWriter(run_copy, renderer.feature_store).close()
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in keep) and link.is_symlink() and outside.read_text() == "x"
    assert list(RunReader(run_copy).rows()) == rows_before
