"""`rollwire rollout`'s settings, one typed record: from a TOML file, flags on top.

Every flag of `rollwire rollout` is a key of the file (`max_turns` or `max-turns`; `env_args`
a table). Flags given on the command line override the file; an unknown key or a value of the
wrong type is a `ConfigFileError` naming the key. Paths are taken as given, relative to the
current directory, as on the command line.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic

from rollwire.errors import ConfigFileError, RolloutConfigError


class RolloutSettings(pydantic.BaseModel):
    """The resolved configuration of a `rollwire rollout` run (recorded in its `run.json`)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    env: str | None = None
    env_args: dict[str, Any] = {}
    out: str | None = None
    model: str | None = None
    server: str | list[str] | None = None  # several: a pool (session affinity, failover)
    servers_file: str | None = None  # more server URLs, one a line
    workers: Annotated[int, pydantic.Field(ge=1)] | None = None  # Ray rollout workers
    ray_address: str | None = None
    served_name: str | None = None
    prompts: Annotated[int, pydantic.Field(ge=1)] = 8
    group: Annotated[int, pydantic.Field(ge=1)] = 2
    max_turns: Annotated[int, pydantic.Field(ge=1)] = 4
    max_tokens: Annotated[int, pydantic.Field(ge=1)] = 32
    max_total_tokens: Annotated[int, pydantic.Field(ge=1)] = 4096
    temperature: Annotated[float, pydantic.Field(ge=0.0)] = 1.0
    concurrency: Annotated[int, pydantic.Field(ge=1)] = 8
    seed: int = 0
    retry_deadline: Annotated[float, pydantic.Field(ge=0.0)] = 60.0
    progress: bool = True
    wire: Literal["features", "content-parts", "content_parts", "auto"] = "auto"  # how images reach a server
    group_requests: bool = False  # a group's shared first prompt as one n = group request

    def server_urls(self) -> list[str]:
        """`server` (one or a list) and the lines of `servers_file`, in that order."""
        from rollwire.engines.pool import read_servers_file

        urls = [self.server] if isinstance(self.server, str) else list(self.server or [])
        if self.servers_file is not None:
            try:
                urls += read_servers_file(Path(self.servers_file).read_text())
            except OSError as exc:
                raise RolloutConfigError(f"cannot read --servers-file {self.servers_file}: "
                                         f"{exc.strerror or exc}") from None
        return urls

    def record(self) -> dict[str, Any]:
        """JSON-able, for the manifest."""
        return self.model_dump(mode="json")


DEFAULTS = RolloutSettings()
ALIASES = {"n": "prompts"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file (keys normalised: `-` to `_`), not yet validated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"config file {path} is not TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        out[ALIASES.get(name, name)] = value
    return out


def resolve_settings(file_values: Mapping[str, Any], flags: Mapping[str, Any], *,
                     source: str = "config file") -> RolloutSettings:
    """The file's values with `flags` (those given on the command line) on top, validated."""
    merged = {**file_values, **flags}
    try:
        settings = RolloutSettings.model_validate(merged)
    except pydantic.ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            key = ".".join(map(str, e["loc"])) or "settings"
            where = "flag" if e["loc"] and e["loc"][0] in flags else source
            problems.append(f"unknown key {key!r}" if e["type"] == "extra_forbidden" else f"{key}: {e['msg']}")
            problems[-1] += f" ({where})"
        raise ConfigFileError("; ".join(problems)) from None
    missing = [k for k in ("env", "out") if getattr(settings, k) is None]
    if missing:
        raise RolloutConfigError(" and ".join(f"--{k}" for k in missing) + " must be given (as a flag or in --config)")
    return settings


def parse_env_args(text: str) -> dict[str, Any]:
    """`--env-args`: a JSON object of keyword arguments for the environment's factory."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolloutConfigError(f"--env-args is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RolloutConfigError(f"--env-args must be a JSON object, got {type(value).__name__}")
    return value
