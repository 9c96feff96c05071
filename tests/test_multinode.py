"""Two nodes on one machine: `launch/run_multinode.sh` across two network namespaces.

Each "node" is a network namespace with one end of a veth pair (10.77.0.1 and 10.77.0.2, nothing
else is reachable from them but their own loopback). Node A hosts the c10d rendezvous store
(IS_HOST=1: both namespaces share this machine's host name, so torchrun cannot guess it), each
node names its address (LOCAL_ADDR) and gloo's interface (GLOO_SOCKET_IFNAME), and the job runs
lift-parallel across the nodes (2 nodes x 1 process, parallel.lift_parallel=2), sharing one run
directory as nodes share a file system. Its loss curve must equal the world-size-1 curve to 1e-5
relative. Then the same job again, with every process of node B killed (SIGKILL: its torchrun
agent and its worker) after a step drawn from a seeded RNG and node B's launcher started again:
the job must complete on both nodes with the same curve, each step once in metrics.jsonl.

Needs root and `ip netns` (skipped otherwise). The namespaces are named after this process id and
deleted in a finalizer, after their processes are killed; every wait is bounded.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from launch import REPO, assert_curves_match, launch, launcher_cmd, launcher_env, losses, metrics, partial_metrics

STEPS = 40
JOB = ["parallel.engine=torch", "model.lift.size=8000", f"train.steps={STEPS}", "checkpoint.every=10",
       "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled"]
SEED = int(os.environ.get("RANDLIFT_TEST_SEED", "20261129"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class TwoNodes:
    """Namespaces A (10.77.0.1, hosts the rendezvous) and B (10.77.0.2) joined by a veth pair."""

    def __init__(self):
        tag = os.getpid()
        self.ns = [f"rlA{tag}", f"rlB{tag}"]
        self.dev = [f"rlvA{tag}", f"rlvB{tag}"]  # at most 15 characters
        self.addr = ["10.77.0.1", "10.77.0.2"]
        self.made: list[str] = []

    def up(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        ping = subprocess.run(["ip", "netns", "exec", self.ns[1], "ping", "-c", "1", "-W", "2", self.addr[0]],
                              capture_output=True, text=True, timeout=30) if shutil.which("ping") else None
        assert ping is None or ping.returncode == 0, f"B cannot reach A: {ping.stdout}{ping.stderr}"

    def pids(self, i: int) -> list[int]:
        out = _ip("netns", "pids", self.ns[i], check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, i: int, timeout: float = 20) -> int:
        """SIGKILL every process in node i's namespace until none is left; returns how many."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while pids := self.pids(i):
            assert time.monotonic() < deadline, f"processes {pids} in {self.ns[i]} survive SIGKILL"
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return len(killed)

    def down(self) -> None:
        for i, ns in enumerate(self.ns):
            if ns in self.made:
                try:
                    self.kill(i)
                finally:
                    _ip("netns", "del", ns, check=False)  # deletes its end of the veth pair too
        self.made.clear()

    def start(self, i: int, run_dir: Path, overrides: list[str], rdzv_id: str, log: Path) -> subprocess.Popen:
        """node i's launcher in its namespace; output to `log`.out / .err."""
        env = launcher_env({"NNODES": "2", "NPROC": "1", "MASTER_ADDR": self.addr[0], "MASTER_PORT": "29400",
                            "RDZV_ID": rdzv_id, "LOCAL_ADDR": self.addr[i], "IS_HOST": "1" if i == 0 else "0",
                            "GLOO_SOCKET_IFNAME": self.dev[i], "MAX_RESTARTS": "2", "RDZV_JOIN_TIMEOUT": "180"})
        with open(f"{log}.out", "a") as out, open(f"{log}.err", "a") as err:
            return subprocess.Popen(["ip", "netns", "exec", self.ns[i],
                                     *launcher_cmd("run_multinode.sh", run_dir, *overrides)],
                                    env=env, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


@pytest.fixture
def nodes():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip") or _ip("netns", "list", check=False).returncode != 0:
        pytest.skip("`ip netns` is not available (iproute2)")
    n = TwoNodes()
    try:
        n.up()
    except AssertionError as err:
        n.down()
        pytest.skip(f"cannot make two network namespaces here: {err}")
    yield n
    n.down()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("world1")
    launch(d, 1, *JOB, timeout=200)
    return losses(d)


def _wait(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"the job did not finish in {timeout:.0f} s:\n{_tails(logs)}")
        time.sleep(0.2)
    return [p.returncode for p in procs]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}{ext} ---\n" + Path(f"{log}{ext}").read_text(errors="replace")[-2000:]
                     for log in logs for ext in (".out", ".err") if Path(f"{log}{ext}").exists())


@pytest.mark.timeout(300)
def test_two_nodes_lift_parallel_matches_world_size_1(tmp_path, nodes, reference):
    run_dir, rdzv = tmp_path / "run", uuid.uuid4().hex[:12]
    logs = [tmp_path / "nodeA", tmp_path / "nodeB"]
    procs = [nodes.start(i, run_dir, [*JOB, "parallel.lift_parallel=2"], rdzv, logs[i]) for i in (0, 1)]
    assert _wait(procs, 240, logs) == [0, 0], _tails(logs)
    out = "".join(Path(f"{log}.out").read_text() for log in logs)
    assert f"final step {STEPS}" in out, _tails(logs)
    err = "".join(Path(f"{log}.err").read_text() for log in logs)
    assert "world 2 = lift_parallel 2 x data_parallel 1" in err, _tails(logs)
    assert_curves_match(losses(run_dir), reference, 1e-5)
    assert sorted(p.name for p in run_dir.glob("torchrun-*.log")) == \
        sorted(f"torchrun-{os.uname().nodename.split('.')[0]}-{a}.log" for a in nodes.addr)


@pytest.mark.timeout(400)
def test_node_killed_and_restarted_job_completes(tmp_path, nodes, reference):
    rng = random.Random(SEED)
    step = rng.randint(12, 28)
    print(f"seed {SEED}: every process of node B killed after step {step}, then B's launcher started again")
    run_dir, rdzv = tmp_path / "run", uuid.uuid4().hex[:12]
    logs = [tmp_path / "nodeA", tmp_path / "nodeB"]
    overrides = [*JOB, "parallel.lift_parallel=2"]
    procs = [nodes.start(i, run_dir, overrides, rdzv, logs[i]) for i in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not any(r["step"] >= step for r in partial_metrics(run_dir)):
            assert all(p.poll() is None for p in procs), f"a launcher ended early:\n{_tails(logs)}"
            assert time.monotonic() < deadline, f"step {step} not reached in 180 s:\n{_tails(logs)}"
            time.sleep(0.05)
        assert nodes.kill(1) >= 2, "expected node B's torchrun agent and worker"
        procs[1].wait(timeout=30)
        procs[1] = nodes.start(1, run_dir, overrides, rdzv, logs[1])
        assert _wait(procs, 300, logs) == [0, 0], _tails(logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = "".join(Path(f"{log}.err").read_text() for log in logs)
    assert f"resumed from {run_dir}/checkpoints/step_" in err, _tails(logs)
    assert_curves_match(losses(run_dir), reference, 1e-5)  # the last record of each step
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(STEPS + 1)), f"metrics.jsonl steps are not 0..{STEPS} once each: {steps}"
