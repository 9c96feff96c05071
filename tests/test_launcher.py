"""`randlift-launch` and the set-up watch: decisions from exit codes, the nodes' shared job keys,
waits that are said and bounded, DeepSpeed's stale JIT build lock, and one status (75) for a stop
with a checkpoint under every launcher.

Pure parts first (no process); then the watch in small subprocesses (a real `FileBaton` waiting
on a real lock file); then three real launches: a stale lock under `launch/run.sh` (DeepSpeed,
2 ranks: one line, status 2, no restart), Ctrl-C to `launch/run.sh` during training (status 75,
the checkpoint of the step it stopped at, no second message) and Ctrl-C to a plain `python -m
randlift_dist.train` while it waits on a fresh lock during set-up (status 75, one line). The
restart paths are tests/test_restart.py (one node), tests/test_multinode.py (a node killed,
SLURM on two nodes) and tests/test_slurm.py (USR1 preemption exits 75, requeue).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch import REPO, launcher_cmd, launcher_env, partial_metrics, train_env
from randlift_dist.job_store import JobStore, close_round, is_local_address
from randlift_dist.outcome import classify, describe, read_status

SMALL = ["model.lift.size=48", "data.n_train=256", "data.n_test=64", "train.batch_size=32", "train.eval_every=0",
         "wandb.mode=disabled", "run.progress=false"]


# ------------------------------------------------------------------ decisions (no process)
def test_decisions_from_exit_codes():
    assert classify({}, None) == ("done", 0)
    assert classify({1: -9, 0: 1}, None) == ("retry", 1)  # a killed rank and its peer: restart
    assert classify({0: 1}, {"code": 1, "message": "error during training step 3"}) == ("retry", 1)
    assert classify({0: 2, 1: 1}, {"code": 2, "message": "different lift"}) == ("final", 2)
    assert classify({1: 3, 0: -15}, None) == ("final", 3)  # rank 0 killed by the agent, rank 1 non-finite
    assert classify({0: 1, 1: 1}, {"code": 3, "message": "non-finite"}) == ("final", 3)  # rank 0 said why
    assert classify({0: 75, 1: 75}, {"code": 75, "message": "stopped at step 4"}) == ("stopped", 75)
    # a survivor that the agent stopped in set-up (75) beside a killed rank: a failure, restarted
    assert classify({0: 75, 1: -9}, None) == ("retry", 1)
    assert describe({1: -9, 0: 1, 2: 1}) == "SIGKILL to rank 1, exit status 1 from ranks 0, 2"
    assert describe({3: -200}) == "signal 200 to rank 3"


def test_status_is_read_for_this_launch_and_attempt_only(tmp_path):
    (tmp_path / "exit_status.json").write_text(json.dumps({"code": 2, "message": "m", "launch_id": "a",
                                                           "attempt": 1}))
    assert read_status(tmp_path, "a", 1) == {"code": 2, "message": "m", "said": False}
    assert read_status(tmp_path, "a") == {"code": 2, "message": "m", "said": False}
    assert read_status(tmp_path, "a", 0) is None and read_status(tmp_path, "b", 1) is None
    (tmp_path / "exit_status.json").write_text("{torn")
    assert read_status(tmp_path, "a", 1) is None


def test_job_store_agrees_on_attempts_launch_id_and_end():
    """The host's launcher and a node's launcher (a client, as a node started again would be)."""
    host = JobStore("127.0.0.1", 0, True, "job", timeout_s=20)
    node = JobStore("127.0.0.1", host.port, False, "job", timeout_s=20)
    assert host.launch_id("first") == "first" and node.launch_id("second") == "first"
    assert host.attempt() == node.attempt() == 0
    assert host.advance(0) == 1 and node.advance(0) == 1  # two nodes decide at once: one advance
    assert node.attempt() == 1 and host.ended() is None
    other = JobStore("127.0.0.1", host.port, False, "other job", timeout_s=20)
    assert other.attempt() == 0  # keys are per rendezvous id
    closed = []
    node.end(2, "bad input", ran=0, close_round=closed.append)  # node still thought attempt 0
    assert host.ended() == (2, "bad input") and closed == [1]  # the round the job moved to is closed
    host.end(2, "bad input", ran=1, close_round=closed.append)
    assert closed == [1]
    assert is_local_address("127.0.0.1") and not is_local_address("203.0.113.7")
    assert is_local_address(socket.gethostname()) in (True, False)  # resolves or not, never raises


@pytest.mark.timeout(120)
def test_closing_a_round_wakes_a_node_waiting_in_it():
    """The round a node waits in for a node that will not come (the job ended elsewhere) is closed
    through torch's rendezvous handler: the waiting node's rendezvous raises RendezvousClosedError."""
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    store = JobStore("127.0.0.1", 0, True, "job", timeout_s=20)
    endpoint = f"127.0.0.1:{store.port}"
    params = RendezvousParameters(backend="c10d", endpoint=endpoint, run_id="job-1", min_nodes=2, max_nodes=2,
                                  local_addr="127.0.0.1", is_host=False, join_timeout=60)
    seen = []

    def node():
        try:
            get_rendezvous_handler(params).next_rendezvous()
            seen.append("joined")
        except RendezvousClosedError:
            seen.append("closed")

    waiting = threading.Thread(target=node, daemon=True)
    waiting.start()
    time.sleep(2)
    assert waiting.is_alive() and not seen  # waits for the second node
    t0 = time.monotonic()
    close_round(endpoint, "job-1", (2, 2), True, "127.0.0.1")
    waiting.join(timeout=40)
    assert seen == ["closed"] and time.monotonic() - t0 < 40


# ------------------------------------------------------------------ the set-up watch (small processes)
WATCH = """
import os, sys, time
from randlift_dist.setup_watch import SetupWatch
def say(code, text):
    print(f"ended {{code}}: {{text}}", file=sys.stderr, flush=True)
