#!/usr/bin/env bash
# Single-node launch with torchrun.
#   NPROC=4 CONFIG=configs/teacher_mlp.yaml launch/run.sh parallel.lift_parallel=2 train.steps=100
# NPROC: processes on this node (default: GPUs, or 2 on a CPU machine); CONFIG: config file
# (default: the embedded tiny run). Extra arguments are dotted config overrides.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
CONFIG_ARGS=()
[[ -n "${CONFIG:-}" ]] && CONFIG_ARGS=(--config "$CONFIG")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "randlift_dist: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) nproc=$NPROC config=${CONFIG:-<default>}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m randlift_dist.train "${CONFIG_ARGS[@]}" "$@"
