"""Render many conversations in parallel threads (tokenizers, PIL and hashing release the GIL)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from rollwire.messages import MessageLike
from rollwire.render.types import RenderedTokens, Renderer


class RendererPool:
    """A renderer shared by a thread pool; renderers and the feature store are thread-safe."""

    def __init__(self, renderer: Renderer, *, workers: int = 4) -> None:
        self.renderer = renderer
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollwire-render")

    def render_many(
        self,
        conversations: Sequence[Sequence[MessageLike]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RenderedTokens]:
        fn = partial(self.renderer.render, tools=tools, add_generation_prompt=add_generation_prompt)
        return list(self._executor.map(fn, conversations))

    async def render(
        self,
        messages: Sequence[MessageLike],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> RenderedTokens:
        loop = asyncio.get_running_loop()
        fn = partial(self.renderer.render, messages, tools, add_generation_prompt=add_generation_prompt)
        return await loop.run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> RendererPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