watch = SetupWatch(timeout_s={timeout}, rank=0, local_rank=0, say=say, notice_s={notice}, poll_s=0.2).start()
"""


def _python(code: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=train_env(kw.pop("env", None)), **kw)


@pytest.mark.timeout(120)
def test_watch_leaves_work_alone_and_ends_a_silent_wait():
    code = WATCH.format(timeout=2.0, notice=1.0) + """
watch.phase("busy phase")
t = time.monotonic()
while time.monotonic() - t < 3.5:  # computing for longer than the timeout: left alone
    sum(range(1000))
watch.phase("waiting phase")
time.sleep(60)
"""
    t0 = time.monotonic()
    proc = _python(code)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert "busy phase" not in proc.stderr, proc.stderr
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("randlift-train: rank 0: waiting phase: waiting for ") and "<string>" in lines[0]
    assert lines[1].startswith("ended 1: waiting phase waited ") and "parallel.setup_timeout_s=2" in lines[1]


@pytest.mark.timeout(120)
def test_watch_tells_a_stale_jit_lock_from_a_live_build(tmp_path):
    op = tmp_path / "ext" / "some_op"
    op.mkdir(parents=True)
    lock = op / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    wait = WATCH.format(timeout=600, notice=60) + f"""
from torch.utils.file_baton import FileBaton
watch.phase("engine set-up")
FileBaton({str(lock)!r}).wait()
print("the wait ended", flush=True)
"""
    # an old lock, no build here, nothing changing: stale at the first look
    proc = _python(wait)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"ended 2: stale JIT build lock {lock} (") and \
        line[0].endswith(f"remove it (rm {lock}) and start again"), proc.stderr
    # the same lock while a process works in the op's directory (as ninja does): a live build
    builder = subprocess.Popen(["sleep", "60"], cwd=op)
    try:
        proc = subprocess.Popen([sys.executable, "-c", wait], env=train_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        notice = proc.stderr.readline()  # after LOCK_NOTICE_S
        assert f"waiting for the JIT build lock {lock} (a build runs on this machine: pid {builder.pid}" in notice
        lock.unlink()  # the build ends
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out == "the wait ended\n" and err == "", (out, err)
    finally:
        builder.kill()
        builder.wait()


# ------------------------------------------------------------------ real launches
def _shm_op_name() -> str:
    """The JIT-built op DeepSpeed loads at every start on a CPU (the shared-memory comm op)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().create_op_builder("ShareMemCommBuilder").name


