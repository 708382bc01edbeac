#!/usr/bin/env bash
# Create .venv-baselines: the rollwire venv's packages plus the libraries the benchmarks compare
# against (renderers 0.1.12, the seed library; verifiers 0.4.0, whose client the e2e benchmark
# drives). They pin their own openai, so they live apart from .venv; a .pth file makes .venv's
# packages (rollwire, torch, transformers) importable too. Idempotent.
# Usage: setup_baselines.sh; then run benchmarks with .venv-baselines/bin/python -m rollwire.cli bench ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BASE=${ROLLWIRE_VENV:-.venv}
VENV=${ROLLWIRE_BASELINES_VENV:-.venv-baselines}
if [ ! -x "$BASE/bin/python" ]; then
  echo "no rollwire venv at $BASE: run scripts/setup.sh first" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$(cd "$base_site" && pwd)')" > "$site/zz_rollwire_venv.pth"
"$VENV/bin/python" -m pip install -q "verifiers==0.4.0" "renderers[multimodal]==0.1.12" \
  2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" -c "import renderers, verifiers, rollwire; print('baselines ready:', verifiers.__version__)"
