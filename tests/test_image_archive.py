"""Rollouts hold image ids, not pixels: with a run directory every image is archived when first seen,
the rollout keeps no original, and the bounded feature store recomputes an evicted image from its
archived original when a request needs it (the same id, or a typed error)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import make_image
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.errors import ImageReloadError, StoreError, UnknownImageError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer
from rollwire.rollout import EnvStep, Observation, RolloutConfig, RunConfig, register, run_rollout, run_rollouts
from rollwire.store import RunReader, RunWriter


class PicturesEnv:
    """A new picture every turn; it keeps weak references only (so the test sees who holds them).
    With `rewrite=True` the second step returns the whole history again (same messages, new tail)."""

    name = "pictures"

    def __init__(self, size: int = 112, rewrite: bool = False, seed: int = 0) -> None:
        self.size, self.rewrite, self.seed = size, rewrite, seed
        self.turn = 0
        self.alive: list[weakref.ref[Any]] = []
        self.first: Message | None = None

    def _picture(self) -> Message:
        image = make_image(self.size, self.size, seed=1000 * self.seed + self.turn)
        self.alive.append(weakref.ref(image))
        return Message(role="user", content=(ImagePart(image), TextPart(f"picture {self.turn}")))

    async def reset(self, seed: int) -> Observation:
        self.first = self._picture()
        return Observation(messages=[self.first] if self.rewrite else [self._drop_first()])

    def _drop_first(self) -> Message:
        first, self.first = self.first, None
        assert first is not None
        return first

    async def step(self, message: Message) -> EnvStep:
        self.turn += 1
        nxt = self._picture()
        if self.rewrite and self.turn == 1:
            return EnvStep(history=[self._drop_first(), message, nxt])
        return EnvStep(messages=[nxt])


class Reader:
    """Reads every image of each request from the store (as a client building pixels does) and
    records, per request, how many of the environment's pictures are still alive."""

    def __init__(self, renderer: Any, env: PicturesEnv | None = None, only_new: bool = False) -> None:
        self.renderer, self.env, self.only_new = renderer, env, only_new
        self.alive_per_turn: list[int] = []
        self.seen: set[str] = set()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        for _ in range(3):
            await asyncio.sleep(0)  # let other rollouts render (insert and evict)
        for ref in request.images:
            if not (self.only_new and ref.id in self.seen):  # a server holding an image needs it once
                assert self.renderer.feature_store.get(ref.id).grid_thw == ref.grid_thw
            self.seen.add(ref.id)
        if self.env is not None:
            gc.collect()
            self.alive_per_turn.append(sum(r() is not None for r in self.env.alive))
        ids = [*self.renderer.tokenizer.encode_ids("2"), self.renderer.im_end_id]
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=[-1.0] * len(ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_dir(tiny: Callable[[str], Path]) -> Path:
    return tiny("qwen2_vl")


def test_an_archived_rollout_holds_no_original(model_dir: Path, tmp_path: Path) -> None:
    renderer = create_renderer(model_dir)
    env = PicturesEnv()
    engine = Reader(renderer, env)
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        result = asyncio.run(run_rollout(env, renderer, engine, RolloutConfig(max_turns=4, max_tokens=4),
                                         seed=0, trajectory_id="p", archive=writer))
        writer.write(result.trajectory, result.originals)
    t = result.trajectory
    assert t.error is None and len(t.steps) == 4 and all(s.bridged for s in t.steps[1:])
    # At each request at most the picture being sent is alive: earlier ones were archived and dropped.
    assert len(engine.alive_per_turn) == 4 and max(engine.alive_per_turn) <= 1
    assert result.originals == {}
    reader = RunReader(tmp_path)
    assert [reader.trajectory(row).steps for row in reader.rows()] == [t.steps]
    for k, image_id in enumerate(t.image_ids):
        expected = make_image(112, 112, seed=k)
        assert np.array_equal(np.asarray(reader.image(image_id)), np.asarray(expected))
        assert reader.features(image_id) == renderer.feature_store.get_or_process(expected)


def test_a_blob_that_cannot_be_made_durable_is_never_committed(model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Archived blobs are made durable in the background; if that fails (EIO at fsync, as a dying
    disk reports it), the rollouts using them are not committed and nothing is under a blob's name.
    The next writer archives them again."""
    renderer = create_renderer(model_dir)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if "/blobs/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    config = RolloutConfig(max_turns=2, max_tokens=4)
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        monkeypatch.setattr(os, "fsync", failing_fsync)
        result = asyncio.run(run_rollout(PicturesEnv(), renderer, Reader(renderer), config, seed=0,
                                         trajectory_id="d", archive=writer))
        assert result.trajectory.error is None  # the rollout ran: its turns did not wait for the disk
        with pytest.raises(StoreError, match="Input/output error"):
            writer.write(result.trajectory, result.originals)
        monkeypatch.setattr(os, "fsync", real_fsync)
    assert (tmp_path / "rollouts.jsonl").read_bytes() == b""
    assert not [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]  # no blob, no temporary file
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        again = asyncio.run(run_rollout(PicturesEnv(), renderer, Reader(renderer), config, seed=0,
                                        trajectory_id="d", archive=writer))
        writer.write(again.trajectory, again.originals)
    reader = RunReader(tmp_path)
    assert [row["id"] for row in reader.rows()] == ["d"]
    for k, image_id in enumerate(again.trajectory.image_ids):
        assert np.array_equal(np.asarray(reader.image(image_id)), np.asarray(make_image(112, 112, seed=k)))


def test_without_a_run_directory_the_rollout_holds_the_originals(model_dir: Path) -> None:
    renderer = create_renderer(model_dir)
    env = PicturesEnv()
    engine = Reader(renderer, env)
    result = asyncio.run(run_rollout(env, renderer, engine, RolloutConfig(max_turns=3, max_tokens=4),
                                     seed=0, trajectory_id="p"))
    assert engine.alive_per_turn == [1, 2, 3]  # the documented fallback: originals kept for the caller
    assert list(result.originals) == result.trajectory.image_ids


register("pictures", PicturesEnv)


def test_evicted_images_are_recomputed_from_the_archive(model_dir: Path, tmp_path: Path) -> None:
    one = FeatureStore(VisionConfig.from_pretrained(model_dir)).get_or_process(make_image(112, 112)).nbytes
    store = FeatureStore(VisionConfig.from_pretrained(model_dir), max_bytes=2 * one)
    renderer = create_renderer(model_dir, feature_store=store)
    config = RunConfig(env="pictures", n_prompts=12, concurrency=12, rollout=RolloutConfig(max_turns=3, max_tokens=4))
    results: list[Any] = []
    with RunWriter(tmp_path, store) as writer:
        def keep(r: Any) -> None:
            results.append(r)
            writer.write(r.trajectory, r.originals)

        summary = asyncio.run(run_rollouts(config, renderer, Reader(renderer), on_result=keep, progress=False,
                                           archive=writer))
    assert summary.done == 12 and summary.failed == 0, summary.error_messages
    stats = store.stats()
    assert stats.evictions > 0 and stats.reloaded > 0  # under pressure, and reloaded from the archive
    assert stats.bytes <= store.max_bytes and all(r.originals == {} for r in results)
    reader = RunReader(tmp_path)
    assert len(list(reader.rows())) == 12
    for t in reader.trajectories():  # every image the run refers to is archived, original and features
        for image_id in t.image_ids:
            assert reader.features(image_id) == store.get_or_process(reader.image(image_id))


def test_a_rewritten_history_bridges_over_archived_images_as_over_originals(model_dir: Path, tmp_path: Path) -> None:
    renderer = create_renderer(model_dir)
    plain = asyncio.run(run_rollout(PicturesEnv(rewrite=True), renderer, Reader(renderer),
                                    RolloutConfig(max_turns=3, max_tokens=4), seed=0, trajectory_id="r"))
    with RunWriter(tmp_path, renderer.feature_store) as writer:
        archived = asyncio.run(run_rollout(PicturesEnv(rewrite=True), renderer, Reader(renderer),
                                           RolloutConfig(max_turns=3, max_tokens=4), seed=0, trajectory_id="r",
                                           archive=writer))
    assert plain.trajectory.error is None and archived.trajectory.error is None
    assert [s.bridged for s in archived.trajectory.steps] == [False, True, True]
    untimed = [[msgspec.structs.replace(s, timings={}) for s in r.trajectory.steps] for r in (plain, archived)]
    assert untimed[0] == untimed[1]
    assert archived.trajectory.messages == plain.trajectory.messages


def test_images_sent_by_id_cost_no_memory_and_no_reload(model_dir: Path, tmp_path: Path) -> None:
    one = FeatureStore(VisionConfig.from_pretrained(model_dir)).get_or_process(make_image(112, 112)).nbytes
    store = FeatureStore(VisionConfig.from_pretrained(model_dir), max_bytes=one)  # room for one picture
    renderer = create_renderer(model_dir, feature_store=store)
    with RunWriter(tmp_path, store) as writer:
        result = asyncio.run(run_rollout(PicturesEnv(), renderer, Reader(renderer, only_new=True),
                                         RolloutConfig(max_turns=4, max_tokens=4), seed=0, trajectory_id="n",
                                         archive=writer))
    assert result.trajectory.error is None and len(result.trajectory.steps) == 4
    # Each turn's new picture was kept until sent; the earlier ones were neither kept nor reloaded.
    stats = store.stats()
    assert stats.reloaded == 0 and stats.evictions == stats.misses - 1 and len(store) == 1


class ChangedArchive:
    """An archive whose copies came back different (edited on disk, or lossy)."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def archive_image(self, image_id: str, image: Any, features: Any) -> str:
        return self.paths.setdefault(image_id, f"/nonexistent/{image_id}.png")

    def restore_image(self, image_id: str) -> Any:
        return make_image(112, 112, seed=999)


def test_a_changed_archive_is_a_typed_error_not_other_pixels(model_dir: Path) -> None:
    store = FeatureStore(VisionConfig.from_pretrained(model_dir), max_bytes=0)  # keeps nothing unpinned
    renderer = create_renderer(model_dir, feature_store=store)
    result = asyncio.run(run_rollout(PicturesEnv(), renderer, Reader(renderer),
                                     RolloutConfig(max_turns=2, max_tokens=4), seed=0, trajectory_id="x",
                                     archive=ChangedArchive()))
    error = result.trajectory.error
    # The first turn sent the picture it had; the second found its evicted first picture changed.
    assert error is not None and error.kind == "engine_error" and "ImageReloadError" in error.message
    assert error.step == 1 and len(result.trajectory.steps) == 1


def test_a_pin_reloads_only_what_is_asked_for_and_checks_the_id() -> None:
    store = FeatureStore(VisionConfig(), max_bytes=0)
    image, other = make_image(56, 56, seed=1), make_image(56, 56, seed=2)
    a = store.get_or_process(image)
    assert a.id not in store
    asked: list[str] = []

    def reload(image_id: str) -> Any:
        asked.append(image_id)
        return image

    with store.pinned([a.id], reload=reload):
        assert a.id in store and asked == []  # pinning loads nothing (an image sent by id needs no pixels)
        assert store.get(a.id) == a and asked == [a.id] and store.stats().reloaded == 1
        assert store.get(a.id) == a and asked == [a.id]  # kept while pinned
    assert a.id not in store
    with pytest.raises(UnknownImageError):
        store.get(a.id)
    with store.pinned([a.id], reload=lambda _: other), pytest.raises(ImageReloadError, match=a.id[:12]):
        store.get(a.id)