@pytest.mark.timeout(300)
def test_stale_jit_lock_under_the_launcher_ends_in_one_line(tmp_path):
    lock = tmp_path / "ext" / _shm_op_name() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 600  # left by a start killed ten minutes ago
    os.utime(lock, (old, old))
    t0 = time.monotonic()
    cmd = launcher_cmd("run.sh", tmp_path / "run", *SMALL, "parallel.engine=deepspeed", "train.steps=3")
    proc = subprocess.run(cmd, env=launcher_env({"NPROC": "2", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 200
    said = [line for line in proc.stderr.splitlines() if str(lock) in line]
    assert len(said) == 1 and f"(rm {lock})" in said[0], proc.stderr[-3000:]
    assert said[0].startswith("randlift-train: stale JIT build lock"), proc.stderr[-3000:]
    assert "restarting" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lock.exists()  # never removed behind the user's back


@pytest.mark.timeout(300)
def test_ctrl_c_under_the_launcher_exits_75_with_a_checkpoint(tmp_path):
    proc = subprocess.Popen(launcher_cmd("run.sh", tmp_path, *SMALL, "parallel.engine=torch", "train.steps=100000",
                                         "checkpoint.every=0", "train.log_every=5"),
                            env=launcher_env({"NPROC": "2"}), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while len(partial_metrics(tmp_path)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the launcher (the workers have their own session)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    step = int(re.search(r"stopping at step (\d+) \(signal SIGINT\)", err).group(1))
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["code"] == 75 and status["launch_id"] and f"stopped at step {step} by SIGINT" in status["message"]
    assert "randlift-launch: stopped" not in err and "Traceback" not in err, err[-3000:]  # said once, by the trainer


@pytest.mark.timeout(300)
def test_ctrl_c_during_set_up_exits_75(tmp_path):
    """Plain python, DeepSpeed engine, waiting on a fresh lock (not yet called stale) when Ctrl-C comes."""
    lock = tmp_path / "ext" / _shm_op_name() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    fresh = threading.Event()

    def keep_fresh():
        while not fresh.wait(1.0):
            lock.touch()

    threading.Thread(target=keep_fresh, daemon=True).start()
    cmd = [sys.executable, "-m", "randlift_dist.train", f"run.dir={tmp_path / 'run'}", *SMALL,
           "parallel.engine=deepspeed", "train.steps=3"]
    proc = subprocess.Popen(cmd, env=train_env({"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the lock stays fresh (touched every second) until the trainer is stopped
        seen = ""
        while "waiting for the JIT build lock" not in seen:
            line = proc.stderr.readline()
            assert line, f"the trainer ended before it waited on the lock: {seen[-2000:]}"
            seen += line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        fresh.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    said = [line for line in err.splitlines() if "SIGINT" in line]
    assert said == ["randlift-train: stopped by SIGINT during set-up: nothing was trained in this invocation; run the "
                    "same command again to continue"] and "Traceback" not in err, err[-3000:]
    assert json.loads((tmp_path / "run" / "exit_status.json").read_text())["code"] == 75


def test_no_private_torch_method_is_replaced():
    text = "".join(p.read_text() for d in ("randlift_dist", "launch", "slurm") for p in (REPO / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".sh", ".sbatch", ""))
    assert "_restart_workers" not in text and "SimpleElasticAgent" not in text
