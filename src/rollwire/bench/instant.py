"""What the rollout benchmarks share: an environment that shows a new picture each turn and an
engine that answers at once, so only rollwire's own work (render, send, record) is measured."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from rollwire.engines.types import Completion, GenerateRequest, GenerateResult, Timings
from rollwire.messages import ImagePart, ImageSource, Message, TextPart
from rollwire.rollout import EnvStep, Observation, RolloutConfig, run_rollout


class Pictures:
    """Each turn shows the next picture, made when it is shown, in a worker thread (a well-behaved
    environment renders or loads its image then, off the loop, and keeps no reference to it)."""

    name = "pictures"

    def __init__(self, make: Callable[[int], ImageSource], turns: int) -> None:
        self.make, self.turns, self.turn = make, turns, 0

    async def _ask(self) -> Message:
        image = await asyncio.to_thread(self.make, self.turn)
        return Message(role="user", content=(ImagePart(image), TextPart("What changed?")))

    async def reset(self, seed: int) -> Observation:
        self.turn = 0
        return Observation(messages=[await self._ask()])

    async def step(self, message: Message) -> EnvStep:
        self.turn += 1
        if self.turn >= self.turns:
            return EnvStep(messages=[], reward=1.0, done=True)
        return EnvStep(messages=[await self._ask()], reward=0.0)


class Instant:
    """An engine that returns a fixed short completion immediately (`Engine` protocol)."""

    def __init__(self, renderer: Any, text: str = "It moved left.") -> None:
        self.ids = [*renderer.tokenizer.encode_ids(text), renderer.im_end_id]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        await asyncio.sleep(0)
        n = len(self.ids)
        return GenerateResult(completions=[Completion(token_ids=self.ids, logprobs=[-0.5] * n, finish_reason="stop")],
                              timings=Timings(total_s=0.0))

    async def close(self) -> None:
        pass


async def run_rollouts(renderer: Any, envs: Sequence[Pictures], turns: int, engine: Any | None = None,
                       writer: Any | None = None) -> list[Any]:
    """Run one rollout per environment concurrently; the results in order. With `writer` (a
    `RunWriter`) the rollouts archive their images there and each is written when it ends, as
    `rollwire rollout` does; without one they hold their originals (library use)."""
    engine = engine or Instant(renderer)
    config = RolloutConfig(max_turns=turns, max_tokens=16, max_total_tokens=1 << 22)

    async def one(i: int, env: Pictures) -> Any:
        result = await run_rollout(env, renderer, engine, config, seed=i, trajectory_id=f"r{i}", archive=writer)
        if writer is not None:
            await asyncio.to_thread(writer.write, result.trajectory, result.originals)
        return result

    return await asyncio.gather(*(one(i, env) for i, env in enumerate(envs)))
