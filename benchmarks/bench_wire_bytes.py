"""Request bytes of a multi-turn image rollout: rollwire (uint8, images the server holds sent by id)
against the naive path (every image re-sent every turn as normalised float32), side by side.

Run: python benchmarks/bench_wire_bytes.py
"""

from __future__ import annotations

import time

import numpy as np
from _report import write_section
from PIL import Image

from rollwire.engines.wire import features_payload
from rollwire.features import FeatureStore, VisionConfig
from rollwire.render.types import ImageRef

COMMAND = "python benchmarks/bench_wire_bytes.py"


def run(turns: int, side: int) -> tuple[int, int, int, float, float]:
    config = VisionConfig.qwen2_vl(max_pixels=side * side)
    store = FeatureStore(config)
    rng = np.random.default_rng(0)
    refs: list[ImageRef] = []
    naive = uint8_all = ours = 0
    t_naive = t_ours = 0.0
    held: set[str] = set()
    offset = 10
    for _ in range(turns):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        f = store.get_or_process(image)
        refs.append(ImageRef(f.id, offset, f.num_tokens, f.grid_thw))
        offset += f.num_tokens + 20
        t = time.perf_counter()
        _, b = features_payload(refs, store, pixel_format="float32")
        t_naive += time.perf_counter() - t
        naive += b
        _, b = features_payload(refs, store, pixel_format="uint8")
        uint8_all += b
        t = time.perf_counter()
        _, b = features_payload(refs, store, pixel_format="uint8", by_id_only=held)
        t_ours += time.perf_counter() - t
        ours += b
        held.add(f.id)
    return naive, uint8_all, ours, t_naive, t_ours


def main() -> None:
    lines = ["| turns × image | naive: all images, float32 | all images, uint8 | rollwire: uint8, new images only "
             "| naive / rollwire bytes | payload build s (naive / rollwire) |", "|---|---|---|---|---|---|"]
    for turns, side in ((8, 448), (16, 448), (32, 224), (8, 1008)):
        naive, u8, ours, tn, to = run(turns, side)
        lines.append(f"| {turns} × {side}² | {naive / 2**20:.1f} MiB | {u8 / 2**20:.1f} MiB | {ours / 2**20:.1f} MiB "
                     f"| {naive / ours:.1f}× | {tn:.2f} / {to:.2f} |")
    body = "\n".join(lines) + (
        "\n\nBytes of the base64 `kwargs_data` items summed over the turns of one linear rollout with one new "
        "image per turn. rollwire's total grows with unique images (O(turns)); re-sending grows O(turns²).")
    print(body)
    write_section("wire bytes", COMMAND, body)


if __name__ == "__main__":
    main()
