"""The single-node launcher (`launch/run.sh` -> `randlift-launch`) restarts a killed worker and reports errors once.

A lift large enough that torchrun's default restart path failed on this project's machines
(`model.lift.size=20000`, lift-parallel 2, torch engine, gloo, about 2M parameters and 8 MB of
checkpoint per save) is trained for 40 steps with a checkpoint every 10; one worker is killed
with SIGKILL either in the middle of a step (after a step drawn from a seeded RNG) or while a
checkpoint is being written (as soon as `step_N.tmp` appears). The launcher restarts the worker
group, which resumes from the last complete checkpoint, and says once that it decided so from the
exit codes: SIGKILL to the killed rank. The job must end with status 0, every step must appear
once in metrics.jsonl, and the losses must equal an uninterrupted run's to 1e-6 (fp32, same
layout, so the same arithmetic). Bad input must stop the launch with status 2 and one line, before
torchrun starts and without torchrun's traceback; an error inside the job (status 2 from the
workers) must end it at once, without a restart.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch import (REPO, assert_curves_match, launcher_cmd, launcher_env, losses, metrics, partial_metrics,
                    run_launcher, trainer_workers)

STEPS = 40
BIG = ["parallel.engine=torch", "parallel.lift_parallel=2", "model.lift.size=20000", f"train.steps={STEPS}",
       "checkpoint.every=10", "train.log_every=1", "train.eval_every=0", "wandb.mode=disabled"]
ENV = {"NPROC": "2", "MAX_RESTARTS": "2"}
SEED = int(os.environ.get("RANDLIFT_TEST_SEED", "20261129"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    proc = run_launcher("run.sh", d, *BIG, env={**ENV, "MAX_RESTARTS": "0"}, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(d)


def _wait_then_kill(run_dir: Path, proc: subprocess.Popen, ready, rank: int, timeout: float) -> int:
    """Poll until `ready()`, then SIGKILL the worker of `rank`; returns its pid."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the launcher ended before the kill (status {proc.returncode})"
        assert time.monotonic() < deadline, f"not ready to kill in {timeout:.0f} s"
        time.sleep(0.002)
    pid = trainer_workers(run_dir).get(rank)
    assert pid is not None, f"no worker of rank {rank} found for {run_dir}"
    os.kill(pid, signal.SIGKILL)
    return pid


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the restarted job did not finish in {timeout:.0f} s:\n{err[-3000:]}")
    return out, err


def _check_recovered(run_dir: Path, out: str, err: str, rc: int, reference: dict[int, float], killed: int) -> None:
    assert rc == 0, f"launcher exited {rc}:\n{err[-3000:]}"
    assert f"final step {STEPS}" in out, out[-2000:]
    assert f"resumed from {run_dir}/checkpoints/step_" in err, "no restart happened:\n" + err[-3000:]
    said = [line for line in err.splitlines() if "restarting" in line]
    assert len(said) == 1, err[-3000:]  # the reason, said once, decided from the exit codes
    # the killed rank is named among those that died of SIGKILL (a survivor blocked in a collective
    # with the dead rank may outlast the agent's SIGTERM grace period and be SIGKILLed too)
    killed_ranks = re.search(r"SIGKILL to ranks? ([\d, ]+)", said[0])
    assert said[0].startswith("randlift-launch: attempt 1 of 3 failed: ") and killed_ranks \
        and killed in [int(r) for r in killed_ranks[1].split(",") if r.strip()] \
        and said[0].endswith("restarting from the latest checkpoint (restart 1 of 2)"), said[0]
    assert_curves_match(losses(run_dir), reference, 1e-6)  # the last record of each step
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(STEPS + 1)), f"metrics.jsonl steps are not 0..{STEPS} once each: {steps}"


@pytest.mark.timeout(240)
def test_kill_a_worker_mid_step(tmp_path, reference):
    rng = random.Random(SEED)
    step, rank = rng.randint(12, 32), rng.randint(0, 1)
    print(f"seed {SEED}: SIGKILL to rank {rank} after step {step}")
    proc = subprocess.Popen(launcher_cmd("run.sh", tmp_path, *BIG), env=launcher_env(ENV), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_then_kill(tmp_path, proc, lambda: any(r["step"] >= step for r in partial_metrics(tmp_path)), rank, 150)
        out, err = _finish(proc, 180)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_recovered(tmp_path, out, err, proc.returncode, reference, rank)


@pytest.mark.timeout(240)
def test_kill_a_worker_during_a_checkpoint_save(tmp_path, reference):
    rng = random.Random(SEED + 1)
    save, rank = rng.choice([20, 30]), rng.randint(0, 1)
    tmp_dir = tmp_path / "checkpoints" / f"step_{save:08d}.tmp"
    print(f"seed {SEED + 1}: SIGKILL to rank {rank} while {tmp_dir.name} exists")
    proc = subprocess.Popen(launcher_cmd("run.sh", tmp_path, *BIG), env=launcher_env(ENV), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_then_kill(tmp_path, proc, tmp_dir.exists, rank, 150)
        out, err = _finish(proc, 180)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check_recovered(tmp_path, out, err, proc.returncode, reference, rank)
    # the interrupted save never became a checkpoint: the job resumed from the one before it
    assert f"resumed from {tmp_path}/checkpoints/step_{save - 10:08d} at step {save - 10}" in err, err[-3000:]


@pytest.mark.timeout(120)
def test_bad_override_exits_2_with_one_line_before_torchrun(tmp_path):
    proc = run_launcher("run.sh", tmp_path, "train.steps=-1", env=ENV, timeout=100)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "train.steps" in line]
    assert len(lines) == 1 and "-1" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("torchrun-*.log")), "torchrun started despite the bad input"


@pytest.mark.timeout(200)
def test_error_inside_the_job_is_said_once_and_not_retried(tmp_path):
    """A checkpoint of another lift (status 2 from rank 0 under torchrun): no restart, one line."""
    small = ["parallel.engine=torch", "parallel.lift_parallel=2", "model.lift.size=48", "train.steps=4",
             "train.eval_every=0", "wandb.mode=disabled"]
    first = run_launcher("run.sh", tmp_path, *small, env=ENV, timeout=100)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = run_launcher("run.sh", tmp_path, *small, "model.lift.seed=5", env=ENV, timeout=150)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "different lift" in line]
    assert len(said) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert "restarting" not in proc.stderr, proc.stderr[-3000:]
    log = next(tmp_path.glob("torchrun-*.log")).read_text().split("\n==== ")
    # the second launch: one attempt, ended by the exit code 2 of its workers
    assert sum("attempt 1 of 3 (round" in e for e in log) == 2 and not any("attempt 2 of 3" in e for e in log), log
    decided = [e for e in log[-2:] if e.split(" ", 2)[-1].startswith("attempt 1: ")]
    assert decided and "exit status 2 from rank" in decided[0] and decided[0].rstrip().endswith(": final"), log[-3:]
