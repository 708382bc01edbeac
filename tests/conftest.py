"""Shared fixtures: tiny model directories (real tokenizer, template, processor config) and images."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import rollwire.tiny_model as tm

pytest_plugins = ["shapes_run"]  # the shared real multi-turn run (shapes_run, qwen2_model fixtures)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$ROLLWIRE_CACHE when set (so CI can reuse built models), else a fresh session directory."""
    env = os.environ.get("ROLLWIRE_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("rollwire-cache")


@pytest.fixture(scope="session")
def tiny(cache_dir: Path) -> Callable[[str], Path]:
    """`tiny(family)` -> the tiny model directory of that family, built once per cache."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tm.ensure_tiny_model(family, cache_dir=cache_dir)
        return built[family]

    return get


@pytest.fixture(scope="session")
def replicas(tiny: Callable[[str], Path]) -> Iterator[list[Any]]:
    """Two `rollwire serve` replicas of the tiny Qwen2-VL (the pool and weight-update tests share
    them; a test that stops one puts a fresh one back on the same port)."""
    from rollwire.engines.server import EngineServer

    started = [EngineServer(tiny("qwen2_vl"), served_model_name="tiny").start() for _ in range(2)]
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image of random pixels (not a flat colour) in the given mode."""
    rng = np.random.default_rng(seed + 7919 * width + 104729 * height)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode in ("L", "1", "P"):
        base = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        if mode == "P":
            rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
            return rgb.quantize(colors=32)
        return base.convert(mode)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


# Figures that tests measure (against vLLM, for instance), reported at the end of the run.
FIGURES: dict[str, object] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("measured figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")
