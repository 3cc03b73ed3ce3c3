#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs. Idempotent; used by quickstart.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned exactly, so the requirement range below is already satisfied by the local CPU build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt
