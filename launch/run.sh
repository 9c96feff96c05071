#!/usr/bin/env bash
# Launch training on this node: checked first, restarted on a worker failure, errors said once.
#   NPROC=4 CONFIG=configs/teacher_mlp.yaml launch/run.sh parallel.lift_parallel=2 train.steps=100
# Extra arguments are dotted config overrides for `python -m randlift_dist.train`.
#
# Environment:
#   NPROC         processes on this node (default: the GPUs, or 2 on a CPU machine)
#   CONFIG        config file (default: the embedded tiny run)
#   MAX_RESTARTS  restarts of the job after a worker failure (default 3); each resumes from the
#                 latest checkpoint (train.resume=auto)
#   NNODES, MASTER_ADDR, MASTER_PORT (29400), RDZV_ID (randlift), LOCAL_ADDR, IS_HOST
#                 multi-node rendezvous: see launch/run_multinode.sh, which sets them and runs this
#   RDZV_JOIN_TIMEOUT  seconds the nodes wait for each other at a (re)start (default 900)
#
# This is a thin caller of `python -m randlift_dist.launcher` (`randlift-launch`), which does, in
# order: the trainer's checks once for NNODES x NPROC ranks (bad input: one line, status 2, nothing
# started); one torchrun launch per attempt (torch's public elastic_launch, its messages in
# <run.dir>/torchrun-<host>.log); after a failed attempt a decision from the workers' exit codes
# (2 bad input, 3 non-finite: stop at once; 75 stopped on request: stop; 1 or a signal: restart,
# said in one line); one message at the end. Exit statuses are the trainer's: 0 done, 1 failure,
# 2 bad input, 3 non-finite, 75 stopped with a checkpoint (Ctrl-C, SIGTERM: run the same command
# again to continue); 128 + signal if a stop signal came and no worker confirmed its checkpoint.
# Internal variables: RL_PREFLIGHT=0 skips the checks (done once for the whole job already),
# RL_REPORT=0 leaves the final message to the caller (one report for many nodes: slurm/lib.sh).
set -euo pipefail

rl_default_nproc() {
  python -c 'import torch; print(torch.cuda.device_count() or 2)'
}

NPROC="${NPROC:-$(rl_default_nproc)}"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC=$NPROC: use a positive integer" >&2; exit 2; }
MAX_RESTARTS="${MAX_RESTARTS:-3}"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "MAX_RESTARTS=$MAX_RESTARTS: use a non-negative integer" >&2; exit 2; }
JOIN="${RDZV_JOIN_TIMEOUT:-900}"
[[ "$JOIN" =~ ^[1-9][0-9]*$ ]] || { echo "RDZV_JOIN_TIMEOUT=$JOIN: use a positive number of seconds" >&2; exit 2; }
ARGS=(--nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" --join-timeout "$JOIN")
[[ "${RL_PREFLIGHT:-1}" == 0 ]] && ARGS+=(--no-preflight)
[[ "${RL_REPORT:-1}" == 0 ]] && ARGS+=(--no-report)
COMMIT="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "${NNODES:-}" ]]; then
  : "${MASTER_ADDR:?NNODES is set: set MASTER_ADDR to the rendezvous host too (or unset NNODES for one node)}"
  [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || { echo "NNODES=$NNODES: use a positive integer (or MIN:MAX)" >&2; exit 2; }
  case "${IS_HOST:-}" in
    "") ;;
    1|true) ARGS+=(--is-host 1) ;;
    0|false) ARGS+=(--is-host 0) ;;
    *) echo "IS_HOST=$IS_HOST: use 1 (this node hosts the rendezvous store) or 0" >&2; exit 2 ;;
  esac
  ARGS+=(--nnodes "$NNODES" --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${RDZV_ID:-randlift}")
  [[ -n "${LOCAL_ADDR:-}" ]] && ARGS+=(--local-addr "$LOCAL_ADDR")
  echo "randlift_dist: $COMMIT nnodes=$NNODES nproc=$NPROC rdzv=$MASTER_ADDR:${MASTER_PORT:-29400}" \
       "local_addr=${LOCAL_ADDR:-<hostname>} restarts=$MAX_RESTARTS config=${CONFIG:-<default>}"
else
  echo "randlift_dist: $COMMIT nproc=$NPROC restarts=$MAX_RESTARTS config=${CONFIG:-<default>}"
fi
[[ -n "${CONFIG:-}" ]] && ARGS+=(--config "$CONFIG")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"  # huge pages for big fresh CPU tensors
export PYTHONUNBUFFERED=1
exec python -m randlift_dist.launcher "${ARGS[@]}" "$@"
