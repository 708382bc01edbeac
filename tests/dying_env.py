"""A `shapes` environment whose process dies once (for the Ray worker test): the first time a
rollout of `die_seed` steps, it writes `marker` and kills its own process, as a crashed worker
would; later runs (the marker exists) behave like `shapes`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollwire.rollout.envs.shapes import ShapesEnv


class DyingShapes(ShapesEnv):
    name = "dying"

    def __init__(self, marker: str, die_seed: int, delay_s: float = 0.0) -> None:
        super().__init__(turns=2)
        self.marker, self.die_seed, self.delay_s = Path(marker), die_seed, delay_s
        self._seed: int | None = None

    async def reset(self, seed: int) -> Any:
        self._seed = seed
        return await super().reset(seed)

    async def step(self, message: Any) -> Any:
        if self._seed == self.die_seed and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(17)  # the whole worker process goes, mid-run
        return await super().step(message)
