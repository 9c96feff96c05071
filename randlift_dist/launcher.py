"""`randlift-launch` (`python -m randlift_dist.launcher`): the job launcher, on torchrun's public API.

    randlift-launch --nproc-per-node 4 --config configs/teacher_mlp.yaml parallel.lift_parallel=2
    randlift-launch --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job7 --nproc-per-node 8 ...

Options before the trainer's arguments (anything this parser does not know goes to
`python -m randlift_dist.train`). `launch/run.sh`, `launch/run_multinode.sh` and `slurm/` call it.

In order:

1. **Preflight, once:** `train.check(config, overrides, world)` in this process (the config, the
   layout for nnodes x nproc ranks, the machine). Bad input: the trainer's one line, status 2,
   nothing started.
2. **Attempts:** each is one `elastic_launch(LaunchConfig(..., max_restarts=0))` of
   `python -u -m randlift_dist.train ...` with a c10d rendezvous round `<rdzv id>-<attempt>`
   (`job_store` says how the nodes agree on the attempt). The workers get `RANDLIFT_LAUNCH_ID` and
   `RANDLIFT_ATTEMPT`; rank 0 writes them into `<run.dir>/exit_status.json` with its status.
3. **The decision, from the workers' exit codes** (`ChildFailedError.failures`, with rank 0's
   status of this attempt): 2 (bad input) or 3 (non-finite) anywhere: stop at once with that
   status; 75 from every failed rank (stopped on request, checkpoint written): stop with 75;
   otherwise (1, a signal such as SIGKILL) restart from the latest checkpoint, up to
   `--max-restarts` restarts per job (not per node), and say why in one line (`randlift-launch: attempt 1 of 4 failed: SIGKILL to rank 1, exit status 1
   from rank 0: restarting ...`). All exit 0: done.
4. **One message at the end** (unless `--no-report`: the caller reports once for many nodes):
   the trainer's message from `exit_status.json` and its status, or what the exit codes say.
   A stop signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is forwarded once to the workers, which
   checkpoint and exit 75 within TORCH_ELASTIC_SHUTDOWN_TIMEOUT; the launcher then exits 75 (the
   trainer said where it stopped), or 128 + the signal if no worker confirmed a clean stop.

Restarts stay reliable at large lifts with what the shell launcher had: a worker store per round
(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), the rendezvous join timeout, a 0.5 s monitor interval,
and torchrun's own messages in `<run.dir>/torchrun-<host>[-<local addr>].log` (the workers keep
this terminal). No torch method is replaced and no file time is read.

`--check-only --world-size N` runs step 1 and prints run.dir; `--report STATUS --launch-id ID
--run-dir D` explains a failed job once (slurm/lib.sh).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from .job_store import JobStore, close_round, is_local_address
from .outcome import EXIT_ERROR, EXIT_INPUT, EXIT_STOPPED, FINAL, classify, describe, read_status, report

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
TAG = "randlift-launch"
WAIT_NOTICE_S = 30.0  # a rendezvous this long with no worker started is named on the terminal


def say(text: str) -> None:
    print(f"{TAG}: {text}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog=TAG, allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                 epilog="Other arguments go to python -m randlift_dist.train.")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="workers on this node (default: GPUs, else 2)")
    ap.add_argument("--nnodes", default="1", help="nodes in the job: N or MIN:MAX (default 1)")
    ap.add_argument("--rdzv-endpoint", default=None, help="HOST[:PORT] of the rendezvous store (needed with --nnodes)")
    ap.add_argument("--rdzv-id", default="randlift", help="a job id shared by all nodes (default randlift)")
    ap.add_argument("--local-addr", default=None, help="this node's address as the other nodes reach it")
    ap.add_argument("--is-host", choices=("0", "1"), default=None,
                    help="1: this node hosts the rendezvous store (default: it does if the endpoint is local)")
    ap.add_argument("--max-restarts", type=int, default=3, help="restarts of the job after failures (default 3)")
    ap.add_argument("--join-timeout", type=int, default=900, help="seconds the nodes wait for each other")
    ap.add_argument("--no-preflight", action="store_true", help="skip step 1's checks (done once already)")
    ap.add_argument("--no-report", action="store_true", help="leave the final message to the caller")
    ap.add_argument("--check-only", action="store_true", help="preflight for --world-size ranks, print run.dir")
    ap.add_argument("--world-size", type=int, default=0, help="with --check-only (0: skip the layout checks)")
    ap.add_argument("--report", type=int, default=None, metavar="STATUS", help="explain a failed job's STATUS once")
    ap.add_argument("--launch-id", default=None, help="the job's launch id (default RANDLIFT_LAUNCH_ID or new)")
    ap.add_argument("--run-dir", default=None, help="with --report: the run directory")
    opts, train_args = ap.parse_known_args(argv)
    for name, value in (("--nproc-per-node", opts.nproc_per_node), ("--max-restarts", opts.max_restarts),
                        ("--join-timeout", opts.join_timeout)):
        if value is not None and (value < 0 or (value == 0 and name != "--max-restarts")):
            ap.error(f"{name} {value}: use a positive integer" + (" or 0" if name == "--max-restarts" else ""))
    parts = opts.nnodes.split(":")
    if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 2 or int(parts[0]) > int(parts[-1]):
        ap.error(f"--nnodes {opts.nnodes}: use a positive integer N or MIN:MAX")
    opts.nodes = (int(parts[0]), int(parts[-1]))
    if opts.nodes != (1, 1) and not opts.rdzv_endpoint:
        ap.error(f"--nnodes {opts.nnodes}: give --rdzv-endpoint HOST[:PORT] too (MASTER_ADDR in launch/*.sh)")
    return opts, train_args


def run_dir_of(train_args: list[str], world: int) -> tuple[int, Path | None]:
    """(0, run.dir) after the trainer's checks for `world` ranks (0: the config only); (2, None)
    after its one line."""
    from . import train
    from .config import ConfigError
    from .layout import LayoutError
    try:
        args = train.parse_args(train_args)
    except SystemExit as e:  # argparse said why
        return (e.code if isinstance(e.code, int) else EXIT_INPUT) or EXIT_INPUT, None
    try:
        cfg = (train.check(args.config, args.overrides, world) if world else
               train.load_config(args.config, args.overrides))
    except (ConfigError, LayoutError) as err:
        print(f"randlift-train: config error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_INPUT, None
    return 0, Path(cfg.run.dir)


class Launch:
    """One job on this node: the attempts, the decisions, the agent log and the final message."""

    def __init__(self, opts: argparse.Namespace, train_args: list[str], run_dir: Path):
        self.opts, self.train_args, self.run_dir, self.k = opts, train_args, run_dir, 0
        if opts.nodes == (1, 1):  # this node alone: the store on a free local port
            host, port, self.is_host, self.rdzv_id = "127.0.0.1", 0, True, f"local-{os.getpid()}"
            opts.local_addr = opts.local_addr or "127.0.0.1"
            tag = socket.gethostname().split(".")[0]
        else:
            host, _, port = opts.rdzv_endpoint.partition(":")
            port = int(port or 29400)
            self.is_host = opts.is_host == "1" if opts.is_host is not None else is_local_address(host)
            self.rdzv_id = opts.rdzv_id
            tag = socket.gethostname().split(".")[0] + (f"-{opts.local_addr}" if opts.local_addr else "")
        self.log_path = run_dir / f"torchrun-{tag}.log"
        self.log = open(self.log_path, "a", buffering=1)
        self._log_torch_here()
        self._wait: tuple[float, str] | None = None  # a blocking wait the watcher may name
        threading.Thread(target=self._watch, name="randlift-launch-watch", daemon=True).start()
        if not self.is_host:
            self._wait = (time.monotonic(), f"the rendezvous store at {host}:{port} (the launcher of the host node)")
        self.store = JobStore(host, port, self.is_host, self.rdzv_id, timeout_s=opts.join_timeout)
        self._wait = None
        self.endpoint = f"{host}:{self.store.port}"
        self.launch_id = self.store.launch_id(opts.launch_id or os.environ.get("RANDLIFT_LAUNCH_ID"))
        self.attempts = opts.max_restarts + 1

    def _watch(self) -> None:
        """Never wait silently: a rendezvous (or the store) that keeps this node waiting, with no
        worker started, is named once after WAIT_NOTICE_S."""
        said: set[str] = set()
        while True:
            time.sleep(2.0)
            wait = self._wait
            if wait is None or wait[1] in said or time.monotonic() - wait[0] < WAIT_NOTICE_S or _has_children():
                continue
            said.add(wait[1])
            say(f"waiting {time.monotonic() - wait[0]:.0f} s for {wait[1]}; --join-timeout "
                f"{self.opts.join_timeout} s (RDZV_JOIN_TIMEOUT) ends the wait")

    def note(self, text: str) -> None:
        print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=self.log, flush=True)

    def _log_torch_here(self) -> None:
        """torchrun's messages (rendezvous, worker starts, failures; INFO and up) and this process's
        warnings go to the agent log, not to the terminal the workers write to."""
        import torch.distributed.elastic.agent.server.local_elastic_agent  # noqa: F401 - torch's loggers
        import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
        import torch.distributed.launcher.api  # noqa: F401
        logging.captureWarnings(True)
        mine = logging.StreamHandler(self.log)
        for name, lg in [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]:
            if not isinstance(lg, logging.Logger):
                continue
            for h in lg.handlers:  # torch's own stderr handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__):
                    h.setStream(self.log)
            if name.startswith("torch.distributed.elastic"):
                lg.setLevel(logging.INFO)
        for name in ("torch", "py.warnings"):
            if not logging.getLogger(name).handlers:
                logging.getLogger(name).addHandler(mine)
            logging.getLogger(name).propagate = False

    def attempt(self, k: int) -> tuple[str, dict[int, int]]:
        """One torchrun launch: (`ok` | `failed` | `closed` | `agent-error`, {rank: exit code})."""
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch
        os.environ["RANDLIFT_ATTEMPT"] = str(k)
        o = self.opts
        cfg = LaunchConfig(min_nodes=o.nodes[0], max_nodes=o.nodes[1], nproc_per_node=o.nproc_per_node,
                           run_id=f"{self.rdzv_id}-{k}", role="randlift", rdzv_endpoint=self.endpoint,
                           rdzv_backend="c10d", max_restarts=0, monitor_interval=0.5, local_addr=o.local_addr,
                           rdzv_configs={"join_timeout": o.join_timeout, "read_timeout": 120, "is_host": self.is_host})
        self.note(f"pid {os.getpid()}: attempt {k + 1} of {self.attempts} (round {cfg.run_id} at {self.endpoint}, "
                  f"launch {self.launch_id}): python -u -m randlift_dist.train {' '.join(self.train_args)}")
        self._wait = (time.monotonic(), f"{o.nnodes} node(s) at the rendezvous round {cfg.run_id} at {self.endpoint}")
        try:
            elastic_launch(cfg, sys.executable)("-u", "-m", "randlift_dist.train", *self.train_args)
            return "ok", {}
        except ChildFailedError as err:
            return "failed", {int(r): int(f.exitcode) for r, f in err.failures.items()}
        except RendezvousClosedError:
            return "closed", {}
        except SignalException:
            raise  # a stop: the agent forwarded it to the workers and waited for them
        except Exception as err:  # noqa: BLE001 - a rendezvous that timed out, an agent error: the wall goes to the log
            traceback.print_exc(file=self.log)
            self.agent_error = (f"{type(err).__name__}: {' '.join(str(err).split())[:300]}" if not
                                isinstance(err, RendezvousTimeoutError) else f"not all of {o.nnodes} node(s) "
                                f"joined round {cfg.run_id} within --join-timeout {o.join_timeout} s")
            return "agent-error", {}
        finally:
            self._wait = None

    def close_round(self, k: int) -> None:
        close_round(self.endpoint, f"{self.rdzv_id}-{k}", self.opts.nodes, self.is_host, self.opts.local_addr)

    def finish(self, code: int, message: str | None, k: int, quiet: bool = False) -> int:
        """End the job with `code`: record it for the other nodes, say it once (unless the caller
        reports, or the trainer already said it), return it."""
        self.note(f"end: status {code}" + (f": {message}" if message else ""))
        try:
            self.store.end(code, message or "", k, self.close_round)
        except Exception as err:  # noqa: BLE001 - the host may be gone at the end of a job: nothing to tell
            self.note(f"could not record the end in the rendezvous store: {err}")
        if message and not quiet and not self.opts.no_report:
            print(message, file=sys.stderr, flush=True)
        return code

    def wait_for_next(self, k: int) -> tuple[int, tuple[int, str] | None]:
        """After round k closed under us: the attempt the job moved to, or how it ended."""
        deadline = time.monotonic() + self.opts.join_timeout
        while time.monotonic() < deadline:
            ended, now = self.store.ended(), self.store.attempt()
            if ended is not None or now > k:
                return now, ended
            time.sleep(0.5)
        return k, (EXIT_ERROR, f"{TAG}: rendezvous round {self.rdzv_id}-{k} closed and the job neither moved on nor "
                               f"ended in {self.opts.join_timeout} s (see {self.log_path})")

    def run(self) -> int:
        k = self.k = self.store.attempt()
        if k:
            say(f"the job is at attempt {k + 1} of {self.attempts}: joining it")
        while True:
            if (ended := self.store.ended()) is not None:
                return self.finish(ended[0], ended[1] or None, k, quiet=ended[0] in (0, EXIT_STOPPED))
            how, failures = self.attempt(k)
            status = read_status(self.run_dir, self.launch_id, k)
            if how == "closed":
                k, ended = self.wait_for_next(k)
                self.k = k
                if ended is not None:
                    return self.finish(ended[0], ended[1] or None, k, quiet=ended[0] in (0, EXIT_STOPPED))
                continue
            if how == "agent-error":  # no worker exit codes: nothing to restart from
                return self.finish(EXIT_ERROR, f"{TAG}: attempt {k + 1}: torchrun failed ({self.agent_error}); "
                                               f"see {self.log_path}", k)
            kind, code = classify(failures, status)
            self.note(f"attempt {k + 1}: {describe(failures) or 'every worker exited 0'}: {kind}")
            if kind == "done":
                return self.finish(0, None, k)
            if kind == "stopped":  # every worker stopped on request; the trainer wrote where
                return self.finish(code, f"randlift-train: {status['message']}" if status else
                                   f"{TAG}: {describe(failures)}: stopped on request",
                                   k, quiet=bool(status and status["said"]))
            why = f"attempt {k + 1} of {self.attempts} failed: {describe(failures)}"
            if kind == "final":
                if status and status["code"] == code:
                    return self.finish(code, f"randlift-train: {status['message']}", k, quiet=status["said"])
                return self.finish(code, f"{TAG}: {why} (status {code}: a restart would repeat it)", k)
            if k + 1 >= self.attempts:
                reason = f": {status['message']}" if status else ""
                return self.finish(code, f"{TAG}: {why}{reason}; no restarts left (--max-restarts "
                                         f"{self.opts.max_restarts})", k)
            reason = f" ({status['message']})" if status else ""
            say(f"{why}{reason}: restarting from the latest checkpoint (restart {k + 1} of "
                f"{self.opts.max_restarts})")
            k = self.k = max(self.store.advance(k), k + 1)

    def stopped(self, sig: int) -> int:
        """After a stop signal (the workers got it once from torchrun's agent)."""
        k = self.k
        status = read_status(self.run_dir, self.launch_id, k)
        name = signal.Signals(sig).name
        if status is not None and status["code"] in (0, EXIT_STOPPED, *FINAL):
            return self.finish(status["code"], f"randlift-train: {status['message']}", k, quiet=status["said"])
        return self.finish(128 + sig, f"{TAG}: stopped by {name}; no worker reported a clean stop (they have "
                                      f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT s to checkpoint): run the same command "
                                      "again to continue from the newest checkpoint", k)


