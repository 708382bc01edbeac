"""Environments, the multi-turn loop and the runner."""

from rollwire.rollout.env import Environment, EnvStep, Observation, env_names, make_env, register, resolve_env
from rollwire.rollout.loop import RolloutConfig, RolloutResult, run_rollout
from rollwire.rollout.rundir import run_to_dir
from rollwire.rollout.runner import RunConfig, RunSummary, run_manifest, run_rollouts
from rollwire.rollout.types import AssistantRecord, RolloutError, Step, ToolCallRecord, Trajectory

__all__ = [
    "AssistantRecord",
    "EnvStep",
    "Environment",
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
    "resolve_env",
    "run_manifest",
    "run_rollout",
    "run_rollouts",
    "run_to_dir",
]
