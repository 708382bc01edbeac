"""docs/design.md runs as written: its block bridges a second turn onto the first token for token,
and the same pixels given twice are one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from doc_blocks import blocks


def test_the_design_page_runs(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLWIRE_CACHE", str(cache_dir))  # the tiny model, built once per cache
    [code] = blocks("design.md", "python")
    namespace: dict[str, Any] = {}
    exec(compile(code, "design.md, python block", "exec"), namespace)
    bridged, prompt = namespace["bridged"], namespace["prompt"]
    assert len(bridged.images) == 2 and len(bridged.token_ids) > len(prompt.token_ids) + len(namespace["sampled"])
