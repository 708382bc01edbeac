"""Built-in environments: `shapes` and `zoom` (drawn with Pillow, deterministic by seed), `dataset` (rows)."""

from rollwire.rollout.env import register
from rollwire.rollout.envs.dataset import DatasetEnv
from rollwire.rollout.envs.shapes import ShapesEnv
from rollwire.rollout.envs.zoom import ZoomEnv

register("dataset", DatasetEnv)
register("shapes", ShapesEnv)
register("zoom", ZoomEnv)

__all__ = ["DatasetEnv", "ShapesEnv", "ZoomEnv"]
