#!/bin/sh
# One pretraining curriculum phase, continuing from the previous phase's out/pretrain/<prev>/final/:
#   sh script/pretrain.sh warmup|stable|anneal|converge|all [pretrain.py flags, e.g. --preset tiny]
# Re-running a phase resumes it from its latest checkpoint. Several GPUs or nodes (DDP via torchrun):
#   NPROC=8 sh script/pretrain.sh stable
#   NPROC=8 NNODES=2 NODE_RANK=0 MASTER=host:29500 sh script/pretrain.sh stable   (on each node)
set -eu
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: sh script/pretrain.sh <warmup|stable|anneal|converge|all> [pretrain.py flags]" >&2
    exit 2
fi
phase=$1
shift
if [ "$phase" = all ]; then which="--all"; else which="--phase=$phase"; fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NPROC=${NPROC:-1}
NNODES=${NNODES:-1}
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    if [ "$NNODES" -gt 1 ]; then
        exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES" \
            --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d --rdzv_endpoint "${MASTER:?set MASTER=host:port}" \
            pretrain.py "$which" "$@"
    fi
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain.py "$which" "$@"
fi
exec "$PYTHON" pretrain.py "$which" "$@"
