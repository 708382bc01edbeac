#!/usr/bin/env bash
# The test command: install what the tests need (rollwire's venv and the real vLLM CPU server's
# venv), then run the whole suite, the real-vLLM integration tier included.
# Quick run without the vLLM tier: .venv/bin/pytest -m "not vllm"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
export ROLLWIRE_REQUIRE_VLLM=1
exec .venv/bin/pytest "$@"
