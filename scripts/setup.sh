#!/usr/bin/env bash
# Create .venv and install rollwire with its local-engine and dev extras. Idempotent.
# torch is pinned to the CPU build this project is tested with (ROLLWIRE_TORCH overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
# This machine's pip lists file:// indices that may not exist: keep their warnings out of the log.
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
PY=${PYTHON:-python3}
VENV=${ROLLWIRE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.rollwire-installed"
# setup.py and the C file: the editable install builds rollwire.features._simd in place, once
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ src/rollwire/features/_simd.c -nt "$stamp" ]; then
  pip_install --upgrade pip
  pip_install "torch==${ROLLWIRE_TORCH:-2.13.0}"
  pip_install -e ".[local,dev,datasets,ray]"
  # The HF Qwen-VL processors (the parity tests' reference) need torchvision importable.
  bash scripts/install_torchvision_cpu.sh "$VENV/bin/python"
  touch "$stamp"
fi
