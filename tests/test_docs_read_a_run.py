"""docs/read-a-run.md runs as written: its `rollwire` command (in-process, the real CLI app and the
embedded engine) makes the run, then its Python blocks run in order in one namespace, in the folder
the command wrote to. The blocks check themselves (alignment asserts); this test checks a few of
the values they leave behind."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import doc_blocks
from rollwire.cli import app

PAGE = "read-a-run.md"


def blocks(language: str) -> list[str]:
    return doc_blocks.blocks(PAGE, language)


def test_read_a_run_doc_runs(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("ROLLWIRE_CACHE", str(cache_dir))  # the default tiny model, built once per cache
    monkeypatch.chdir(tmp_path)
    [command] = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("rollwire ")]
    result = CliRunner().invoke(app, [*shlex.split(command)[1:], "--no-progress"])
    assert result.exit_code == 0, result.output
    python = blocks("python")
    assert len(python) >= 4
    namespace: dict[str, object] = {}
    for k, code in enumerate(python):
        exec(compile(code, f"{PAGE}, python block {k + 1}", "exec"), namespace)
    samples = namespace["samples"]
    assert isinstance(samples, list) and len(samples) >= 4
    assert all(s.advantage is not None and s.position_ids is not None for s in samples)
    batch = namespace["batch"]
    assert isinstance(batch, dict) and batch["input_ids"].shape[0] == len(samples)
    groups = {s.group_id for s in samples}
    assert groups == {"shapes-s0-p0", "shapes-s0-p1"}
    for group in groups:  # GRPO advantages sum to zero within a group
        assert abs(sum(s.advantage for s in samples if s.group_id == group)) < 1e-6
    tensors = namespace["tensors"]
    assert isinstance(tensors, dict) and tensors["position_ids"].shape[1] == 4
    assert np.array_equal(tensors["input_ids"][tensors["attention_mask"].astype(bool)],
                          np.concatenate([s.input_ids for s in samples]))
