"""The row files: one honest-JSON line per finished rollout, the commit record. Readers merge the
single writer's `rollouts.jsonl` with each worker's `rollouts-<w>.jsonl`; a rollout's newest row
wins, and a writer reopening its file cuts off the partial line a crash left."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rollwire.errors import StoreError
from rollwire.rollout.types import Trajectory
from rollwire.store.files import open_regular, os_error, read_file

ROWS = "rollouts.jsonl"
WORKER = re.compile(r"[A-Za-z0-9_]{1,32}")
_WORKER_ROWS = re.compile(r"rollouts-([A-Za-z0-9_]{1,32})\.jsonl")


def honest_json(row: Mapping[str, Any]) -> str:
    """One JSON line; a value JSON cannot hold honestly (NaN, inf, bytes, objects) names its column."""
    for key, value in row.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"column {key!r} is not JSON: {exc}") from None
    return json.dumps(row, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def trajectory_row(t: Trajectory) -> dict[str, Any]:
    prompt_tokens = sum(len(s.prompt_ids) for s in t.steps)
    completion_tokens = sum(len(s.completion_ids) for s in t.steps)
    return {
        "id": t.id, "env": t.env, "prompt_index": t.prompt_index, "sample_index": t.sample_index, "seed": t.seed,
        "reward": t.reward, "rewards": t.rewards, "finish": t.finish,
        "error": None if t.error is None else {"kind": t.error.kind, "message": t.error.message, "step": t.error.step},
        "turns": len(t.steps), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "image_ids": t.image_ids, "messages": t.messages, "tools": t.tools, "metrics": t.metrics,
        "env_info": t.env_info,
    }


def parse_row(line: bytes, n: int, name: str) -> dict[str, Any]:
    """One row: a JSON object with a string id, or a StoreError naming the line."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise StoreError(f"{name}:{n} is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StoreError(f"{name}:{n} is not JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(row, dict):
        raise StoreError(f"{name}:{n} is a JSON {type(row).__name__}, not a rollout row")
    if not isinstance(row.get("id"), str) or not row["id"]:
        raise StoreError(f"{name}:{n} has no string id")
    return row


def row_files(root: Path) -> list[Path]:
    """The run's row files in merge order: the single writer's, then each worker's by name."""
    workers = sorted(p for p in root.glob("rollouts-*.jsonl") if _WORKER_ROWS.fullmatch(p.name))
    return [p for p in (root / ROWS, *workers) if os.path.lexists(p)]


def _cut_partial_line(path: Path) -> int:
    """Cut a partial last line (a crash mid-write) off `path`; the bytes kept."""
    data = read_file(path)
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        fd = open_regular(path, os.O_WRONLY, "repair")
        try:
            os.ftruncate(fd, keep)
        except OSError as exc:
            raise os_error(exc, f"repair {path}") from None
        finally:
            os.close(fd)
    return keep


def done_ids(root: Path, own: str, *, repair_all: bool) -> tuple[set[str], int]:
    """(ids whose newest row, over every row file, is a success; bytes of `own` kept). `own`'s
    partial last line is cut off (every file's when `repair_all`: no other writer is running);
    another writer's line being written is not read. A failed rollout is not done: a resume runs it again."""
    newest: dict[str, dict[str, Any]] = {}
    kept = 0
    for path in row_files(root):
        if repair_all or path.name == own:
            keep = _cut_partial_line(path)
            kept = keep if path.name == own else kept
            data = read_file(path)[:keep]
        else:
            data = read_file(path)
            data = data[:data.rfind(b"\n") + 1]
        merge_rows(newest, (parse_row(line, n, path.name) for n, line in enumerate(data.splitlines(), 1)))
    return {i for i, row in newest.items() if row.get("error") is None}, kept


def merge_rows(newest: dict[str, dict[str, Any]], rows: Iterator[dict[str, Any]]) -> None:
    """Keep each id's newest row: a success supersedes any failure (a done id is never run again),
    and among failures (or successes) the later one wins."""
    for row in rows:
        old = newest.get(row["id"])
        if old is None or row.get("error") is None or old.get("error") is not None:
            newest[row["id"]] = row


def read_rows(root: Path, *, all_rows: bool = False) -> Iterator[dict[str, Any]]:
    """The newest row of each rollout over every row file, in merge order (`RunReader.rows`)."""
    parsed: list[dict[str, Any]] = []
    for path in row_files(root):
        lines = read_file(path).split(b"\n")
        if lines[-1]:
            raise StoreError(f"{path.name}:{len(lines)} is truncated")
        parsed.extend(parse_row(line, n, path.name) for n, line in enumerate(lines[:-1], 1))
    newest: dict[str, dict[str, Any]] = {}
    merge_rows(newest, iter(parsed))
    for row in parsed:
        if all_rows:
            yield row | {"superseded": newest[row["id"]] is not row}
        elif newest[row["id"]] is row:
            yield row
