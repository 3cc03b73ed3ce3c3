#!/usr/bin/env bash
# The whole pipeline on the project's embedded sample corpora, tiny preset, CPU, in minutes:
#   data (read, clean, dedup, tokenizer, token shards, SFT/DPO staging) -> the four pretraining phases ->
#   the SFT stages -> a few DPO steps -> eval -> one medical question answered through the chat template.
# Every line below also runs on its own. Re-running continues: finished steps are kept (rm -rf data out to redo).
# QS_TOKENS sets the pretraining token budget (default 2M: a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh
PY=.venv/bin/python
export PYTHON=$PY
START=$(date +%s)
step() { printf '\n=== %s  [%ss]\n' "$*" "$(( $(date +%s) - START ))"; }

TINY="--seq-len 256 --batch-size 16 --grad-accum 1"   # the tiny preset's context is 256 tokens

step "1/6 data: python data_process.py"
$PY data_process.py

step "2/6 pretraining: sh script/pretrain.sh <phase> (warmup, stable, anneal, converge)"
for phase in warmup stable anneal converge; do
  sh script/pretrain.sh "$phase" --preset tiny --total-tokens "${QS_TOKENS:-2000000}" $TINY \
    --eval-interval 100 --save-interval 200
done

step "3/6 SFT: sh script/sft.sh (general, medical, medical_dialogue with LoRA, reasoning)"
sh script/sft.sh $TINY --lr 1e-3 --eval-interval 50 --save-interval 100

step "4/6 DPO: sh script/dpo.sh general (a few steps)"
sh script/dpo.sh general --steps 8 --seq-len 256 --batch-size 4 --grad-accum 1

step "5/6 eval: base vs chat model"
$PY eval.py out/pretrain/converge/final out/dpo/general/final --shots 0,2 --max-new-tokens 48 \
  --out out/eval/quickstart

step "6/6 a medical question, through the chat template"
$PY chat.py out/dpo/general/final --prompt "高血压患者平时要注意什么？" --temperature 0 --repetition-penalty 1.3 --max-new-tokens 96

step "done"
cat <<EOF
Where everything is:
  data/summary.json                 records read / kept / rejected by reason, dedup, tokens, staging
  data/rejects/<corpus>.jsonl       every rejected record with file, line and reason
  data/tokenizer/                   the SentencePiece tokenizer + special ids + chat template
  data/pretrain/<corpus>/           uint16 .bin + Megatron .idx token shards (python data_process.py inspect data/pretrain)
  data/sft/*.csv, data/dpo/*.jsonl  staged SFT conversations and preference pairs
  out/pretrain/<phase>/             checkpoints, metrics.jsonl, metrics.png per curriculum phase
  out/sft/<stage>/, out/dpo/general/  fine-tuned checkpoints (LoRA adapter in out/sft/medical_dialogue/)
  out/eval/quickstart/              compare.md / compare.json: bits per char, C-Eval/CMMLU, samples
Next: python chat.py out/dpo/general/final   |   python serve.py out/dpo/general/final   |   docs/scaling.md
EOF
