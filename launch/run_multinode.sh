#!/usr/bin/env bash
# Multi-node launch: run this same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 CONFIG=configs/gpu_1b.yaml launch/run_multinode.sh
# MASTER_ADDR: a host name or address of the first node, reachable from all nodes;
# MASTER_PORT: the rendezvous port on it (default 29400); RDZV_ID: a job id shared by all nodes.
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
MASTER_PORT=${MASTER_PORT:-29400}
RDZV_ID=${RDZV_ID:-randlift}
CONFIG_ARGS=()
[[ -n "${CONFIG:-}" ]] && CONFIG_ARGS=(--config "$CONFIG")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "randlift_dist: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) nnodes=$NNODES nproc=$NPROC rdzv=$MASTER_ADDR:$MASTER_PORT"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
  --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  -m randlift_dist.train "${CONFIG_ARGS[@]}" "$@"
