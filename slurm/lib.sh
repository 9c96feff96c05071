# Shared by train.sbatch and sweep.sbatch (sourced, never run): environment, log header, and the
# training step with preemption handling. Needs REPO (the repository root) and a SLURM job.
#
# Preemption / time limit: `#SBATCH --signal=B:USR1@T` makes SLURM send USR1 to the batch shell
# T seconds before the end. rl_run_step traps it, sends SIGTERM to the tasks of the training step
# (torchrun forwards SIGTERM to its workers; it does not handle USR1), waits for them to write a
# checkpoint and exit, then requeues the job (`scontrol requeue`), unless REQUEUE=0. The requeued
# job resumes from the latest checkpoint (train.resume=auto, the default).

# This job in SLURM's syntax: an array task's own SLURM_JOB_ID can equal the array's id, and
# `scancel <array id>` or `scontrol requeue <array id>` would hit every task of the array.
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  RL_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  RL_JOB="${SLURM_JOB_ID:-}"
fi

rl_setup() {
  cd "$REPO"
  # Site network settings (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, proxies, modules):
  # a file per cluster, never edited into the scripts. See slurm/site.env.example.
  local site="${SITE_ENV:-$REPO/slurm/site.env}"
  if [[ -f "$site" ]]; then
    # shellcheck disable=SC1090
    source "$site"
    RL_SITE="$site"
  elif [[ -n "${SITE_ENV:-}" ]]; then
    echo "SITE_ENV=$SITE_ENV: no such file" >&2
    exit 2
  else
    RL_SITE="none (no $site)"
  fi
  # Always run from the venv (ENVIRONMENT.md: mixing interpreters recompiles every DeepSpeed op).
  if [[ -n "${VENV:-}" ]]; then
    if [[ ! -f "$VENV/bin/activate" ]]; then
      echo "VENV=$VENV: no $VENV/bin/activate; set VENV to a virtual environment with randlift_dist installed" >&2
      exit 2
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  export PYTHONUNBUFFERED=1
}

rl_git_commit() {
  local sha
  sha=$(git -C "$REPO" rev-parse --short=10 HEAD 2>/dev/null) || { echo unknown; return; }
  if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    sha="$sha-dirty"
  fi
  echo "$sha"
}

# rl_header KEY=VALUE...: the top of the log, one fact per line.
rl_header() {
  echo "==== randlift_dist $(date -Is) ===="
  echo "commit:     $(rl_git_commit) ($REPO)"
  echo "job:        $RL_JOB (name ${SLURM_JOB_NAME:-?}, restart ${SLURM_RESTART_COUNT:-0}, partition ${SLURM_JOB_PARTITION:-?})"
  echo "allocation: nodes ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-?}); cpus/node ${SLURM_JOB_CPUS_PER_NODE:-?}; cpus/task ${SLURM_CPUS_PER_TASK:-unset}; gpus/node ${SLURM_GPUS_ON_NODE:-0}; tasks ${SLURM_NTASKS:-?}"
  local kv
  for kv in "$@"; do
    printf '%-11s %s\n' "${kv%%=*}:" "${kv#*=}"
  done
  echo "python:     $(command -v python) (VENV ${VENV:-unset}); site env: $RL_SITE"
  echo "requeue:    on USR1, $([[ "${REQUEUE:-1}" == 0 ]] && echo 'checkpoint and stop (REQUEUE=0)' || echo 'checkpoint and requeue')"
}

_rl_stop_requested=0
_rl_step_pid=""

_rl_on_usr1() {
  _rl_stop_requested=1
  echo "[$(date +%T)] USR1 (preemption or time limit): SIGTERM to the training step, which checkpoints and exits"
  local steps="" i
  for i in 1 2 3 4 5; do  # the step may still be registering
    steps=$(squeue -h --steps -j "$RL_JOB" -o %i 2>/dev/null | grep -E '\.[0-9]+$' || true)
    [[ -n "$steps" || -z "$_rl_step_pid" ]] && break
    kill -0 "$_rl_step_pid" 2>/dev/null || break
    sleep 1
  done
  if [[ -n "$steps" ]]; then
    # shellcheck disable=SC2086
    scancel --signal=TERM $steps
  else
    echo "no running training step to signal"
  fi
}

_rl_on_term() {
  # scancel / preemption: SLURM signals the step itself; keep waiting so the log shows its end.
  echo "[$(date +%T)] SIGTERM to the batch script: the job is ending; the training step checkpoints if it has time"
}

# rl_run_step CMD...: run `srun CMD...` as the training step, handle USR1, requeue when asked.
# Returns the step's exit status (when not requeued).
rl_run_step() {
  trap _rl_on_usr1 USR1
  trap _rl_on_term TERM
  echo "step:       srun $*"
  srun "$@" &
  _rl_step_pid=$!
  local rc
  while true; do
    wait "$_rl_step_pid"
    rc=$?
    # wait returns early (status > 128) when a trapped signal arrives; the step may still run
    kill -0 "$_rl_step_pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "[$(date +%T)] training step exited with status $rc"
  if [[ $_rl_stop_requested == 1 ]]; then
    if [[ "${REQUEUE:-1}" != 0 && $rc == 0 ]]; then
      echo "[$(date +%T)] requeueing $RL_JOB; the next start resumes from the latest checkpoint"
      scontrol requeue "$RL_JOB"  # ends this script
      sleep 60
    fi
    echo "not requeued (REQUEUE=${REQUEUE:-1}, step status $rc)"
  fi
  return "$rc"
}
