"""Images are pinned from the moment the store hands them to a rollout's render or bridge until
the request carrying them returns: a store far smaller than K rollouts' new images, under real
concurrency (renders in worker threads, an engine that yields between reads), processes each image
exactly once, and every pin is released at the end, after errors and declined bridges too."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import make_image
from rollwire.bench.instant import Instant, Pictures, run_rollouts
from rollwire.engines.types import GenerateRequest, GenerateResult
from rollwire.errors import UnknownImageError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer
from rollwire.render.types import BridgeResult
from rollwire.rollout import EnvStep, Observation, RolloutConfig, run_rollout
from rollwire.store import RunWriter

SIDE = 112


def counting_store(model_dir: Path, images: float) -> tuple[FeatureStore, list[int], int]:
    """A store bounded at `images` pictures of SIDE², whose real Qwen2-VL processor counts its calls."""
    base = VisionConfig.from_pretrained(model_dir)
    calls: list[int] = []

    class Counting(VisionConfig):
        def process(self, image: Image.Image) -> Any:
            calls.append(1)
            return super().process(image)

    config = Counting(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    one = FeatureStore(base).get_or_process(make_image(SIDE, SIDE)).nbytes
    return FeatureStore(config, max_bytes=int(images * one)), calls, one


class Reading(Instant):
    """Yields to the other rollouts (whose renders insert and evict meanwhile), then reads each
    image the server does not hold yet (new in the session) from the store, as the vLLM client
    does when it builds the payload; the others go by id."""

    def __init__(self, renderer: Any, fail_turn: int | None = None) -> None:
        super().__init__(renderer)
        self.store: FeatureStore = renderer.feature_store
        self.fail_turn, self.missing = fail_turn, 0
        self.held: dict[str | None, set[str]] = {}

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        for _ in range(3):
            await asyncio.sleep(0)
        held = self.held.setdefault(request.session_id, set())
        for ref in request.images:
            if ref.id in held:
                continue
            held.add(ref.id)
            try:
                self.store.get(ref.id)
            except UnknownImageError:
                self.missing += 1
                raise
        if self.fail_turn is not None and request.request_id.endswith(f"-{self.fail_turn}"):
            raise ConnectionError("the server went away")
        return await super().generate(request)


def assert_released(store: FeatureStore) -> None:
    stats = store.stats()
    assert stats.leases == 0 and stats.pinned == 0, stats
    assert stats.bytes <= store.max_bytes


def picture(rollout: int, turn: int) -> Image.Image:
    return make_image(SIDE, SIDE, seed=1000 * rollout + turn)


@pytest.mark.parametrize("archive", [True, False], ids=["run directory", "originals held"])
def test_k_rollouts_through_a_tiny_store_process_each_image_once(
        tiny: Callable[[str], Path], tmp_path: Path, archive: bool) -> None:
    k, turns = 16, 3
    store, calls, one = counting_store(tiny("qwen2_vl"), 2.5)  # K new images in flight: ~6× the bound
    renderer = create_renderer(tiny("qwen2_vl"), feature_store=store)
    engine = Reading(renderer)
    envs = [Pictures(partial(picture, i), turns) for i in range(k)]

    async def go() -> list[Any]:
        if not archive:
            return await run_rollouts(renderer, envs, turns, engine=engine)
        with RunWriter(tmp_path, store) as writer:
            return await run_rollouts(renderer, envs, turns, engine=engine, writer=writer)

    results = asyncio.run(go())
    assert [r.trajectory.error for r in results] == [None] * k
    assert all(len(r.trajectory.steps) == turns for r in results)
    stats = store.stats()
    assert stats.evictions > 0  # the store was under pressure: the count means something
    assert len(calls) == k * turns and stats.misses == k * turns and stats.reloaded == 0
    assert engine.missing == 0
    # Over the bound by at most what was pinned: each rollout's one new, unsent picture.
    assert store.max_bytes < stats.peak_bytes <= store.max_bytes + (k + 1) * one
    assert_released(store)


class DyingEnv:
    """Turn 0 shows a picture; turn 1 shows a picture and then one that cannot be decoded."""

    name = "dying"

    async def reset(self, seed: int) -> Observation:
        return Observation(messages=[Message(role="user", content=(ImagePart(picture(seed, 0)), TextPart("a")))])

    async def step(self, message: Message) -> EnvStep:
        content = (ImagePart(picture(0, 1)), ImagePart(b"\x89PNG not really"), TextPart("b"))
        return EnvStep(messages=[Message(role="user", content=content)])


def test_a_render_that_raises_releases_the_pins_it_took(tiny: Callable[[str], Path]) -> None:
    store, calls, _ = counting_store(tiny("qwen2_vl"), 0)  # keeps nothing that is not pinned
    renderer = create_renderer(tiny("qwen2_vl"), feature_store=store)
    result = asyncio.run(run_rollout(DyingEnv(), renderer, Reading(renderer), RolloutConfig(max_turns=3),
                                     seed=0, trajectory_id="t"))
    error = result.trajectory.error
    assert error is not None and error.kind == "render_error" and error.step == 1, error
    assert len(calls) == 2  # the bridge processed (and pinned) the good picture before the bad one raised
    assert_released(store)
    assert len(store) == 0


@pytest.mark.parametrize("how", ["engine error", "token budget"])
def test_a_prompt_never_answered_releases_its_pins(tiny: Callable[[str], Path], how: str) -> None:
    store, calls, _ = counting_store(tiny("qwen2_vl"), 0)
    renderer = create_renderer(tiny("qwen2_vl"), feature_store=store)
    env = Pictures(partial(picture, 0), 4)
    first = renderer.render([Message(role="user", content=(ImagePart(picture(0, 0)), TextPart("What changed?")))])
    # A budget that the second prompt (rendered, pinned) leaves no room in: it is never sent.
    budget = len(first.token_ids) + 20 if how == "token budget" else 1 << 20
    config = RolloutConfig(max_turns=4, max_tokens=8, max_total_tokens=budget)
    engine = Reading(renderer, fail_turn=1 if how == "engine error" else None)
    result = asyncio.run(run_rollout(env, renderer, engine, config, seed=0, trajectory_id="t"))
    traj = result.trajectory
    assert len(traj.steps) == 1 and len(calls) == 3  # the probe, turn 0, turn 1 (rendered, never answered)
    assert traj.finish == ("error" if how == "engine error" else "token_budget"), traj.error
    assert_released(store)
    assert len(store) == 0


class Declining:
    """The real renderer, whose bridge does its work (processing the new images) and then declines."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def bridge(self, *args: Any, **kwargs: Any) -> BridgeResult:
        assert self._inner.bridge(*args, **kwargs).tokens is not None
        return BridgeResult(None, "declined for the test")


