#!/usr/bin/env sh
# The staged SFT curriculum: each stage starts from the previous stage's final checkpoint (see config/sft/).
#   sh script/sft.sh                                   # general medical medical_dialogue reasoning
#   sh script/sft.sh medical reasoning --set train.dtype=fp32
# Stage names come first, extra arguments (anything starting with -) go to every `python sft.py` call.
# Each stage resumes after a kill, and a finished stage is skipped, so re-running the script continues.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
STAGES=""
while [ $# -gt 0 ]; do
  case "$1" in
    -*) break ;;
    *) STAGES="$STAGES $1"; shift ;;
  esac
done
[ -n "$STAGES" ] || STAGES="general medical medical_dialogue reasoning"
for stage in $STAGES; do
  echo "== sft stage $stage"
  "$PY" sft.py "$stage" "$@"
done
