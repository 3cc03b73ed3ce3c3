#!/usr/bin/env sh
# GRPO with verifiable rewards (see config/grpo/), each task from its config's init_from checkpoint:
#   sh script/grpo.sh medical_choice                  # -> out/grpo/medical_choice/final
#   sh script/grpo.sh medical_qa --reward-url http://127.0.0.1:8000/v1 --set group_size=4
#   NPROC=2 sh script/grpo.sh medical_choice          # DDP via torchrun (each rank its own prompts)
# Task names come first, extra arguments (anything starting with -) go to every `python grpo.py` call.
# Each run resumes after a kill; a finished run is not trained again.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TASKS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -*) break ;;
    *) TASKS="$TASKS $1"; shift ;;
  esac
done
[ -n "$TASKS" ] || TASKS="medical_choice"
for task in $TASKS; do
  echo "== grpo $task"
  if [ "${NPROC:-1}" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" grpo.py "$task" "$@"
  else
    "$PY" grpo.py "$task" "$@"
  fi
done
