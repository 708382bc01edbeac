"""A short crash soak (the long one is `scripts/crash_soak.py`): a real `rollwire rollout` is
SIGKILLed three times at random moments and resumed; no committed row may be lost, and the
finished run must equal a clean uninterrupted one wherever the run is deterministic."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rollwire.store import ROWS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash_soak.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_soak"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


cs = _load_script()


@pytest.fixture(scope="module")
def soaked(cache_dir: Path, tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny("qwen2_vl")
    out = tmp_path_factory.mktemp("soak")
    settings = cs.Settings(prompts=1, group=2, max_turns=2, max_tokens=2, concurrency=2)
    return cs.soak(3, 7, out, settings, cache=cache_dir, log=lambda _: None), out


def test_three_kills_lose_nothing_and_the_resumed_run_equals_a_clean_one(soaked: Any) -> None:
    report, out = soaked
    assert report.ok, report.table()
    assert report.kills == 3 and report.lost == 0
    killed = [a for a in report.attempts if a.killed]
    assert all(a.returncode == -9 for a in killed)
    final = report.attempts[-1]
    assert not final.killed and final.returncode == 0 and final.rows_after == 2
    # each committed row is on disk once, and both rollouts match the clean run token for token
    ids = [json.loads(line)["id"] for line in (out / "run" / ROWS).read_text().splitlines()]
    assert sorted(ids) == ["shapes-s0-p0-g0", "shapes-s0-p0-g1"]
    assert report.comparison["equal"] == 2 and report.comparison["tokens"] > 0
    assert report.comparison["max_logprob_diff"] <= cs.LOGPROB_TOLERANCE


def test_the_checks_see_a_lost_row_a_bad_record_a_changed_rollout_and_a_write_outside(soaked: Any,
                                                                                       tmp_path: Path) -> None:
    """The soak's checks are not vacuous: each kind of damage it must catch is caught."""
    _, out = soaked
    run = shutil.copytree(out / "run", tmp_path / "run")
    committed = (run / ROWS).read_bytes()
    lines = committed.splitlines(keepends=True)
    _, lost, _, problems = cs.check_run(run, committed)  # leftovers (a shard tail a kill left) are allowed
    assert lost == 0 and problems == []

    (run / ROWS).write_bytes(b"".join(lines[1:]))  # a committed row disappeared
    assert cs.check_run(run, committed)[1] == 1

    row = json.loads(lines[0])
    shard = run / "shards" / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run / ROWS).write_bytes(committed)
    problems = cs.check_run(run, committed)[3]
    assert any("does not read back" in p and "CRC" in p for p in problems), problems

    shutil.rmtree(run)
    run = shutil.copytree(out / "run", tmp_path / "run")
    row["seed"] += 1  # a field the clean run fixes
    (run / ROWS).write_bytes((json.dumps(row) + "\n").encode() + b"".join(lines[1:]))
    stats, problems = cs.compare_with_clean(run, out / "clean", 2)
    assert stats["equal"] == 1 and any(row["id"] in p and "differs" in p for p in problems), problems

    before = cs._snapshot([out], [out / "run", out / "clean", out / "logs"])
    (out / "home" / "stray").write_text("x")
    try:
        assert cs._diff(before, cs._snapshot([out], [out / "run", out / "clean", out / "logs"])) == [
            f"created outside the run directory: {out / 'home' / 'stray'}"]
    finally:
        (out / "home" / "stray").unlink()
