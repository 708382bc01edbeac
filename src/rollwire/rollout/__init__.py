"""Environments, the multi-turn loop and the runner."""

from rollwire.rollout.env import Environment, EnvStep, Observation, env_names, make_env, register
from rollwire.rollout.images import ArchivedImage, ImageArchive
from rollwire.rollout.loop import RolloutConfig, RolloutResult, run_rollout
from rollwire.rollout.runner import RunConfig, RunSummary, run_rollouts
from rollwire.rollout.types import AssistantRecord, RolloutError, Step, ToolCallRecord, Trajectory

__all__ = [
    "ArchivedImage",
    "AssistantRecord",
    "EnvStep",
    "Environment",
    "ImageArchive",
    "Observation",
    "RolloutConfig",
    "RolloutError",
    "RolloutResult",
    "RunConfig",
    "RunSummary",
    "Step",
    "ToolCallRecord",
    "Trajectory",
    "env_names",
    "make_env",
    "register",
    "run_rollout",
    "run_rollouts",
]
