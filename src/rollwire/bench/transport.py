"""`rollwire bench transport`: trajectories packed for the trainer (refs + each unique image once)
against the naive record: JSON per step with every image of its prompt as base64 (no pickle).

The trajectories come from real rollouts (the tiny Qwen2-VL renderer, an instant engine): a
32-turn rollout with a new picture each turn, and a GRPO group of 16 sharing its prompt picture
(each member's later pictures its own).
floor = 4 B × (each step's new prompt tokens + completion tokens) + 4 B × logprobs + the uint8
pixels of each unique image.
"""

from __future__ import annotations

import asyncio
import base64
import json
from functools import partial
from typing import Any

from rollwire.bench.images import photo
from rollwire.bench.instant import Pictures, run_rollouts
from rollwire.bench.report import Report, Table, median_seconds
from rollwire.features import FeatureStore
from rollwire.render import create_renderer
from rollwire.rollout.types import Trajectory
from rollwire.tiny_model import ensure_tiny_model
from rollwire.transport.packing import pack, unpack


def floor_bytes(trajs: list[Trajectory], store: FeatureStore) -> int:
    tokens = logprobs = 0
    for traj in trajs:
        prev: list[int] | None = None
        for step in traj.steps:
            new = len(step.prompt_ids) - (len(prev) if prev is not None and step.bridged else 0)
            tokens += new + len(step.completion_ids)
            logprobs += len(step.completion_logprobs or ())
            prev = [*step.prompt_ids, *step.completion_ids]
    unique = {ref.id for t in trajs for s in t.steps for ref in s.images}
    return 4 * tokens + 4 * logprobs + sum(store.get(i).pixel_values.nbytes for i in unique)


def naive_json(trajs: list[Trajectory], store: FeatureStore) -> bytes:
    """One JSON line per step, each image of its prompt as base64 uint8 rows with its shape."""
    lines = []
    for traj in trajs:
        for step in traj.steps:
            images = []
            for ref in step.images:
                px = store.get(ref.id).pixel_values
                images.append({"id": ref.id, "shape": list(px.shape), "data": base64.b64encode(px.data).decode()})
            lines.append(json.dumps({"trajectory": traj.id, "prompt_ids": step.prompt_ids,
                                     "completion_ids": step.completion_ids, "logprobs": step.completion_logprobs,
                                     "images": images}))
    return "\n".join(lines).encode()


def _member_picture(side: int, member: int, turn: int) -> Any:
    """A GRPO member's picture: the group's shared prompt picture first, its own ones after."""
    return photo(side, side, seed=0 if turn == 0 else 1000 * (member + 1) + turn)


def shapes(quick: bool) -> dict[str, tuple[list[Trajectory], FeatureStore]]:
    model_dir = ensure_tiny_model("qwen2_vl")
    out = {}
    side = 112 if quick else 224
    linear_turns, group, group_turns = (4, 4, 2) if quick else (32, 16, 3)
    for name, envs, turns in (
        (f"linear-{linear_turns}", [Pictures(lambda k: photo(side, side, seed=k), linear_turns)], linear_turns),
        (f"grpo-{group}x{group_turns}", [Pictures(partial(_member_picture, side, i), group_turns)
                                         for i in range(group)], group_turns),
    ):
        renderer: Any = create_renderer(model_dir)
        results = asyncio.run(run_rollouts(renderer, envs, turns))
        trajs = [r.trajectory for r in results]
        if any(t.error is not None for t in trajs):
            raise RuntimeError(f"a {name} rollout failed: {next(t.error for t in trajs if t.error)}")
        out[name] = (trajs, renderer.feature_store)
    return out


def run(quick: bool = False) -> Report:
    table = Table(["shape", "trajectories / steps / unique images", "floor", "packed", "packed / floor",
                   "naive JSON", "naive / packed", "pack ms", "unpack ms", "naive JSON ms"])
    figures: dict[str, dict[str, float]] = {}
    repeat = 3 if quick else 5
    for name, (trajs, store) in shapes(quick).items():
        data = pack(trajs, store)
        if unpack(data).trajectories != trajs:
            raise AssertionError("pack/unpack changed the trajectories")
        naive = naive_json(trajs, store)
        floor = floor_bytes(trajs, store)
        t_pack = median_seconds(partial(pack, trajs, store), repeat)
        t_unpack = median_seconds(partial(unpack, data), repeat)
        t_naive = median_seconds(partial(naive_json, trajs, store), repeat)
        steps = sum(len(t.steps) for t in trajs)
        images = len({r.id for t in trajs for s in t.steps for r in s.images})
        table.add(name, f"{len(trajs)} / {steps} / {images}", f"{floor:,}", f"{len(data):,}",
                  f"{len(data) / floor:.3f}", f"{len(naive):,}", f"{len(naive) / len(data):.1f}×",
                  f"{t_pack * 1e3:.2f}", f"{t_unpack * 1e3:.2f}",
                  f"{t_naive * 1e3:.1f}")
        figures[name] = {"floor_bytes": floor, "packed_bytes": len(data), "naive_json_bytes": len(naive),
                         "packed_vs_floor": len(data) / floor, "naive_vs_packed": len(naive) / len(data),
                         "pack_ms": t_pack * 1e3, "unpack_ms": t_unpack * 1e3, "naive_json_ms": t_naive * 1e3}
    worst = max(f["packed_vs_floor"] for f in figures.values())
    return Report(
        name="transport", command="rollwire bench transport" + (" --quick" if quick else ""),
        summary=f"packed trajectories at worst {worst:.3f}× their byte floor; the naive per-step JSON resends images.",
        tables=[table],
        notes=["floor = 4 B × (each step's new prompt tokens + completion tokens) + 4 B × logprobs + the uint8 pixels "
               "of each unique image. naive JSON = one line per step with every image of its prompt as base64 uint8 "
               "rows. Trajectories from real rollouts of the tiny Qwen2-VL model against an instant engine; times "
               "are thread CPU medians. The packed bytes include the messages and metadata the floor leaves out."],
        figures={"shapes": figures, "worst_packed_vs_floor": worst},
    )
