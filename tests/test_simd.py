"""rollwire.features._simd, the compiled byte shuffles, called directly: built where it can be, at the
best level the CPU has, the same bytes as numpy's references at every level this CPU runs (AVX-512
VBMI and AVX2), and a typed error for every bad call."""

from __future__ import annotations

import gc
import importlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rollwire.features import pixels

X86_LINUX_WITH_CC = (platform.machine() in ("x86_64", "AMD64") and sys.platform == "linux"
                     and (shutil.which("cc") or shutil.which("gcc")) is not None)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compiled_or_skip() -> Any:
    try:
        return importlib.import_module("rollwire.features._simd")
    except ImportError:
        pytest.skip("rollwire.features._simd is not built here")


LEVELS = ["avx512vbmi", "avx2"]


@pytest.fixture(params=LEVELS)
def simd(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The module running its shuffles at each level this CPU has (the best first, then AVX2)."""
    module = compiled_or_skip()
    best = module.best()
    if best is None or LEVELS.index(request.param) < LEVELS.index(best):
        pytest.skip(f"this CPU does not run {request.param} (best: {best})")
    previous = module.use(request.param)
    yield module
    module.use(previous or "none")


@pytest.mark.skipif(not X86_LINUX_WITH_CC, reason="the extension is built on x86-64 Linux with a C compiler")
def test_the_extension_is_built_and_picks_the_best_level_the_cpu_has() -> None:
    module = importlib.import_module("rollwire.features._simd")  # an install that skipped it fails here
    flags = cpu_flags()
    want = ("avx512vbmi" if {"avx512f", "avx512bw", "avx512vl", "avx512vbmi"} <= flags
            else "avx2" if "avx2" in flags else None)
    assert module.best() == want and module.level() == want
    on = os.environ.get("ROLLWIRE_SIMD", "1") != "0"
    assert (pixels.COMPILED is module) is on
    assert (pixels.simd() is module) is (want is not None and on)


def test_use_takes_no_level_above_the_cpus_and_none_turns_the_kernels_off() -> None:
    module = compiled_or_skip()
    best = module.best()
    with pytest.raises(ValueError):
        module.use("sse9")
    if best != "avx512vbmi":
        with pytest.raises(ValueError):
            module.use("avx512vbmi")
    previous = module.use("none")
    try:
        assert module.level() is None
        with pytest.raises(RuntimeError):
            module.pack_rgb(b"\x00" * 4, 0, 1, bytearray(3))
        with pytest.raises(RuntimeError):
            module.patchify_rgbx(b"\x00" * 4, bytearray(6), 1, 1, 1, 1, 2)
    finally:
        module.use(previous or "none")
    assert module.level() == best


def test_rollwire_simd_0_turns_the_shuffles_off() -> None:
    code = "from rollwire.features import pixels; print(pixels.simd(), pixels.COMPILED)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ROLLWIRE_SIMD": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]


@pytest.mark.parametrize(("setting", "level"), [("avx2", "avx2"), ("none", "None"), ("AVX2 ", "avx2")])
def test_rollwire_simd_picks_a_level(setting: str, level: str) -> None:
    module = compiled_or_skip()
    if module.best() is None:
        pytest.skip("this CPU runs no level of the shuffles")
    code = "from rollwire.features import pixels; print(pixels.COMPILED.level(), pixels.simd() is None)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ROLLWIRE_SIMD": setting},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [level, str(level == "None")]


def test_rollwire_simd_above_the_cpu_or_unknown_is_an_error_at_import() -> None:
    module = compiled_or_skip()
    bad = "sse9" if module.best() == "avx512vbmi" else "avx512vbmi"
    run = subprocess.run([sys.executable, "-c", "import rollwire.features.pixels"],
                         env={**os.environ, "ROLLWIRE_SIMD": bad}, capture_output=True, text=True)
    assert run.returncode != 0 and f"ROLLWIRE_SIMD={bad}" in run.stderr


def reference_rows(rgbx: np.ndarray, p: int, m: int, t: int) -> np.ndarray:
    """HF's patch formula over the R, G, B bytes (the pad byte dropped), each frame the same."""
    chw = rgbx[:, :, :3].transpose(2, 0, 1)[None].repeat(t, axis=0)
    gh, gw = rgbx.shape[0] // p, rgbx.shape[1] // p
    x = chw.reshape(1, t, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * t * p * p)


@pytest.mark.parametrize(("p", "m", "t", "gh", "gw"), [
    (14, 2, 2, 17, 23), (16, 2, 2, 4, 6), (1, 1, 1, 3, 5), (7, 3, 4, 2, 1), (15, 1, 16, 1, 2), (14, 2, 1, 2, 2),
    (8, 2, 2, 2, 3), (9, 1, 3, 2, 2), (3, 2, 5, 3, 2)])
def test_patchify_is_hfs_rows_whatever_the_pad_bytes(simd: Any, p: int, m: int, t: int, gh: int, gw: int) -> None:
    rgbx = np.random.default_rng(p * 1000 + gh * 10 + gw).integers(0, 256, (gh * p * m, gw * p * m, 4),
                                                                    dtype=np.uint8)
    out = np.full((gh * gw * m * m + 1, 3 * t * p * p), 77, dtype=np.uint8)  # a row more: must stay untouched
    simd.patchify_rgbx(rgbx, out[:-1], rgbx.shape[0], rgbx.shape[1], p, m, t)
    assert np.array_equal(out[:-1], reference_rows(rgbx, p, m, t))
    assert (out[-1] == 77).all()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 10, 11, 15, 16, 17, 18, 25, 26, 1000, 65_537])
