"""docs/run-against-vllm.md runs as written, here against `rollwire serve` (the same wire as
vLLM; tests/integration/test_vllm.py runs it against the real server): its command samples the
write-an-environment page's environment through the server into a run directory, and its Python
block samples one conversation in both wire modes and checks they agree."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doc_blocks import files, python_with, rollwire_commands
from rollwire.store import RunReader

PAGE = "run-against-vllm.md"


def run_page(url: str, model: Path, workdir: Path, cache_dir: Path) -> dict[str, Any]:
    """Run the page's command and Python blocks against the server at `url`; return the namespace."""
    for name, body in files("write-an-environment.md").items():
        (workdir / name).write_text(body)
    [command] = rollwire_commands(PAGE, MODEL_DIR=str(model))
    command = [url if word == "http://127.0.0.1:8000" else word for word in command]
    env = {**os.environ, "ROLLWIRE_CACHE": str(cache_dir), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rollwire.cli", *command, "--no-progress"], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(RunReader(workdir / "runs" / "dots-vllm").rows())
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    namespace: dict[str, Any] = {}
    for k, code in enumerate(python_with(PAGE, URL=url, MODEL=str(model))):
        exec(compile(code, f"{PAGE}, python block {k + 1}", "exec"), namespace)
    return namespace


def test_the_page_runs_against_rollwire_serve(replicas: list[Any], tiny: Callable[[str], Path], tmp_path: Path,
                                              cache_dir: Path) -> None:
    namespace = run_page(replicas[0].url, tiny("qwen2_vl"), tmp_path, cache_dir)
    assert namespace["features"] == namespace["content_parts"] and len(namespace["features"]) >= 1
