#!/usr/bin/env bash
# The test command: install what the tests need (rollwire's venv and the real vLLM CPU server's
# venv, Debian's chromium for the viewer's browser test), then run the whole suite, the real-vLLM
# integration tier and the browser test included.
# Quick run without the vLLM tier: .venv/bin/pytest -m "not vllm"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
bash scripts/setup_browser.sh
export ROLLWIRE_REQUIRE_VLLM=1 ROLLWIRE_REQUIRE_BROWSER=1
exec .venv/bin/pytest "$@"
