#!/usr/bin/env sh
# DPO runs in order, each from the previous one's final checkpoint (see config/dpo/):
#   sh script/dpo.sh                         # general, then medical -> out/dpo/<name>/final
#   sh script/dpo.sh medical --set beta=0.2
# Run names come first, extra arguments (anything starting with -) go to every `python dpo.py` call.
# Each run resumes after a kill; a finished run is not trained again.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RUNS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -*) break ;;
    *) RUNS="$RUNS $1"; shift ;;
  esac
done
[ -n "$RUNS" ] || RUNS="general medical"
for run in $RUNS; do
  echo "== dpo $run"
  "$PY" dpo.py "$run" "$@"
done
