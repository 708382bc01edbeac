#!/usr/bin/env bash
# Debian's chromium, for the viewer's headless-browser test (tests/test_view_browser.py).
# Idempotent and instant when /usr/bin/chromium is already there; otherwise one apt-get install
# (as root, or through sudo when it is available).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup_browser.sh: chromium is missing and this user cannot apt-get install it (no root, no sudo)" >&2
    exit 1
  fi
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
test -x /usr/bin/chromium