def _has_children() -> bool:
    """True if a process of this machine has this process as its parent (the workers)."""
    me = os.getpid()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def _raise_stop(signum, frame):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    raise SignalException(f"{TAG} got {signal.Signals(signum).name}", sigval=signal.Signals(signum))


def main(argv: list[str] | None = None) -> int:
    opts, train_args = parse(sys.argv[1:] if argv is None else list(argv))
    if opts.report is not None:
        if not (opts.run_dir and opts.launch_id):
            say("--report needs --run-dir and --launch-id")
            return EXIT_INPUT
        return report(opts.report, Path(opts.run_dir), opts.launch_id)
    if opts.check_only:
        rc, run_dir = run_dir_of(train_args, opts.world_size)
        if rc == 0:
            print(run_dir)
        return rc
    if opts.nproc_per_node is None:
        import torch
        opts.nproc_per_node = torch.cuda.device_count() or 2
    # an elastic MIN:MAX job has no one world size to check in advance
    world = 0 if opts.no_preflight or opts.nodes[0] != opts.nodes[1] else opts.nodes[0] * opts.nproc_per_node
    rc, run_dir = run_dir_of(train_args, world)
    if rc:
        return rc
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a new worker store per round (torch issue 135712)
    os.environ["RANDLIFT_LAUNCHER_REPORTS"] = "1"  # rank 0's status is said once, here or by the caller
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for s in STOPS:
        signal.signal(s, _raise_stop)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    launch = None
    try:
        launch = Launch(opts, train_args, run_dir)
        os.environ["RANDLIFT_LAUNCH_ID"] = launch.launch_id
        say(f"agent log {launch.log_path}")
        return launch.run()
    except SignalException as stop:
        if launch is None:
            return 128 + int(stop.sigval)
        return launch.stopped(int(stop.sigval))
    except Exception as err:  # noqa: BLE001 - the store cannot be reached: one line
        say(f"{type(err).__name__}: {' '.join(str(err).split())[:400]}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
