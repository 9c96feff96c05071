"""End-to-end: the real entry point under python and torchrun (gloo on CPU), as a user runs it.

Each launch costs seconds (imports, DeepSpeed), so each checks several things. Curves are compared
at 1e-4 relative over 20 steps against world size 1 with the torch engine.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from launch import assert_curves_match, launch, losses, metrics, run_launcher
from wandb_reader import history

QUICK = ["train.steps=20", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "wandb.mode=disabled",
         "train.optimizer=adam", "train.lr=0.02", "model.lift.size=48", "data.n_train=512", "data.n_test=64",
         "train.batch_size=32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    launch(d, 1, *QUICK, "parallel.engine=torch")
    return losses(d)


@pytest.mark.timeout(600)
def test_default_run_learns_and_logs(tmp_path):
    """The README's first command: the embedded default, DeepSpeed engine, wandb offline."""
    proc = launch(tmp_path, 1, timeout=600)
    recs = metrics(tmp_path)
    evals = [r["test_loss"] for r in recs if "test_loss" in r]
    assert recs[0]["step"] == 0 and len(evals) >= 2
    assert evals[-1] <= 0.5 * evals[0], f"test loss did not fall by half: {evals}"
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "edges_per_s", "comm_bytes", "peak_mem_mb"):
        assert key in recs[-1], key
    assert "final step 300" in proc.stdout
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["parallel"]["engine"] == "deepspeed" and resolved["run"]["dir"] == str(tmp_path)
    stats = json.loads((tmp_path / "lift_stats.json").read_text())
    assert stats["params"] > 0 and set(stats["per_edge"]) == {"x->h1", "h1->h2", "h2->y"}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000300"
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = [r for r in history(runs[0]) if "loss" in r]
    assert len(rows) == 30 and abs(rows[-1]["loss"] - recs[-1]["loss"]) < 1e-9
    assert any("test_loss" in r for r in history(runs[0]))


LAYOUTS = [
    ("torch", 0, 2, 1), ("torch", 0, 4, 2),
    ("deepspeed", 0, 2, 2), ("deepspeed", 0, 4, 2),
    ("deepspeed", 1, 2, 1), ("deepspeed", 1, 4, 2),
    ("deepspeed", 2, 2, 2), ("deepspeed", 2, 4, 2),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine, zero, nproc, lift_parallel", LAYOUTS,
                         ids=[f"{e}-zero{z}-{n}procs-lp{l}" for e, z, n, l in LAYOUTS])
def test_loss_curve_independent_of_layout(tmp_path, reference, engine, zero, nproc, lift_parallel):
    launch(tmp_path, nproc, *QUICK, f"parallel.engine={engine}", f"parallel.zero_stage={zero}",
           f"parallel.lift_parallel={lift_parallel}")
    assert_curves_match(losses(tmp_path), reference, 1e-4)
    recs = metrics(tmp_path)
    if lift_parallel > 1:
        assert all(r["comm_bytes"] > 0 for r in recs if "loss" in r)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("engine, zero, first, second", [
    ("torch", 0, (1, 1), (2, 2)),          # one process -> lift-parallel 2
    ("deepspeed", 1, (2, 2), (2, 1)),      # lift-parallel 2 -> data-parallel 2 (ZeRO-1 moments)
    ("deepspeed", 0, (1, 1), (1, 1)),      # same layout, stage 0 (client optimizer state)
], ids=["torch-1to2lp", "ds-zero1-lp2-to-dp2", "ds-zero0-same"])
def test_resume_continues_the_curve(tmp_path, reference, engine, zero, first, second):
    extra = [f"parallel.engine={engine}", f"parallel.zero_stage={zero}"]
    launch(tmp_path, first[0], *QUICK, *extra, f"parallel.lift_parallel={first[1]}", "train.stop_at=10")
    assert max(losses(tmp_path)) == 10
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000010"
    launch(tmp_path, second[0], *QUICK, *extra, f"parallel.lift_parallel={second[1]}")
    got = losses(tmp_path)
    assert_curves_match(got, reference, 1e-4, steps=list(range(11, 21)))


@pytest.mark.timeout(300)
def test_resume_refuses_a_different_lift(tmp_path):
    launch(tmp_path, 1, *QUICK, "parallel.engine=torch", "train.steps=3")
    proc = launch(tmp_path, 1, *QUICK, "parallel.engine=torch", "model.lift.seed=5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "different lift" in proc.stderr and "seed" in proc.stderr and "Traceback" not in proc.stderr


def lines_naming(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


@pytest.mark.timeout(300)
def test_malformed_config_fails_before_any_process_group(tmp_path):
    """Every case exits 2 with the bad key named once and no traceback: plain python, raw torchrun
    workers (the trainer's own status, rank 0 speaking), and the launcher (its preflight)."""
    cases = [("train.stepz=3",), ("parallel.lift_parallel=3",), ("train.batch_size=zz",), ("train.lr=-1",)]
    needles = ["train.stepz", "parallel.lift_parallel=3", "train.batch_size", "train.lr"]
    for case, needle in zip(cases, needles):
        proc = launch(tmp_path / "py", 1, *case, check=False, timeout=60)
        if needle != "parallel.lift_parallel=3":  # one process: lift_parallel 3 does not divide 1 either
            assert proc.returncode == 2 and lines_naming(proc.stderr, needle) == 1, (case, proc.stderr[-2000:])
        else:
            assert proc.returncode == 2 and "divisor" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        run = run_launcher("run.sh", tmp_path / "launcher", *case, env={"NPROC": "2"}, timeout=120)
        assert run.returncode == 2, (case, run.returncode, run.stderr[-2000:])
        assert lines_naming(run.stderr, needle) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert "init_process_group" not in run.stderr
    # raw torchrun: the workers exit 2 before any process group; only rank 0 says why
    proc = launch(tmp_path / "raw", 2, "train.stepz=3", check=False, timeout=120)
    assert proc.returncode != 0 and lines_naming(proc.stderr, "unknown key train.stepz") == 1, proc.stderr[-2000:]
    assert "init_process_group" not in proc.stderr
