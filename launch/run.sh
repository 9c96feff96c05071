#!/usr/bin/env bash
# Launch training with torchrun: checked first, restarted on a worker failure, errors said once.
#   NPROC=4 CONFIG=configs/teacher_mlp.yaml launch/run.sh parallel.lift_parallel=2 train.steps=100
# Extra arguments are dotted config overrides for `python -m randlift_dist.train`.
#
# Environment:
#   NPROC         processes on this node (default: the GPUs, or 2 on a CPU machine)
#   CONFIG        config file (default: the embedded tiny run)
#   MAX_RESTARTS  worker-group restarts after a failure (default 3); each resumes from the latest
#                 checkpoint (train.resume=auto)
#   NNODES, MASTER_ADDR, MASTER_PORT (29400), RDZV_ID (randlift), LOCAL_ADDR, IS_HOST
#                 multi-node rendezvous: see launch/run_multinode.sh, which sets them and runs this
#   RDZV_JOIN_TIMEOUT  seconds the nodes wait for each other at a (re)start (default 900)
#
# What happens, in order:
# 1. Preflight, in one Python process: the config and the layout for NNODES x NPROC ranks are
#    checked (`python -m randlift_dist.train --preflight --world-size N`, when the trainer has it)
#    and run.dir is resolved (`--print-config`). Bad input exits with the trainer's status (2) and
#    its one-line message, before torchrun starts.
# 2. The same process becomes the torchrun agent. Its own messages (rendezvous, restarts, failure
#    reports, tracebacks) go to `<run.dir>/torchrun-<host>.log`; the workers keep this terminal.
#    Restarts are made reliable by TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (every restart gets a new
#    worker store instead of reusing the rendezvous store, which hangs or refuses connections at
#    large lifts), a rendezvous join timeout and a 0.5 s worker monitor.
# 3. Before a restart its reason is printed once (rank 0's exit_status.json, which the trainer
#    writes instead of printing under this launcher: RANDLIFT_LAUNCHER_REPORTS=1).
#    An error that a restart would repeat ends the job at once, without restarts: rank 0 wrote
#    exit_status.json with a status other than 1 (2 bad input: config, layout, a checkpoint of
#    another lift; 3 a non-finite loss). Status 1 (a peer died, I/O) is restarted.
# 4. On failure: if the trainer wrote `<run.dir>/exit_status.json` ({"code", "message"}) during
#    this launch, its message is printed once and its code is the exit status; otherwise the
#    last 20 lines of the agent log are printed. A stop by SIGTERM / SIGINT exits 128 + signal.
#
# Sourcing this file (`source launch/run.sh`, as slurm/lib.sh does) defines RL_LAUNCH_PY and
# rl_launch_py without launching anything: `python -c "$RL_LAUNCH_PY" preflight|report ...`.
# Internal variables: RL_PREFLIGHT=0 skips step 1's checks (already done once for the whole job),
# RL_REPORT=0 leaves the report of step 4 to the caller (one report for many nodes).

read -r -d '' RL_LAUNCH_PY <<'PY' || true
"""randlift_dist launcher helper. Modes:
  preflight WORLD TRAIN_ARGS...   check (WORLD > 0: also the layout) and print run.dir
  agent TORCHRUN_ARGS... -m randlift_dist.train TRAIN_ARGS...   preflight, then be torchrun
  report RC SINCE RUN_DIR   explain a failed launch once (exit_status.json, else the agent logs)
"""
import contextlib, io, json, os, signal, socket, sys, threading, time, traceback
from pathlib import Path

EXIT_BAD_INPUT, EXIT_RETRYABLE = 2, 1

def train_main(argv, capture):
    """randlift_dist.train.main(argv) in this process: (status, captured stdout)."""
    from randlift_dist.train import main
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out if capture else sys.stderr):
            rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    return int(rc or 0), out.getvalue()

def run_dir_of(train_args, world):
    """(status, run.dir): the trainer's own checks for `world` ranks (0: skip), then its run.dir."""
    if world > 0:
        _, usage = train_main(["--help"], capture=True)
        if "--preflight" in usage:
            rc, _ = train_main(["--preflight", "--world-size", str(world), *train_args], capture=False)
            if rc:
                return rc, None
    rc, text = train_main(["--print-config", *train_args], capture=True)
    if rc:
        return rc, None
    import yaml
    return 0, Path(yaml.safe_load(text)["run"]["dir"])

