"""Faults a long run meets, through the real entry point: non-finite steps, reruns, refused resumes,
bad data, signals, a stopped peer, settings the machine cannot honour.

Each case launches `python -m randlift_dist.train` (torchrun for the stopped peer) and checks the
exit code, the one-line message, and what is on disk afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch import launch, metrics, train_env
from randlift_dist import checkpoint as ck

FAST = ["parallel.engine=torch", "wandb.mode=disabled", "model.lift.size=32", "data.n_train=256", "data.n_test=64",
        "train.batch_size=32", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=0"]


def run(run_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return launch(run_dir, 1, *FAST, *overrides, timeout=timeout, check=False)


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.timeout(300)
def test_divergence_stops_and_keeps_the_good_checkpoints(tmp_path):
    """SGD at lr 1e6 (a YAML float written 1e6) overflows within a few steps: exit 3 naming the step
    and the quantity, no checkpoint of the bad state, exit_status.json for launchers."""
    proc = run(tmp_path, "train.optimizer=sgd", "train.lr=1e6", "train.grad_clip=0", "train.steps=40",
               "checkpoint.every=1", "checkpoint.keep=100")
    assert proc.returncode == 3, proc.stderr[-2000:]
    no_traceback(proc)
    line = [ln for ln in proc.stderr.splitlines() if "non-finite" in ln]
    assert len(line) == 1 and " at step " in line[0], proc.stderr[-2000:]
    bad = int(line[0].split(" at step ")[1].split(":")[0])
    assert checkpoints(tmp_path)[-1] == f"step_{bad - 1:08d}"  # every good step saved, the bad one not
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["code"] == 3 and f"step {bad}" in status["message"]


@pytest.mark.timeout(300)
def test_skip_drops_nonfinite_steps_then_stops_after_max_in_a_row(tmp_path):
    proc = run(tmp_path, "train.optimizer=sgd", "train.lr=1e6", "train.grad_clip=0", "train.steps=40",
               "train.on_nonfinite=skip", "train.max_skipped=3", "checkpoint.every=0")
    assert proc.returncode == 3, proc.stderr[-2000:]
    dropped = [ln for ln in proc.stderr.splitlines() if "update dropped" in ln]
    assert len(dropped) == 3, proc.stderr[-2000:]
    assert "3 non-finite steps in a row" in proc.stderr
    assert not (tmp_path / "checkpoints").exists() or not checkpoints(tmp_path)


@pytest.mark.timeout(300)
def test_reruns_stop_at_and_refused_resumes(tmp_path):
    """stop_at then the same command: to the end; the finished run rerun: one line, exit 0, nothing
    trained; a changed lift or changed data: refused with exit 2 and nothing on disk changed."""
    first = run(tmp_path, "train.steps=12", "train.stop_at=5", "checkpoint.every=0")
    assert first.returncode == 0 and steps_logged(tmp_path) == [1, 2, 3, 4, 5], first.stderr[-2000:]
    second = run(tmp_path, "train.steps=12", "train.stop_at=5", "checkpoint.every=0")
    assert second.returncode == 0 and steps_logged(tmp_path) == list(range(1, 13)), second.stderr[-2000:]
    assert "final step 12" in second.stdout
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    third = run(tmp_path, "train.steps=12", "train.stop_at=5", "checkpoint.every=0")
    assert third.returncode == 0 and "already finished" in third.stdout and "nan" not in third.stdout.lower()
    assert len((third.stdout + third.stderr).strip().splitlines()) == 1
    for changed in ("model.lift.seed=9", "data.teacher_seed=7"):
        refused = run(tmp_path, "train.steps=20", changed)
        assert refused.returncode == 2, refused.stderr[-2000:]
        no_traceback(refused)
        key = changed.split("=")[0]
        assert ("lift" in refused.stderr) if key.startswith("model") else (key in refused.stderr)
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "exit_status.json"}
        assert after == {p: b for p, b in before.items() if p.name != "exit_status.json"}, \
            "a refused resume changed files in the run directory"
    allowed = run(tmp_path, "train.steps=14", "data.teacher_seed=7", "train.resume_allow_data_change=true")
    assert allowed.returncode == 0 and steps_logged(tmp_path) == list(range(1, 15)), allowed.stderr[-2000:]


def flip_byte(path: Path, where: float = 0.5) -> None:
    """Flip one byte of a file, at the fraction `where` of its length (inside some checksummed block)."""
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(300)
def test_a_damaged_final_checkpoint_is_reported_and_trained_again(tmp_path):
    """Issue 18: a finished run whose final checkpoint has a flipped byte is not 'already finished':
    the same command names the damaged file in one line, resumes from the newest intact checkpoint
    and trains to the end again, on the same curve; then it is finished."""
    same = ["train.steps=8", "checkpoint.every=4", "checkpoint.keep=3"]
    first = run(tmp_path, *same)
    assert first.returncode == 0, first.stderr[-2000:]
    curve = {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r}
    final = tmp_path / "checkpoints" / "step_00000008"
    flip_byte(final / "shard_0000.bin")
    second = run(tmp_path, *same)
    assert second.returncode == 0 and "already finished" not in second.stdout, second.stdout + second.stderr[-2000:]
    no_traceback(second)
    named = [ln for ln in second.stderr.splitlines() if str(final) in ln and "checkpoint:" in ln]
    assert len(named) == 1 and "shard_0000.bin" in named[0] and "sha256" in named[0], second.stderr[-2000:]
    assert sum("sha256" in ln for ln in second.stderr.splitlines()) == 1
    assert "final checkpoint" in named[0] and "training to step 8 again" in named[0]
    resumed = tmp_path / "checkpoints" / "step_00000004"
    assert f"resuming from {resumed} (newest intact checkpoint)" in second.stderr, second.stderr[-2000:]
    assert "final step 8" in second.stdout
    assert steps_logged(tmp_path) == list(range(1, 9))  # each step once, 5..8 trained again
    assert {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r} == curve
    assert ck.find_intact(tmp_path / "checkpoints") == (final, [])  # the final checkpoint written anew
    third = run(tmp_path, *same)
    assert third.returncode == 0 and "already finished" in third.stdout, third.stdout + third.stderr[-2000:]
    assert len((third.stdout + third.stderr).strip().splitlines()) == 1
    # every checkpoint damaged, the final one included: trained again from step 0, still exit 0
    for d in (tmp_path / "checkpoints").glob("step_*"):
        flip_byte(d / "shard_0000.bin", 0.25)
    fourth = run(tmp_path, *same)
    assert fourth.returncode == 0 and "no intact checkpoint: starting from step 0" in fourth.stderr, fourth.stderr
    assert {r["step"]: r["loss"] for r in metrics(tmp_path) if "loss" in r} == curve


@pytest.mark.timeout(300)
def test_bad_data_and_machine_settings_are_refused_in_one_line(tmp_path):
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    y = x[:, :1].copy()
    y[10, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    np.savez(tmp_path / "text.npz", x=np.array([["a"] * 4] * 64), y=y)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases = {"nan.npz": "non-finite", "text.npz": "not numbers", "junk.pt": "cannot read"}
    for name, needle in cases.items():
        proc = run(tmp_path / name.replace(".", "_"), "data.kind=file", f"data.path={tmp_path / name}",
                   "train.steps=2", "train.batch_size=8")
        assert proc.returncode == 2 and needle in proc.stderr, (name, proc.stderr[-2000:])
        no_traceback(proc)
    if not __import__("torch").cuda.is_available():
        proc = run(tmp_path / "nccl", "parallel.backend=nccl", "train.steps=2")
        assert proc.returncode == 2 and "nccl" in proc.stderr and "GPU" in proc.stderr
        no_traceback(proc)
    proc = run(tmp_path / "lr", "train.lr=1e-3", "train.steps=2", "train.momentum=1E-1")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.timeout(300)
def test_sigint_checkpoints_like_sigterm(tmp_path):
    cmd = [sys.executable, "-m", "randlift_dist.train", f"run.dir={tmp_path}", "run.progress=false", *FAST,
           "train.steps=100000", "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]  # stopped with a checkpoint: run again to continue
    assert "stopping at step" in err and "SIGINT" in err
    step = int(err.split("stopping at step ")[1].split()[0])
    assert checkpoints(tmp_path) == [f"step_{step:08d}"]


@pytest.mark.timeout(300)
def test_a_stopped_peer_ends_the_job_within_the_timeout(tmp_path):
    """SIGSTOP one of two ranks mid-run: the other's collective times out after parallel.timeout_s,
    it names what it was doing, and the job exits non-zero instead of hanging."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "randlift_dist.train", f"run.dir={tmp_path}", "run.progress=false", *FAST,
           "parallel.lift_parallel=2", "train.steps=100000", "checkpoint.every=0", "parallel.timeout_s=15"]
    proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(steps_logged(tmp_path) if (tmp_path / "metrics.jsonl").exists()
                                                  else []) < 3:
            time.sleep(0.5)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=150)
        waited = time.monotonic() - t0
    finally:
        for pid in _workers(proc.pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert waited < 120, f"the job took {waited:.0f} s to end after a peer stopped"
    line = [ln for ln in err.splitlines() if "randlift-train: rank 0" in ln]
    assert line and "during training step" in line[0], err[-3000:]


def _workers(launcher_pid: int) -> list[int]:
    """The trainer processes that torchrun started (children of its agent)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines()[1:]]
    kids = {int(p) for p, pp, _ in rows if int(pp) == launcher_pid}
    return sorted(int(p) for p, pp, a in rows if (int(pp) in kids or int(pp) == launcher_pid)
                  and "randlift_dist.train" in a and "torch.distributed.run" not in a)
