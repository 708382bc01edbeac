#!/usr/bin/env bash
# Install torchvision's pure-Python parts next to a CPU torch build, for the HF processors.
#
# transformers >= 5 builds every Qwen-VL processor with a video processor that requires
# torchvision. PyPI's torchvision wheel is built against CUDA torch: next to the CPU build its
# C ops fail to register ("operator torchvision::nms does not exist"). Installing it without
# dependencies and importing its op registrations only when the C extension loaded leaves the
# pure-Python transforms usable (its C ops stay unavailable; rollwire does not use them).
# Usage: install_torchvision_cpu.sh PYTHON [VERSION]
set -euo pipefail
PY=$1
VERSION=${2:-0.28.0}
if "$PY" -c "import torchvision" >/dev/null 2>&1; then
  exit 0
fi
"$PY" -m pip install -q --no-deps "torchvision==$VERSION"
init=$("$PY" -c "import importlib.util as u; print(u.find_spec('torchvision').origin)")
"$PY" - "$init" <<'PYEOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
old = re.search(r"from torchvision import \(\n    _autograd_registrations,\n    _meta_registrations,\n", src)
if old:
    src = src.replace(old.group(0), "if extension._has_ops():\n"
                      "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
                      "from torchvision import (\n")
    open(path, "w").write(src)
PYEOF
"$PY" -c "import torchvision" || { echo "torchvision still fails to import" >&2; exit 1; }
