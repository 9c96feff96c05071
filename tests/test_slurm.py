"""SLURM support on a real one-node cluster on localhost, and the pure-Python parts without one.

The `slurm`-marked tests install Debian's slurm-wlm and munge when they are missing (root and
apt-get needed, else skipped), write a one-node configuration in a temporary directory
(proctrack/linuxproc, task/none, cons_tres, random free ports, a random first job id so that two
clusters on one machine derive different rendezvous ports), start munged, slurmctld and slurmd in
the foreground as children of pytest (a finalizer stops them, also on failure; PR_SET_PDEATHSIG
ends them if pytest dies), and submit the real scripts: `slurm/train.sbatch` (torchrun, 2
processes), a two-task `srun` without torchrun, a two-task `slurm/sweep.sbatch` array then
`python -m randlift_dist.experiments.collect`, and USR1 preemption: checkpoint (status 75),
requeue, resume.
Munge is used when it starts (a fresh key in the temp dir); otherwise auth/none (reported by
`test_cluster_is_up`). Jobs run from the interpreter running pytest (VENV and PATH are exported).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from randlift_dist.experiments import collect
from randlift_dist.launch_env import discover_env, expand_nodelist, rendezvous_address, slurm_master_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["wandb.mode=disabled", "parallel.engine=torch", "run.progress=false"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


# ------------------------------------------------------------------ without a cluster
@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
    ("rack[1-2]-n[9-10]", ["rack1-n9", "rack1-n10", "rack2-n9", "rack2-n10"]),
    ("a[09-11],b", ["a09", "a10", "a11", "b"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _set_env(monkeypatch, **values):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))


def test_discover_env_and_rendezvous_under_slurm(monkeypatch):
    # the batch script carries SLURM_PROCID=0 and SLURM_NTASKS but is not a step: one process
    _set_env(monkeypatch, SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=12345, SLURM_JOB_NODELIST="gpu[003-004]")
    assert discover_env() == (0, 1, 0)
    assert rendezvous_address() == ("127.0.0.1", "29500")
    # a task of `srun --ntasks=4`: ranks from SLURM_*, rendezvous on the step's first node
    _set_env(monkeypatch, SLURM_PROCID=3, SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4, SLURM_LOCALID=1, SLURM_STEP_ID=0,
             SLURM_JOB_ID=12345, SLURM_JOB_NODELIST="gpu[001-004]", SLURM_STEP_NODELIST="gpu[003-004]")
    assert discover_env() == (3, 4, 1)
    assert rendezvous_address() == ("gpu003", str(slurm_master_port(12345))) == ("gpu003", "20345")
    monkeypatch.setenv("MASTER_PORT", "4242")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert rendezvous_address() == ("10.0.0.1", "4242")  # set values win
    # `srun torchrun`: torchrun's variables win over the inherited SLURM_PROCID / SLURM_NTASKS
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert discover_env() == (5, 8, 1)
    # a single-task step is one process with the local defaults
    _set_env(monkeypatch, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_ID=0, SLURM_JOB_ID=7, SLURM_JOB_NODELIST="n1")
    assert discover_env() == (0, 1, 0) and rendezvous_address() == ("127.0.0.1", "29500")


def _fake_run(root: Path, size: int, seed: int, test_losses: list[float], steps: int) -> None:
    d = root / f"s{size}_seed{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"lift": {"size": size, "seed": seed}},
                                                   "train": {"steps": steps}}))
    recs = [{"step": 0, "test_loss": 1.0}] + [{"step": 10 * (i + 1), "loss": t * 0.9, "test_loss": t}
                                              for i, t in enumerate(test_losses)]
    recs.append({"step": 10 * len(test_losses) + 5, "loss": 0.5})  # a later record without test_loss
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9')  # torn line


def test_collect_table_and_fractions(tmp_path, capsys):
    _fake_run(tmp_path, 64, 0, [0.5, 0.01], steps=25)
    _fake_run(tmp_path, 64, 1, [0.5, 0.2], steps=25)
    _fake_run(tmp_path, 256, 0, [0.1, 0.001], steps=25)
    _fake_run(tmp_path, 256, 1, [0.3], steps=100)  # unfinished
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text("")
    assert collect.main([str(tmp_path), "--target-loss", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    runs = {(r["size"], r["seed"]): r for r in out["runs"] if r["size"] is not None}
    assert runs[(64, 0)]["test_loss"] == 0.01 and runs[(64, 0)]["step"] == 20 and runs[(64, 0)]["done"] is False
    assert runs[(256, 1)]["test_loss"] == 0.3 and runs[(256, 1)]["loss"] == 0.5
    assert any("error" in r and r["size"] is None for r in out["runs"])  # the broken dir is listed
    sizes = {s["size"]: s for s in out["by_size"]}
    assert sizes[64]["fraction"] == 0.5 and sizes[256]["fraction"] == 0.5 and sizes[64]["seeds"] == [0, 1]
    assert collect.main([str(tmp_path), "--target-loss", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "reached<=0.05" in text and "s256_seed1" in text
    assert collect.main([str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------ the cluster
def _pdeathsig():
    """Run in the child before exec: die with SIGTERM when pytest dies (no daemon outlives it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not glibc: the fixture's finalizer still stops the daemons


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ensure_slurm_installed() -> None:
    needed = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged")
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed):
        return
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm / munge are not installed and this user is not root (cannot apt-get install)")
    if not shutil.which("apt-get"):
        pytest.skip("slurm-wlm / munge are not installed and apt-get is unavailable")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=180"]
    with open("/tmp/randlift_slurm_apt.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two test sessions must not run apt at once
        if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed):
            return
        up = subprocess.run(["apt-get", *lock, "update"], env=env, capture_output=True, text=True, timeout=240)
        if up.returncode != 0:
            pytest.skip(f"apt-get update failed (no package network?): {up.stderr[-500:]}")
        inst = subprocess.run(["apt-get", *lock, "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"],
                              env=env, capture_output=True, text=True, timeout=400)
        assert inst.returncode == 0, f"apt-get install slurm-wlm munge failed:\n{inst.stdout[-2000:]}\n{inst.stderr[-2000:]}"