def test_pack_is_the_rgb_bytes_of_any_span(simd: Any, n: int) -> None:
    rgbx = np.random.default_rng(n).integers(0, 256, (n + 40, 4), dtype=np.uint8)
    for start in (0, 3, 40):
        dst = bytearray(3 * n + 5)
        assert simd.pack_rgb(rgbx, start, n, dst) == 3 * n
        assert bytes(dst[: 3 * n]) == rgbx[start : start + n, :3].tobytes()
        assert dst[3 * n :] == bytearray(5)  # nothing past the span written


def test_bad_calls_are_typed_errors_not_stray_writes(simd: Any) -> None:
    rgbx = np.zeros((28, 56, 4), dtype=np.uint8)
    out = np.zeros((8, 3 * 2 * 196), dtype=np.uint8)
    simd.patchify_rgbx(rgbx, out, 28, 56, 14, 2, 2)  # the good call, for contrast
    bad_geometry = [(28, 56, 17, 2, 2), (28, 56, 14, 2, 0), (28, 56, 14, 2, 17), (30, 56, 14, 2, 2),
                    (0, 56, 14, 2, 2), (28, 56, 14, 0, 2), (28, 84, 14, 2, 2)]
    for args in bad_geometry:
        with pytest.raises(ValueError):
            simd.patchify_rgbx(rgbx, out, *args)
    with pytest.raises(ValueError):  # out one row short
        simd.patchify_rgbx(rgbx, out[:7], 28, 56, 14, 2, 2)
    with pytest.raises(TypeError):  # out read-only
        frozen = out.copy()
        frozen.flags.writeable = False
        simd.patchify_rgbx(rgbx, frozen, 28, 56, 14, 2, 2)
    with pytest.raises(TypeError):  # src not contiguous
        simd.patchify_rgbx(np.zeros((28, 112, 4), dtype=np.uint8)[:, ::2], out, 28, 56, 14, 2, 2)
    dst = bytearray(30)
    for start, count in [(-1, 1), (0, 11), (1567, 2), (0, -1)]:
        with pytest.raises(ValueError):
            simd.pack_rgb(rgbx, start, count, dst)
    with pytest.raises(ValueError):  # not whole pixels
        simd.pack_rgb(b"\x00" * 7, 0, 1, dst)
    with pytest.raises(TypeError):
        simd.pack_rgb(rgbx, 0, 1, b"\x00" * 3)  # dst read-only


def test_rgbx_memory_is_the_images_bytes_and_keeps_them_alive() -> None:
    compiled = compiled_or_skip()
    rgb = np.random.default_rng(9).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).resize((7, 5), Image.Resampling.BICUBIC)  # a new image: PIL's own memory
    expected = np.asarray(image).copy()
    memory = compiled.rgbx_memory(image, 7, 5)
    view = np.frombuffer(memory, dtype=np.uint8).reshape(5, 7, 4)
    assert not view.flags.writeable
    del image, memory
    gc.collect()
    assert np.array_equal(view[:, :, :3], expected)
    assert compiled.rgbx_memory(Image.new("RGB", (7, 5)), 7, 6) is None  # not the size it says
    assert compiled.rgbx_memory(Image.new("RGBA", (7, 5)), 7, 5) is None  # not RGB's layout
    assert compiled.rgbx_memory(object(), 7, 5) is None  # no export at all
    assert compiled.rgbx_memory(Image.new("RGB", (7, 5)), 0, 5) is None
