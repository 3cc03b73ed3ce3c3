#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs, at the exact versions of requirements.lock.
# Idempotent; used by quickstart.sh and test.sh.
#   bash script/setup.sh                 # Python packages
#   bash script/setup.sh --with-browser  # + Debian's chromium, chromium-driver, CJK fonts (the web page test)
#   bash script/setup.sh --with-llama-cpp  # + llama-cpp-python, compiled for this CPU (~10+ min on 2 cores, once
#                                          #   per environment): tests/test_gguf.py and bench/bench_decode.py
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0 WITH_LLAMA_CPP=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    --with-llama-cpp) WITH_LLAMA_CPP=1 ;;
    *) echo "setup.sh: unknown option $arg (--with-browser, --with-llama-cpp)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned exactly, so nothing after it reaches for another build. Which build pip takes depends on the
# machine: where a local torch 2.13.0 CPU wheel is on pip's path (this project's development and CI machines) it
# takes that; elsewhere PyPI's default build (with CUDA on Linux x86_64, several GB). For the CPU build elsewhere:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash script/setup.sh
.venv/bin/python -c "import torch" 2>/dev/null || \
  .venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple}
# Everything else at the locked versions (pyproject.toml says the ranges; script/lock.sh regenerates the lock).
.venv/bin/pip install -q -r requirements.lock
# llama.cpp's Python binding, built from the registry's source for this CPU only (no CUDA/Metal/Vulkan, no
# examples or server): the GGUF export is checked in llama.cpp itself. Skipped when it is already importable.
LLAMA_CPP_VERSION=0.3.36
if [ "$WITH_LLAMA_CPP" = 1 ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup.sh: building llama-cpp-python $LLAMA_CPP_VERSION (compiles llama.cpp: ~10+ minutes on 2 cores)" >&2
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip install -q "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
# Headless Chromium + its driver (the web chat page test, tests/test_serve.py) and CJK fonts for readable Chinese.
[ "$WITH_BROWSER" = 1 ] || exit 0
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver fonts-noto-cjk >/dev/null
  else
    echo "setup.sh: no apt-get; install chromium, chromedriver and Noto CJK fonts yourself for the web page test" >&2
  fi
fi