class Cluster:
    """A one-node SLURM cluster in `root`; `run` and `sbatch` talk to it."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.auth = "none"
        self.node = socket.gethostname().split(".")[0]
        self.env: dict[str, str] = {}
        self.sockets: Path | None = None

    # -- daemons
    def start(self) -> None:
        r = self.root
        for d in ("state", "log", "out"):
            (r / d).mkdir(exist_ok=True)
        # unix sockets (munge, slurmstepd) need short paths, whatever the pytest basetemp is
        self.sockets = Path(tempfile.mkdtemp(prefix="rlslurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
        for d in ("spool", "munge"):
            (self.sockets / d).mkdir()
        try:
            socket.gethostbyname(self.node)
        except OSError:
            pytest.skip(f"this host's name {self.node!r} does not resolve: SLURM node names must resolve")
        self.auth = "munge" if self._start_munge() else "none"
        # job ids (and so the derived rendezvous ports 20000 + id % 12000) start at a random offset
        first = next((f for f in (random.randrange(1, 11000) for _ in range(50))
                      if all(_port_free(20000 + (f + k) % 12000) for k in range(16))), random.randrange(1, 11000))
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = int(mem_kb / 1024 * 0.8)
        auth = (f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.sockets}/munge/munge.sock\n"
                if self.auth == "munge" else "AuthType=auth/none\nCredType=cred/none\n")
        conf = r / "slurm.conf"
        conf.write_text(f"""ClusterName=rltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
{auth}SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={self.sockets}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
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
FirstJobId={first}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count() or 2)} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=30 State=UP
""")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu",
                   WANDB_SILENT="true", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
        if sys.prefix != sys.base_prefix:
            env["VENV"] = sys.prefix  # the scripts activate the venv that runs these tests
        self.env = env
        self._spawn(["slurmctld", "-D", "-i"])
        self._spawn(["slurmd", "-D", "-N", self.node])
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    pytest.fail(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        pytest.fail(f"the node did not become idle in 60 s (state {state!r}):\n{self.logs()}")

    def _start_munge(self) -> bool:
        m = self.sockets / "munge"
        if not (shutil.which("munged") or Path("/usr/sbin/munged").exists()):
            return False
        os.chmod(m, 0o700)
        key = m / "munge.key"
        try:
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
            self._spawn(["munged", "-F", "--force", f"--socket={m}/munge.sock", f"--key-file={key}",
                         f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed"])
            for _ in range(50):
                if (m / "munge.sock").exists():
                    cred = subprocess.run(["munge", "-n", "-S", f"{m}/munge.sock"], capture_output=True, timeout=10)
                    ok = subprocess.run(["unmunge", "-S", f"{m}/munge.sock"], input=cred.stdout,
                                        capture_output=True, timeout=10)
                    if ok.returncode == 0:
                        return True
                time.sleep(0.1)
        except (OSError, subprocess.SubprocessError):
            pass
        self._stop_procs()  # fall back to auth/none
        return False

    def _spawn(self, cmd: list[str]) -> None:
        exe = shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}"
        log = open(self.root / "log" / f"{cmd[0]}.stdout", "ab")
        self.procs.append(subprocess.Popen([exe, *cmd[1:]], env=self.env or None, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))

    def stop(self) -> None:
        """Cancel every job, wait for them to end (bounded), stop the daemons."""
        if self.env and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        self._stop_procs()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def _stop_procs(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    # -- clients
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        return self.run("sbatch", "--parsable", "--time=10", *args, env=env or {}).stdout.strip().split(";")[0]

    def jobs(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job` fields of a job (one dict per array task)."""
        out = self.run("scontrol", "-o", "show", "job", job, check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job: str, timeout: float, until=None) -> list[dict[str, str]]:
        """Poll until `until(jobs)` (default: every task in a terminal state); fail after `timeout`."""
        until = until or (lambda jobs: jobs and all(j.get("JobState") in TERMINAL for j in jobs))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job)
            if until(jobs):
                return jobs
            time.sleep(0.5)
        raise AssertionError(f"job {job} not done in {timeout:.0f} s: "
                             f"{[(j.get('JobId'), j.get('JobState')) for j in self.jobs(job)]}\n{self.job_logs()}")

    def job_logs(self) -> str:
        return "\n".join(f"--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted((self.root / "out").glob("*.out")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (slurmd launches jobs as root here)")
    _ensure_slurm_installed()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(c.stop)  # before start: a half-started cluster is stopped too
    c.start()
    return c


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_cluster_is_up(cluster):
    print(f"SLURM {cluster.run('scontrol', '--version').stdout.strip()}, auth {cluster.auth}")
    assert "UP" in cluster.run("scontrol", "ping").stdout
    hosts = cluster.run("scontrol", "show", "hostnames", "gpu[001-003,007],login1,rack[1-2]-n[9-10]").stdout.split()
    assert hosts == expand_nodelist("gpu[001-003,007],login1,rack[1-2]-n[9-10]")


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_train_sbatch_torchrun_two_processes(cluster):
    run_dir = cluster.root / "train"
    job = cluster.sbatch("--cpus-per-task=2", f"--output={cluster.root}/out/train-%j.out", "slurm/train.sbatch",
                         f"run.dir={run_dir}", "train.steps=40", *TINY)
    state = cluster.wait(job, 150)[0]
    log = (cluster.root / "out" / f"train-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log
    recs = _metrics(run_dir)
    assert recs[-1]["step"] == 40 and "test_loss" in recs[-1], log
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000040"
    head = log.split("====\n")[1]  # the header, before the step's output
    assert "world 2 = 1 node(s) x 2 processes" in head and f"{cluster.node}:{slurm_master_port(int(job))}" in head
    assert f"nodes {cluster.node} (1)" in head
    commit = re.search(r"^commit: +([0-9a-f]{10})", head, re.M).group(1)
    assert subprocess.run(["git", "cat-file", "-t", commit], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() == "commit"
    name = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["name"]
    assert name.startswith(f"randlift-{commit}") and name.endswith(f"-1x2-j{job}")
    assert "world 2 = lift_parallel 1 x data_parallel 2 (backend gloo)" in log


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_srun_two_tasks_without_torchrun(cluster):
    probe = ("import json, os; from randlift_dist.launch_env import discover_env, rendezvous_address; "
             "print(json.dumps([discover_env(), rendezvous_address(), os.environ['SLURM_JOB_ID']]))")
    out = cluster.run("srun", "--ntasks=2", "--time=5", "python", "-c", probe, timeout=120).stdout
    seen = sorted(json.loads(line) for line in out.splitlines() if line.startswith("["))
    job = int(seen[0][2])
    assert [s[0] for s in seen] == [[0, 2, 0], [1, 2, 1]]
    assert all(s[1] == [cluster.node, str(slurm_master_port(job))] for s in seen)
    run_dir = cluster.root / "srun"
    proc = cluster.run("srun", "--ntasks=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", "--time=5",
                       "python", "-m", "randlift_dist.train", f"run.dir={run_dir}", "train.steps=40", *TINY,
                       timeout=150)
    assert "world 2 = lift_parallel 1 x data_parallel 2" in proc.stderr, proc.stderr[-3000:]
    assert _metrics(run_dir)[-1]["step"] == 40 and "final step 40" in proc.stdout


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_sweep_array_and_collect(cluster):
    root = cluster.root / "sweep"
    proc = cluster.run("bash", "slurm/sweep.sbatch", "train.steps=30", "train.eval_every=10", "data.n_train=512",
                       *TINY, env={"SIZES": "16 32", "SEEDS": "7", "ROOT": str(root),
                                   "SBATCH_OUTPUT": f"{cluster.root}/out/sweep-%A_%a.out", "SBATCH_TIMELIMIT": "10"})
    job = re.search(r"submitted sweep (\d+): 2 runs", proc.stdout).group(1)
    tasks = cluster.wait(job, 150)
    assert len(tasks) == 2 and all(t["JobState"] == "COMPLETED" for t in tasks), cluster.job_logs()
    for size in (16, 32):
        cfg = yaml.safe_load((root / f"s{size}_seed7" / "config.yaml").read_text())
        assert (cfg["model"]["lift"]["size"], cfg["model"]["lift"]["seed"]) == (size, 7)
        assert _metrics(root / f"s{size}_seed7")[-1]["step"] == 30
    finals = {s: _metrics(root / f"s{s}_seed7")[-1]["test_loss"] for s in (16, 32)}
    eps = (finals[16] + finals[32]) / 2
    out = cluster.run("python", "-m", "randlift_dist.experiments.collect", str(root), "--target-loss", repr(eps),
                      "--json").stdout
    table = json.loads(out)
    assert [(r["size"], r["seed"], r["step"], r["done"]) for r in table["runs"]] == [(16, 7, 30, True), (32, 7, 30, True)]
    fractions = {s["size"]: s["fraction"] for s in table["by_size"]}
    assert fractions == {s: float(finals[s] <= eps) for s in (16, 32)} and sum(fractions.values()) == 1.0
    text = cluster.run("python", "-m", "randlift_dist.experiments.collect", str(root)).stdout
    assert "s16_seed7" in text and "median_test" in text


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_usr1_checkpoints_requeues_and_resumes(cluster):
    run_dir = cluster.root / "preempt"
    log = cluster.root / "out" / "preempt.out"
    job = cluster.sbatch("--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", f"run.dir={run_dir}",
                         "train.steps=100000", "train.log_every=5", "checkpoint.every=0", *TINY)
    deadline = time.monotonic() + 120
    while not any(r.get("step", 0) >= 5 for r in _metrics(run_dir)):
        assert time.monotonic() < deadline, f"training did not start:\n{cluster.job_logs()}"
        time.sleep(0.3)
    # what SLURM does before the time limit (#SBATCH --signal=B:USR1@300): USR1 to the batch shell
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    cluster.wait(job, 90, until=lambda js: js and js[0].get("Restarts") == "1"
                 and js[0]["JobState"] in ("PENDING", "RUNNING"))
    stopped = int(re.search(r"stopping at step (\d+) \(signal (?:15|SIGTERM)\)", log.read_text()).group(1))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}", log.read_text()
    # the launcher's status for a stop with a checkpoint, as under plain python and launch/run.sh
    assert "training step exited with status 75" in log.read_text(), log.read_text()
    assert f"requeueing {job}" in log.read_text()
    requeued_at = time.monotonic()

    def resumed(js):
        # SLURM holds a requeued job back for about 2 minutes (BeginTime): start it sooner, but not
        # within 3 s of the requeue, or slurmd refuses it ("Job credential revoked", 1 s resolution)
        state = js[0]["JobState"] if js else "?"
        assert state not in TERMINAL, f"the requeued job ended: {state}\n{cluster.logs()}"
        if state == "PENDING" and js[0].get("Reason") == "BeginTime" and time.monotonic() > requeued_at + 3:
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return any(r["step"] > stopped for r in _metrics(run_dir))

    cluster.wait(job, 120, until=resumed)
    second = log.read_text().split("restart 1,", 1)[1]  # the requeued incarnation's log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in second
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps[steps.index(stopped) + 1] == (stopped // 5 + 1) * 5  # the curve continues after the resume point
    cluster.run("scancel", job)
    assert cluster.wait(job, 60)[0]["JobState"] == "CANCELLED"
