"""The `rollwire` command line: one module per command group, all on one Typer app."""

from __future__ import annotations

from rollwire.cli import bench, render, rollout, serve, view  # noqa: F401  (each module registers its commands)
from rollwire.cli.app import app
from rollwire.cli.inputs import MAX_MESSAGES_FILE_BYTES, load_messages_file, read_json_file

__all__ = ["MAX_MESSAGES_FILE_BYTES", "app", "load_messages_file", "main", "read_json_file"]


def main() -> None:  # pragma: no cover
    app()
