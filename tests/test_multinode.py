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

Then `slurm/train.sbatch` on a two-node SLURM cluster built the same way: slurmctld and one
slurmd in namespace A, one slurmd in namespace B, each daemon with its own host name (a UTS
namespace) and both names in the namespaces' /etc/hosts (`/etc/netns/<ns>/hosts`), so that
torchrun, gloo and srun find every address from host names as on a real cluster. `sbatch -N 2`
runs one launcher per node, lift-parallel across them, and must match world size 1 too.

Needs root and `ip netns` (skipped otherwise; the SLURM test also needs slurm-wlm and munge,
which tests/test_slurm.py installs). The namespaces are named after this process id and deleted
in a finalizer, after their processes are killed; every wait is bounded.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from launch import REPO, assert_curves_match, launch, launcher_cmd, launcher_env, losses, metrics, partial_metrics
from test_slurm import Cluster, _ensure_slurm_installed, _pdeathsig

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
    # node A's launcher restarted because its worker exited 1 (its peer was gone); B's joined the new attempt
    said = [line for line in Path(f"{logs[0]}.err").read_text().splitlines() if "restarting" in line]
    assert len(said) == 1 and said[0].startswith("randlift-launch: attempt 1 of 3 failed: exit status 1 from rank "), \
        _tails(logs)
    assert "randlift-launch: the job is at attempt 2 of 3: joining it" in Path(f"{logs[1]}.err").read_text(), _tails(logs)
    assert_curves_match(losses(run_dir), reference, 1e-5)  # the last record of each step
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(STEPS + 1)), f"metrics.jsonl steps are not 0..{STEPS} once each: {steps}"


# ------------------------------------------------------------------ SLURM on the two nodes
class TwoNodeCluster(Cluster):
    """slurmctld + slurmd in namespace A, slurmd in namespace B; clients run in namespace A."""

    def __init__(self, root: Path, nodes: TwoNodes):
        super().__init__(root)
        self.nodes = nodes
        self.hosts = [f"rla{os.getpid()}", f"rlb{os.getpid()}"]
        self.node = self.hosts[0]
        self.etc: list[Path] = []

    def start(self) -> None:
        r = self.root
        for d in ("state", "log", "out"):
            (r / d).mkdir(exist_ok=True)
        self.sockets = Path(tempfile.mkdtemp(prefix="rlslurm-", dir="/tmp"))
        for d in ("spool", "munge", *(f"spool/{h}" for h in self.hosts)):
            (self.sockets / d).mkdir()
        hosts = f"127.0.0.1 localhost\n127.0.1.1 {os.uname().nodename}\n" + \
            "".join(f"{a} {h}\n" for a, h in zip(self.nodes.addr, self.hosts))
        for ns in self.nodes.ns:  # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts
            d = Path("/etc/netns") / ns
            d.mkdir(parents=True, exist_ok=True)
            self.etc.append(d)
            (d / "hosts").write_text(hosts)
        self.auth = "munge" if self._start_munge() else "none"
        with open("/proc/meminfo") as f:
            mem = int(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 1024 * 0.4)
        auth = (f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.sockets}/munge/munge.sock\n"
                if self.auth == "munge" else "AuthType=auth/none\nCredType=cred/none\n")
        a, b = self.hosts
        conf = r / "slurm.conf"
        conf.write_text(f"""ClusterName=rlmn
SlurmctldHost={a}({self.nodes.addr[0]})
SlurmUser=root
SlurmdUser=root
{auth}SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={r}/state
SlurmdSpoolDir={self.sockets}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
NodeName={a} NodeAddr={self.nodes.addr[0]} CPUs=2 RealMemory={mem} State=UNKNOWN
NodeName={b} NodeAddr={self.nodes.addr[1]} CPUs=2 RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={a},{b} Default=YES MaxTime=30 State=UP
""")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu",
                   WANDB_SILENT="true", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
        if sys.prefix != sys.base_prefix:
            env["VENV"] = sys.prefix
        self.env = env
        self._spawn_on(0, ["slurmctld", "-D", "-i"])
        for i in (0, 1):
            self._spawn_on(i, ["slurmd", "-D"])
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    pytest.fail(f"{p.args} exited with {p.returncode}:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            if state == ["idle", "idle"]:
                return
            time.sleep(0.5)
        pytest.fail(f"the two nodes did not become idle in 60 s (states {state}):\n{self.logs()}")

    def _spawn_on(self, i: int, cmd: list[str]) -> None:
        """`cmd` in node i's network namespace, with node i's host name (its own UTS namespace) and
        /etc/hosts (a private mount namespace). Not `ip netns exec`: it remounts /sys, which hides
        the cgroup file systems slurmd needs."""
        exe = shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}"
        ns = self.nodes.ns[i]
        log = open(self.root / "log" / f"{cmd[0]}-{self.hosts[i]}.stdout", "ab")
        self.procs.append(subprocess.Popen(
            ["unshare", "--mount", "--uts", "sh", "-c",
             f'mount --bind /etc/netns/{ns}/hosts /etc/hosts && hostname {self.hosts[i]} && '
             f'exec nsenter --net=/run/netns/{ns} "$@"', "sh", exe, *cmd[1:]],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return super().run("ip", "netns", "exec", self.nodes.ns[0], *cmd, **kw)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for d in self.etc:
                shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_train_sbatch_on_two_slurm_nodes(tmp_path, nodes, reference):
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("unshare and nsenter (util-linux) are needed to give each node its own host name")
    _ensure_slurm_installed()
    cluster = TwoNodeCluster(tmp_path / "slurm", nodes)
    (tmp_path / "slurm").mkdir()
    try:
        cluster.start()
        run_dir, out = tmp_path / "run", tmp_path / "slurm" / "out" / "train.out"
        job = cluster.sbatch("--nodes=2", "--cpus-per-task=1", f"--output={out}", "slurm/train.sbatch",
                             f"run.dir={run_dir}", *JOB, "parallel.lift_parallel=2", "run.progress=false")
        state = cluster.wait(job, 300)[0]
        log = out.read_text()
        assert state["JobState"] == "COMPLETED", f"{log[-4000:]}\n{cluster.logs()}"
        assert "world 2 = 2 node(s) x 1 processes" in log and f"c10d at {cluster.hosts[0]}:" in log, log
        assert "world 2 = lift_parallel 2 x data_parallel 1" in log, log[-4000:]
        assert sorted(p.name for p in run_dir.glob("torchrun-*.log")) == [f"torchrun-{h}.log" for h in cluster.hosts]
        assert_curves_match(losses(run_dir), reference, 1e-5)
    finally:
        cluster.stop()
