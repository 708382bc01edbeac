"""Rendering, bridging and parsing run in worker threads, never on the event loop's thread, so
one rollout's image work (hash, resize, patchify) does not stall the others."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.render import create_renderer
from rollwire.rollout import RolloutConfig, run_rollout
from rollwire.rollout.envs.shapes import ShapesEnv


class Recording:
    """The real renderer, noting the thread each call runs on."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.threads: dict[str, set[int]] = {"render": set(), "bridge": set(), "parse_response": set()}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in self.threads:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                self.threads[name].add(threading.get_ident())
                return attr(*args, **kwargs)
            return wrapped
        return attr


class Answers:
    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        ids = [*self.renderer.tokenizer.encode_ids("2"), self.renderer.im_end_id]
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=[-1.0] * len(ids),
                                                      finish_reason="stop")], timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


def test_render_bridge_and_parse_run_off_the_loop_thread(tiny: Callable[[str], Path]) -> None:
    inner = create_renderer(tiny("qwen2_vl"))
    renderer = Recording(inner)

    async def go() -> tuple[int, Any]:
        loop_thread = threading.get_ident()
        result = await run_rollout(ShapesEnv(turns=3), renderer, Answers(inner),  # type: ignore[arg-type]
                                   RolloutConfig(max_turns=3), seed=3, trajectory_id="t")
        return loop_thread, result

    loop_thread, result = asyncio.run(go())
    assert result.trajectory.error is None and len(result.trajectory.steps) == 3
    assert all(step.bridged for step in result.trajectory.steps[1:])
    for name, threads in renderer.threads.items():
        assert threads, f"{name} was never called"
        assert loop_thread not in threads, f"{name} ran on the event loop's thread"
