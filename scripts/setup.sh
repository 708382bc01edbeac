#!/usr/bin/env bash
# Create .venv and install rollwire with its local-engine and dev extras. Idempotent.
# torch is pinned to the CPU build this project is tested with (ROLLWIRE_TORCH overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ROLLWIRE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.rollwire-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==${ROLLWIRE_TORCH:-2.13.0}"
  "$VENV/bin/python" -m pip install -q -e ".[local,dev]"
  # The HF Qwen-VL processors (the parity tests' reference) need torchvision importable.
  bash scripts/install_torchvision_cpu.sh "$VENV/bin/python"
  touch "$stamp"
fi
