"""Images referenced by in-flight requests are pinned: a feature store far smaller than the
concurrent working set evicts none of them before they are sent, and its byte bound holds again
for the unpinned rest once the requests return."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import make_image
from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.errors import UnknownImageError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, RunConfig, run_rollouts


class SlowReader:
    """Reads every image of a request from the store, as the vLLM client does when it builds the
    payload, after yielding to the other rollouts (which render, and so insert and evict)."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.missing = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        for _ in range(3):
            await asyncio.sleep(0)
        for ref in request.images:
            try:
                self.renderer.feature_store.get(ref.id)
            except UnknownImageError:
                self.missing += 1
                raise
        ids = [*self.renderer.tokenizer.encode_ids("2"), self.renderer.im_end_id]
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=[-1.0] * len(ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


def test_pinned_images_survive_eviction_and_the_bound_returns() -> None:
    store = FeatureStore(VisionConfig(), max_bytes=1)  # smaller than any image
    a = store.get_or_process(make_image(56, 56, seed=1))
    assert a.id not in store  # oversized and unpinned: returned, not kept
    with store.pinned([a.id]):
        store.put(a)
        b = store.get_or_process(make_image(56, 56, seed=2))
        assert a.id in store and b.id not in store  # the pinned one stays, the other is not kept
        with store.pinned([a.id]):  # pins nest
            pass
        assert a.id in store
    assert a.id not in store and store.stats().bytes <= store.max_bytes


def test_a_store_smaller_than_the_working_set_loses_no_rollout(tiny: Callable[[str], Path]) -> None:
    model_dir = tiny("qwen2_vl")
    one_image = FeatureStore(VisionConfig.from_pretrained(model_dir)).get_or_process(make_image(224, 224)).nbytes
    store = FeatureStore(VisionConfig.from_pretrained(model_dir), max_bytes=2 * one_image)
    renderer = create_renderer(model_dir, feature_store=store)
    engine = SlowReader(renderer)
    config = RunConfig(env="shapes", n_prompts=32, group=1, concurrency=32,
                       rollout=RolloutConfig(max_turns=2, max_tokens=4))
    summary = asyncio.run(run_rollouts(config, renderer, engine, progress=False))
    assert engine.missing == 0 and summary.failed == 0, summary.errors
    assert summary.done == 32
    stats = store.stats()
    assert stats.evictions > 0  # the store was under pressure: the check means something
    assert stats.bytes <= store.max_bytes