def test_a_declined_bridge_keeps_its_images_pinned_for_the_full_render(
        tiny: Callable[[str], Path], tmp_path: Path) -> None:
    k, turns = 4, 3
    store, calls, _ = counting_store(tiny("qwen2_vl"), 0)
    inner = create_renderer(tiny("qwen2_vl"), feature_store=store)
    renderer = Declining(inner)
    envs = [Pictures(partial(picture, i), turns) for i in range(k)]

    async def go() -> list[Any]:
        with RunWriter(tmp_path, store) as writer:
            return await run_rollouts(renderer, envs, turns, engine=Reading(inner), writer=writer)

    results = asyncio.run(go())
    assert [r.trajectory.error for r in results] == [None] * k
    assert all(r.trajectory.metrics["full_render:declined for the test"] == turns - 1 for r in results)
    # Each new picture is processed once (by the bridge); the full render finds it still pinned.
    # The earlier, archived pictures a full render needs again are recomputed from the archive:
    # with a store that keeps nothing unpinned that is 1 + 2 per rollout for 3 turns.
    new_images = k * turns
    assert len(calls) == new_images + k * sum(range(turns))
    assert_released(store)


def test_a_lease_pins_what_the_store_hands_out_in_its_own_thread_only() -> None:
    store = FeatureStore(VisionConfig(), max_bytes=0)
    a, b, c = (make_image(56, 56, seed=s) for s in range(3))
    lease = store.lease()
    with lease.collecting():
        fa = store.get_or_process(a)
        other: list[str] = []
        thread = threading.Thread(target=lambda: other.append(store.get_or_process(b).id))
        thread.start()
        thread.join()
        fc = store.get_or_process(c)
    assert lease.ids == {fa.id, fc.id} and other[0] not in store  # the other thread pinned nothing
    assert fa.id in store and fc.id in store
    assert store.stats().pinned_bytes == fa.nbytes + fc.nbytes > store.max_bytes
    with store.lease() as second, second.collecting():
        assert store.get(fa.id) is fa  # found in the store: pinned to this lease as well
    assert fa.id in store  # still pinned by the first
    lease.retain([fc.id])
    assert fa.id not in store and fc.id in store
    lease.release()
    assert fc.id not in store and store.stats().leases == 0
    with lease.collecting():  # a released lease (a cancelled rollout's render still running) pins nothing
        store.get_or_process(a)
    assert len(store) == 0 and store.stats().pinned == 0
