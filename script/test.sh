#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh --with-browser --with-llama-cpp   # llama.cpp: tests/test_gguf.py (a one-time build)
exec .venv/bin/python -m pytest "$@"
