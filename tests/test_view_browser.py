"""The viewer's page in a real headless browser (Debian's chromium, scripts/setup_browser.sh): the
thumbnails decode (naturalWidth > 0, reported by the page's script into the DOM), every turn is
there, nothing injected runs, and a screenshot shows the images and the turns.

Skipped when chromium is absent, unless ROLLWIRE_REQUIRE_BROWSER=1 (CI sets it): then it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rollwire.store import RunReader
from rollwire.view import write_page
from view_runs import view_runs  # noqa: F401  (the session fixture)

WIDTH, HEIGHT = 1200, 2000
ASSISTANT_BORDER = (0x2E, 0x9D, 0x57)  # .msg.assistant's left border (assets.CSS)


def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if found is None:
        if os.environ.get("ROLLWIRE_REQUIRE_BROWSER"):
            pytest.fail("ROLLWIRE_REQUIRE_BROWSER is set but chromium is not installed (bash scripts/setup_browser.sh)")
        pytest.skip("chromium is not installed (bash scripts/setup_browser.sh) and ROLLWIRE_REQUIRE_BROWSER is unset")
    return found


def run_chromium(page: Path, profile: Path, *args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1",
               "--hide-scrollbars", *args, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def status(dom: str) -> dict[str, str]:
    """The attributes the page's script wrote on #rw-status once every image loaded or failed."""
    tag = re.search(r'<div id="rw-status"([^>]*)>', dom)
    assert tag is not None, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag[1]))


@pytest.fixture(scope="module")
def pages(view_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    chromium()
    root = tmp_path_factory.mktemp("view-pages")
    out = {}
    for name, run in view_runs.items():
        write_page(run, root / f"{name}.html")
        out[name] = root / f"{name}.html"
    return out


@pytest.mark.parametrize("name", ["shapes", "zoom", "hostile"])
def test_thumbnails_and_turns_render(name: str, pages: dict[str, Path], view_runs: dict[str, Path],  # noqa: F811
                                     tmp_path: Path) -> None:
    reader = RunReader(view_runs[name])
    steps = sum(len(reader.trajectory(row).steps) for row in reader.rows())
    # Image parts the page shows: every image of every message of every rollout's conversation.
    shown = sum(1 for row in reader.rows() for m in row["messages"] if isinstance(m.get("content"), list)
                for part in m["content"] if part.get("type") == "image")
    dom = run_chromium(pages[name], tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    got = status(dom)
    assert got.get("complete") == "1", got
    assert (int(got["loaded"]), int(got["failed"])) == (shown, 0)
    assert int(got["turns"]) == steps
    assert len(re.findall(r"<script", dom)) == 2 and "<b>" not in dom  # nothing from the run became markup


def test_screenshot_shows_images_and_turns(pages: dict[str, Path], tmp_path: Path) -> None:
    dom = run_chromium(pages["shapes"], tmp_path / "dom", "--virtual-time-budget=10000", "--dump-dom")
    x, y, w, h = (int(v) for v in status(dom)["first-image"].split(","))
    assert w > 50 and h > 30 and y + h < HEIGHT
    shot = tmp_path / "shot.png"
    run_chromium(pages["shapes"], tmp_path / "shot", "--virtual-time-budget=10000", f"--screenshot={shot}")
    image = Image.open(shot)
    assert image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    box = pixels[y + 2:y + h - 2, x + 2:x + w - 2]
    # The shapes scene: coloured shapes on white. An image that did not render is the img's flat grey.
    saturated = (box.max(axis=2) - box.min(axis=2)) > 100
    assert saturated.sum() > 50, "no coloured shape where the first thumbnail should be"
    assert (box.min(axis=2) > 240).sum() > box.shape[0] * box.shape[1] // 4  # ...on a white canvas
    border = (pixels == ASSISTANT_BORDER).all(axis=2).sum()
    assert border > 200, "no assistant turn rendered in the screenshot"
