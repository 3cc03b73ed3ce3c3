#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs. Idempotent; used by quickstart.sh and test.sh.
#   bash script/setup.sh                 # Python packages
#   bash script/setup.sh --with-browser  # + Debian's chromium, chromium-driver, CJK fonts (the web page test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned exactly, so the requirement range below is already satisfied by the local CPU build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt
# Headless Chromium + its driver (the web chat page test, tests/test_serve.py) and CJK fonts for readable Chinese.
[ "${1:-}" = "--with-browser" ] || exit 0
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver fonts-noto-cjk >/dev/null
  else
    echo "setup.sh: no apt-get; install chromium, chromedriver and Noto CJK fonts yourself for the web page test" >&2
  fi
fi
