# shellcheck shell=bash
# Shared by train.sbatch and sweep.sbatch (sourced, never run): environment, log header, the
# preflight, the training step with preemption handling, and the one failure report. Needs REPO
# (the repository root: site.env, the commit, launch/run.sh) and a SLURM job. The working
# directory stays the job's (the submission directory by default).
#
# Preemption / time limit: `#SBATCH --signal=B:USR1@T` makes SLURM send USR1 to the batch shell
# T seconds before the end. rl_run_step traps it, sends SIGTERM to the tasks of the training step
# (the launcher forwards SIGTERM to its workers once; a plain `srun python -m randlift_dist.train`
# task gets it directly), waits for them to write a checkpoint and exit (status 75: stopped with a
# checkpoint), then requeues the job (`scontrol requeue`), unless REQUEUE=0. The requeued job
# resumes from the latest checkpoint (train.resume=auto, the default).
#
# Errors: rl_preflight checks the config and the layout once, in the batch shell, before any
# step starts (bad input: the trainer's one line, status 2), and exports RANDLIFT_LAUNCH_ID, the
# id that every node's launcher hands its workers and rank 0 writes into exit_status.json;
# rl_finish explains a failed step once: the trainer's `<run.dir>/exit_status.json` message of
# this launch, or the last lines of each node's agent log (`<run.dir>/torchrun-<host>.log`). Both
# are `python -m randlift_dist.launcher` (`--check-only`, `--report`).

# This job in SLURM's syntax: an array task's own SLURM_JOB_ID can equal the array's id, and
# `scancel <array id>` or `scontrol requeue <array id>` would hit every task of the array.
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  RL_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  RL_JOB="${SLURM_JOB_ID:-}"
fi

rl_setup() {
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
  # Always run from the venv (mixing interpreters makes DeepSpeed recompile every JIT-built op).
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
_rl_interrupted=0
_rl_step_pid=""
# a USR1 during setup (a time limit shorter than the signal's lead) must not kill the script
trap '_rl_stop_requested=1; echo "[$(date +%T)] USR1 before the training step started"' USR1

_rl_on_usr1() {
  _rl_interrupted=1
  _rl_stop_requested=1
  echo "[$(date +%T)] USR1 (preemption or time limit): SIGTERM to the training step, which checkpoints and exits"
  local steps="" _
  for _ in 1 2 3 4 5; do  # the step may still be registering
    steps=$(squeue -h --steps -j "$RL_JOB" -o %i 2>/dev/null | grep -E '\.[0-9]+$' || true)
    [[ -n "$steps" ]] && break
    kill -0 "$_rl_step_pid" 2>/dev/null || break
    sleep 1
  done
  if [[ -n "$steps" ]]; then
    # every task of the step (torchrun and its workers) gets SIGTERM; nothing is killed
    # shellcheck disable=SC2086
    scancel --signal=TERM $steps
  else
    echo "no running training step to signal"
  fi
}

_rl_on_term() {
  # scancel or preemption: SLURM signals the step itself; keep waiting so the log shows its end
  _rl_interrupted=1
  echo "[$(date +%T)] SIGTERM to the batch script: the job is ending; the training step checkpoints if it has time"
}

# rl_run_step SRUN_ARGS... : run `srun SRUN_ARGS...` as the training step and wait for it; on USR1
# ask it to checkpoint and stop, then requeue (unless REQUEUE=0). Returns the step's exit status.
rl_run_step() {
  echo "step:       srun $*"
  echo "===="
  if [[ $_rl_stop_requested == 1 ]]; then
    _rl_after_stop
    return
  fi
  trap _rl_on_usr1 USR1
  trap _rl_on_term TERM
  srun "$@" &
  _rl_step_pid=$!
  local rc
  while true; do
    _rl_interrupted=0
    rc=0
    wait "$_rl_step_pid" || rc=$?
    # a trapped signal makes `wait` return early (status > 128) while the step still runs
    [[ $_rl_interrupted == 1 ]] || break
  done
  trap - USR1 TERM
  echo "[$(date +%T)] training step exited with status $rc"
  if [[ $_rl_stop_requested == 1 ]]; then
    # 75: the workers stopped at a step boundary with a checkpoint (the trainer's "stopping at step
    # N" line above); another status: they did not confirm it (killed, or still in set-up)
    [[ $rc == 75 ]] || echo "(after a stop request the step exited $rc, not 75: no checkpoint was" \
      "confirmed; the job resumes from the newest one)"
    _rl_after_stop
    return
  fi
  return "$rc"
}

# After a stop request: requeue this job (it ends the script), or with REQUEUE=0 return 0.
_rl_after_stop() {
  if [[ "${REQUEUE:-1}" == 0 ]]; then
    echo "stopped on request (REQUEUE=0): resubmit the same command to resume"
    return 0
  fi
  echo "[$(date +%T)] requeueing $RL_JOB; the next start resumes from the latest checkpoint"
  if scontrol requeue "$RL_JOB"; then
    sleep 120  # SLURM ends this script now
    echo "$RL_JOB is still running 120 s after scontrol requeue" >&2
  else
    echo "scontrol requeue $RL_JOB failed (is the job requeueable?): resubmit the same command to resume" >&2
  fi
  return 1
}

# rl_preflight WORLD TRAIN_ARGS...: check the config and the layout for WORLD ranks, once, before
# any step; sets RL_RUN_DIR (the resolved run.dir) and exports RANDLIFT_LAUNCH_ID (this start of
# this job: a requeued job gets a new one). Bad input: exits the script with the trainer's status
# (2) after its one-line message.
rl_preflight() {
  local world="$1" rc=0
  shift
  export RANDLIFT_LAUNCH_ID="slurm-${RL_JOB:-local}-r${SLURM_RESTART_COUNT:-0}-$(date +%s)"
  RL_RUN_DIR=$(python -m randlift_dist.launcher --check-only --world-size "$world" "$@") || rc=$?
  if [[ $rc != 0 ]]; then
    echo "[$(date +%T)] preflight failed (status $rc): nothing was started"
    exit "$rc"
  fi
}

# rl_finish RC: the step's status RC; after rl_preflight, a failure that was not a stop request
# is explained once and its status becomes the trainer's code.
rl_finish() {
  local rc="$1"
  if [[ $rc != 0 && $_rl_stop_requested == 0 && -n "${RL_RUN_DIR:-}" ]]; then
    python -m randlift_dist.launcher --report "$rc" --launch-id "$RANDLIFT_LAUNCH_ID" --run-dir "$RL_RUN_DIR" || rc=$?
  fi
  return "$rc"
}
