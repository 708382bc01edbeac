"""Built-in environments, drawn with Pillow and deterministic by seed."""

from rollwire.rollout.env import register
from rollwire.rollout.envs.shapes import ShapesEnv
from rollwire.rollout.envs.zoom import ZoomEnv

register("shapes", ShapesEnv)
register("zoom", ZoomEnv)

__all__ = ["ShapesEnv", "ZoomEnv"]