def status_of(run_dir, since):
    """(code, message) from exit_status.json written at or after `since`, else None."""
    path = run_dir / "exit_status.json"
    try:
        if path.stat().st_mtime < since - 1:
            return None
        s = json.loads(path.read_text())
        return int(s["code"]), str(s["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

def report(rc, run_dir, since, logs):
    """Print why the launch failed, once; returns the exit status to use."""
    st = status_of(run_dir, since)
    if st is not None:
        print(f"randlift-train: {st[1]}", file=sys.stderr, flush=True)
        return st[0] or rc
    if rc > 128:
        print(f"randlift_dist: stopped by signal {rc - 128}; the workers checkpoint at the next step "
              "(train.resume=auto continues)", file=sys.stderr, flush=True)
        return rc
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        print(f"randlift_dist: torchrun failed (status {rc}) and the trainer left no exit_status.json; "
              f"last {len(lines)} lines of {log}:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr, flush=True)
    return rc

def final_error(run_dir, since):
    """rank 0's exit_status.json when a restart would repeat it: any status but 1 (1: a peer or the
    machine failed, which a restart may cure)."""
    st = status_of(run_dir, since)
    return st if st is not None and st[0] not in (0, EXIT_RETRYABLE) else None

class FinalError(RuntimeError):
    pass

def no_restart_after_final_errors(run_dir, since, log, say):
    """Before torchrun restarts a worker group, look at exit_status.json: a final error ends the
    agent instead (its workers are stopped by its shutdown); another error is said once, as the
    reason for the restart."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    restart = getattr(SimpleElasticAgent, "_restart_workers", None)
    if restart is None:  # another torch: watch_final_errors still ends the agent
        return
    def guarded(self, worker_group):
        st = final_error(run_dir, since)
        if st is not None:
            print(f"exit_status.json: status {st[0]}: stopping without a restart", file=log, flush=True)
            raise FinalError(st[1])
        st = status_of(run_dir, since)
        why = f"randlift-train: {st[1]}" if st is not None else "a worker ended or a node joined (agent log)"
        print(f"randlift_dist: restarting the workers ({self._remaining_restarts} restarts left) after: {why}",
              file=say, flush=True)
        return restart(self, worker_group)
    SimpleElasticAgent._restart_workers = guarded

def watch_final_errors(run_dir, since, done, log):
    """End the agent (SIGTERM) on a final error seen while it waits elsewhere (a rendezvous)."""
    while not done.wait(0.5):
        st = final_error(run_dir, since)
        if st is not None:
            if not done.wait(10.0):  # a restart decision in progress stops the agent itself
                print(f"exit_status.json: status {st[0]}: stopping without a restart", file=log, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            return

def agent(argv):
    try:
        i = next(k for k in range(len(argv) - 1) if argv[k] == "-m" and argv[k + 1] == "randlift_dist.train")
    except StopIteration:
        sys.exit("agent mode needs '-m randlift_dist.train' in its arguments")
    since = time.time()
    world = int(os.environ.get("RL_WORLD", "0")) if os.environ.get("RL_PREFLIGHT", "1") != "0" else 0
    rc, run_dir = run_dir_of(argv[i + 2:], world)
    if rc:
        return rc
    run_dir.mkdir(parents=True, exist_ok=True)
    reporting = os.environ.get("RL_REPORT", "1") != "0"
    if reporting:
        (run_dir / "exit_status.json").unlink(missing_ok=True)
    tag = socket.gethostname().split(".")[0] + (f"-{os.environ['LOCAL_ADDR']}" if os.environ.get("LOCAL_ADDR") else "")
    log_path = run_dir / f"torchrun-{tag}.log"
    log = open(log_path, "a", buffering=1)
    print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: torchrun {' '.join(argv)}", file=log)
    print(f"randlift_dist: torchrun agent log {log_path}", file=sys.stderr, flush=True)
    real_stderr, sys.stderr = sys.stderr, log  # the agent's messages; workers inherit the real fd 2
    import logging
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", []):  # handlers made when torch was imported (preflight)
            if isinstance(h, logging.StreamHandler) and h.stream is real_stderr:
                h.setStream(log)
    done = threading.Event()
    threading.Thread(target=watch_final_errors, args=(run_dir, since, done, log), daemon=True).start()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main
    no_restart_after_final_errors(run_dir, since, log, real_stderr)
    os.environ["RANDLIFT_LAUNCHER_REPORTS"] = "1"  # the workers' exit_status.json is said once, here or by the caller
    sys.argv = ["torchrun", *argv]
    try:
        torchrun_main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except SignalException as e:
        traceback.print_exc(file=log)
        rc = 128 + int(e.sigval)
    except BaseException:  # ChildFailedError, rendezvous errors: the wall stays in the log
        traceback.print_exc(file=log)
        rc = 1
    done.set()
    print(f"==== torchrun status {rc}", file=log, flush=True)
    sys.stderr = real_stderr
    return report(rc, run_dir, since, [log_path]) if rc and reporting else rc

def main(argv):
    mode = argv[0] if argv else ""
    if mode == "agent":
        return agent(argv[1:])
    if mode == "preflight":
        rc, run_dir = run_dir_of(argv[2:], int(argv[1]))
        if rc == 0:
            print(run_dir)
        return rc
    if mode == "report":  # report RC SINCE RUN_DIR
        run_dir = Path(argv[3])
        return report(int(argv[1]), run_dir, float(argv[2]), sorted(run_dir.glob("torchrun-*.log")))
    sys.exit(f"unknown mode {mode!r}: use agent, preflight or report")

sys.exit(main(sys.argv[1:]))
PY


# rl_launch_py MODE ARGS...: the helper above under the python on PATH.
rl_launch_py() {
  python -c "$RL_LAUNCH_PY" "$@"
}

# rl_torchrun NNODES NPROC TRAIN_ARGS...: preflight, then become the torchrun agent (exec).
rl_torchrun() {
  local nnodes="$1" nproc="$2"
  shift 2
  [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC=$nproc: use a positive integer" >&2; exit 2; }
  local max_restarts="${MAX_RESTARTS:-3}"
  [[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "MAX_RESTARTS=$max_restarts: use a non-negative integer" >&2; exit 2; }
  local join="${RDZV_JOIN_TIMEOUT:-900}"
  [[ "$join" =~ ^[1-9][0-9]*$ ]] || { echo "RDZV_JOIN_TIMEOUT=$join: use a positive number of seconds" >&2; exit 2; }
  local rdzv_conf="join_timeout=$join,read_timeout=120"
  local args=(--nproc_per_node "$nproc" --max-restarts "$max_restarts" --monitor-interval 0.5)
  if [[ "$nnodes" == standalone ]]; then
    export RL_WORLD="$nproc"
    args+=(--standalone --rdzv-conf "$rdzv_conf")
  else
    [[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || { echo "NNODES=$nnodes: use a positive integer (or MIN:MAX)" >&2; exit 2; }
    # an elastic MIN:MAX world has no one size to check in advance
    if [[ "$nnodes" =~ ^[0-9]+$ ]]; then export RL_WORLD=$(( nnodes * nproc )); else export RL_WORLD=0; fi
    case "${IS_HOST:-}" in
      "") ;;
      1|true) rdzv_conf+=",is_host=1" ;;
      0|false) rdzv_conf+=",is_host=0" ;;
      *) echo "IS_HOST=$IS_HOST: use 1 (this node hosts the rendezvous store) or 0" >&2; exit 2 ;;
    esac
    args+=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}"
           --rdzv_id "${RDZV_ID:-randlift}" --rdzv-conf "$rdzv_conf")
    [[ -n "${LOCAL_ADDR:-}" ]] && args+=(--local_addr "$LOCAL_ADDR")
  fi
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"  # huge pages for big fresh CPU tensors
  export PYTHONUNBUFFERED=1
  exec python -c "$RL_LAUNCH_PY" agent "${args[@]}" -m randlift_dist.train "$@"
}

rl_default_nproc() {
  python -c 'import torch; print(torch.cuda.device_count() or 2)'
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  NPROC="${NPROC:-$(rl_default_nproc)}"
  CONFIG_ARGS=()
  [[ -n "${CONFIG:-}" ]] && CONFIG_ARGS=(--config "$CONFIG")
  if [[ -n "${NNODES:-}" ]]; then
    : "${MASTER_ADDR:?NNODES is set: set MASTER_ADDR to the rendezvous host too (or unset NNODES for one node)}"
    echo "randlift_dist: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) nnodes=$NNODES nproc=$NPROC" \
         "rdzv=$MASTER_ADDR:${MASTER_PORT:-29400} local_addr=${LOCAL_ADDR:-<hostname>} restarts=${MAX_RESTARTS:-3}" \
         "config=${CONFIG:-<default>}"
    rl_torchrun "$NNODES" "$NPROC" "${CONFIG_ARGS[@]}" "$@"
  else
    echo "randlift_dist: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) nproc=$NPROC" \
         "restarts=${MAX_RESTARTS:-3} config=${CONFIG:-<default>}"
    rl_torchrun standalone "$NPROC" "${CONFIG_ARGS[@]}" "$@"
  fi
fi
