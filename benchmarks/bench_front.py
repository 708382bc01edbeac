"""The OpenAI front's own cost per call: a T-turn session (one new image per turn) through the
`openai` client, bridged (one session id) against rendered in full every call (no session id, the
baseline a stateless chat.completions server pays), over an instant scripted engine so only the
front's work (request parsing, image decoding, render or bridge, write-through) is measured.

Also reported: the run directory's bytes after the session (one row and shard record per call).
Run: python benchmarks/bench_front.py [--turns 8] [--side 448]
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
from PIL import Image

from rollwire.front import FrontServer
from rollwire.testing import ScriptedEngine
from rollwire.tiny_model import ensure_tiny_model


def data_url(side: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def session(front: FrontServer, turns: int, side: int, session_id: str | None, seed: int = 0) -> list[float]:
    """Seconds per call of one conversation that grows by a user image and the answer each turn."""
    api = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0,
                        default_headers={"X-Session-ID": session_id} if session_id else None)
    images = [data_url(side, seed + k) for k in range(turns)]  # unseen images: no feature-store hits
    messages: list[dict[str, Any]] = []
    seconds = []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[turn]}},
                                                     {"type": "text", "text": f"turn {turn}"}]})
        t0 = time.perf_counter()
        answer = api.chat.completions.create(model=front.served_model_name, messages=messages)  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - t0)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--side", type=int, default=448)
    args = parser.parse_args()
    model = ensure_tiny_model("qwen2_vl")
    with tempfile.TemporaryDirectory() as run:
        with FrontServer(model, run_dir=run, port=0,
                         make_engine=lambda r: ScriptedEngine(r, lambda request, turn: "Fine.")) as front:
            session(front, 2, 64, "warm-up", seed=10**6)
            bridged = session(front, args.turns, args.side, "bridged", seed=0)
            full = session(front, args.turns, args.side, None, seed=10**3)
        size = sum(p.stat().st_size for p in Path(run).rglob("*") if p.is_file())
    print(f"front, {args.turns} turns, one new {args.side}² image per turn (instant engine):")
    print(f"  bridged (X-Session-ID): turn 1 {bridged[0] * 1e3:.0f} ms, turn {args.turns} {bridged[-1] * 1e3:.0f} ms, "
          f"total {sum(bridged):.2f} s")
    print(f"  full render every call: turn 1 {full[0] * 1e3:.0f} ms, turn {args.turns} {full[-1] * 1e3:.0f} ms, "
          f"total {sum(full):.2f} s ({sum(full) / sum(bridged):.2f}x)")
    print(f"  run directory after both: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
