"""Transport: codec MB/s against pickle (protocol 5, side by side in one process) and how close
packed batches come to their byte floor for four rollout shapes.

The shapes are built by the same code as tests/test_transport.py (real Qwen2-VL features of
small random images, prompts that grow turn by turn), so the ratios match the tests'.
floor = 4 B x (each step's new prompt tokens + completion tokens) + 4 B x logprobs + the uint8
pixel bytes of each unique image. The floor leaves out the steps' text (parsed messages);
the "with text" column adds ~3.5 characters of content per completion token and the
trajectory's OpenAI messages, to show what realistic text costs on top.
Run: python benchmarks/bench_transport.py
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import msgspec
import numpy as np
from _report import median_seconds, write_section

from rollwire.features import FeatureStore, VisionConfig
from rollwire.rollout.types import AssistantRecord, Trajectory
from rollwire.transport.codec import decode, encode
from rollwire.transport.packing import pack, unpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_transport import SHAPES, Rollouts

COMMAND = "python benchmarks/bench_transport.py"


def _with_text(traj: Trajectory, rng: np.random.Generator) -> Trajectory:
    """The trajectory with realistic text: content ~3.5 chars per completion token, and messages."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    steps, messages = [], []
    for step in traj.steps:
        text = rng.choice(letters, int(3.5 * len(step.completion_ids))).tobytes().decode()
        steps.append(msgspec.structs.replace(step, message=AssistantRecord(content=text)))
        messages += [{"role": "user", "content": [{"type": "text", "text": text[: len(text) // 3]}]},
                     {"role": "assistant", "content": text}]
    return msgspec.structs.replace(traj, steps=steps, messages=messages)


def codec_rows() -> list[str]:
    arr = np.random.default_rng(0).standard_normal((4096, 1176)).astype(np.float32)
    mb = arr.nbytes / 1e6
    ours, theirs = encode(arr), pickle.dumps(arr, protocol=5)
    assert np.array_equal(decode(ours), arr) and np.array_equal(pickle.loads(theirs), arr)
    timings = {
        "encode": (median_seconds(lambda: encode(arr)), median_seconds(lambda: pickle.dumps(arr, protocol=5))),
        "decode (codec: zero-copy view)": (median_seconds(lambda: decode(ours)),
                                           median_seconds(lambda: pickle.loads(theirs))),
        "decode + own copy (codec: np.array of the view)": (median_seconds(lambda: np.array(decode(ours))),
                                                            median_seconds(lambda: pickle.loads(theirs))),
    }
    rows = ["| float32 (4096, 1176), 19.3 MB | rollwire codec MB/s | pickle 5 MB/s | codec / pickle |",
            "|---|---|---|---|"]
    for op, (t_ours, t_pickle) in timings.items():
        rows.append(f"| {op} | {mb / t_ours:,.0f} | {mb / t_pickle:,.0f} | {t_pickle / t_ours:.2f}× |")
    rows.append(f"| bytes | {len(ours):,} | {len(theirs):,} | |")
    return rows


def shape_rows() -> list[str]:
    store = FeatureStore(VisionConfig.qwen2_vl())
    rows = ["| shape | trajectories / steps / unique images | floor B | packed B | bytes / floor "
            "| with text: bytes / floor | pack ms | unpack ms |",
            "|---|---|---|---|---|---|---|---|"]
    for name, build in SHAPES.items():
        r = build(Rollouts(store, np.random.default_rng(len(name))))
        trajs = r.trajectories
        data = pack(trajs, store)
        assert unpack(data).trajectories == trajs
        floor = r.floor()
        texted = [_with_text(t, np.random.default_rng(i)) for i, t in enumerate(trajs)]
        with_text = len(pack(texted, store))
        t_pack = median_seconds(lambda trajs=trajs: pack(trajs, store), repeat=5)
        t_unpack = median_seconds(lambda data=data: unpack(data), repeat=5)
        steps = sum(len(t.steps) for t in trajs)
        images = len({i for t in trajs for i in t.image_ids})
        rows.append(f"| {name} | {len(trajs)} / {steps} / {images} | {floor:,} | {len(data):,} | "
                    f"{len(data) / floor:.4f} | {with_text / floor:.4f} | {t_pack * 1e3:.2f} | {t_unpack * 1e3:.2f} |")
    return rows


def main() -> None:
    body = "\n".join([
        *codec_rows(),
        "",
        "Decoding returns a read-only numpy view of the input buffer (no copy), so its MB/s is the cost "
        "of parsing and checking the header; pickle copies the array out. The third row copies the view "
        "into an owned array, for a like-for-like comparison. Encoding copies the bytes twice (header + "
        "payload, then into msgpack's output); pickle 5 copies once.",
        "",
        *shape_rows(),
        "",
        "floor = 4 B × (each step's new prompt tokens + completion tokens) + 4 B × logprobs + the uint8 "
        "pixels of each unique image. \"with text\" adds ~3.5 characters of message content per "
        "completion token and the OpenAI messages (stored zlib-compressed), which the floor leaves out.",
    ])
    print(body)
    write_section("transport", COMMAND, body)


if __name__ == "__main__":
    main()
