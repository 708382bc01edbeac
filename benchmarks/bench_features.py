"""Image hashing and the feature store: what a stored image costs against processing it.

Ratios are taken side by side in one process (this machine is shared and noisy).
Run: python benchmarks/bench_features.py
"""

from __future__ import annotations

import numpy as np
from _report import median_seconds, write_section
from PIL import Image

from rollwire.features import FeatureStore, VisionConfig, compute_features
from rollwire.images import image_hash, to_rgb

COMMAND = "python benchmarks/bench_features.py"


def main() -> None:
    config = VisionConfig.qwen2_vl()
    rng = np.random.default_rng(0)
    rows = []
    for side in (256, 512, 1024):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        rgb = to_rgb(image)
        t_hash = median_seconds(lambda rgb=rgb: image_hash(rgb, config.fingerprint()))
        t_process = median_seconds(lambda rgb=rgb: compute_features(rgb, config))
        store = FeatureStore(config)
        store.get_or_process(image)
        t_hit = median_seconds(lambda store=store, image=image: store.get_or_process(image))
        feats = store.get_or_process(image)
        as_float = feats.normalized(config).nbytes
        rows.append((side, t_hash * 1e3, t_process * 1e3, t_hit * 1e3, t_hit / t_process,
                     feats.nbytes / 2**20, as_float / feats.nbytes))
    lines = ["| image | hash ms | process (miss) ms | stored (hit) ms | hit / miss | uint8 MiB | float32 / uint8 |",
             "|---|---|---|---|---|---|---|"]
    for side, h, p, hit, ratio, mib, fr in rows:
        lines.append(f"| {side}² RGB | {h:.2f} | {p:.2f} | {hit:.2f} | {ratio:.2f} | {mib:.2f} | {fr:.1f}× |")
    body = "\n".join(lines) + (
        "\n\nA hit costs the hash plus converting the PIL image to RGB bytes; a miss adds resizing and"
        " patchifying. Features are stored as uint8 patch rows; normalised float32 is 4× larger.")
    print(body)
    write_section("features", COMMAND, body)


if __name__ == "__main__":
    main()
