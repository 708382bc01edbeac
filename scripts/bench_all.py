"""Regenerate docs/benchmarks.md from a fresh run of every benchmark (`rollwire bench all --write`).

Run with the baselines venv so every baseline is measured:
    .venv-baselines/bin/python scripts/bench_all.py [--quick] [--skip e2e]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rollwire.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", "all", "--write", str(ROOT / "docs" / "benchmarks.md"), *sys.argv[1:]])
