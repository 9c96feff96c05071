"""Classification end to end, through the real entry point: a `.npz` converted to shards by the
command-line tool, trained on 1 and 2 ranks (data- and lift-parallel, torch and DeepSpeed, bf16),
resumed, and malformed data refused in one line with exit status 2.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from launch import assert_curves_match, launch, metrics, run_launcher, train_env
from wandb_reader import history

CLS = ["train.loss=cross_entropy", "model.base.in_dim=6", "model.base.out_dim=3", "model.lift.size=40",
       "train.steps=16", "train.batch_size=32", "train.log_every=1", "train.eval_every=8", "checkpoint.every=0",
       "train.warmup_steps=2", "train.lr=0.03", "train.eval_train_max=100", "wandb.mode=disabled"]


def _classes(tmp_path):
    """A 3-class set whose labels a linear map of the inputs decides; 600 rows, 120 held out."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 3))).argmax(1)
    np.savez(tmp_path / "cls.npz", x=x, y=y)
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "randlift_dist.data", "write", "--npz", str(tmp_path / "cls.npz"),
                           "--out", str(out), "--n-test", "120", "--classes", "3", "--shard-mb", "0.002"],
                          capture_output=True, text=True, env=train_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("train-*.x.npy"))) >= 4  # several shards: rows cross files
    return out


def _curve(run_dir, key):
    return {r["step"]: r[key] for r in metrics(run_dir) if key in r}


@pytest.mark.timeout(900)
def test_shards_train_equal_across_layouts_engines_and_resume(tmp_path):
    shards = _classes(tmp_path)
    data = ["data.kind=shards", f"data.path={shards}"]
    ref = tmp_path / "ws1"
    proc = launch(ref, 1, *CLS, *data, "parallel.engine=torch", "wandb.mode=offline")
    recs = metrics(ref)
    assert recs[0]["step"] == 0 and {"test_loss", "test_accuracy", "train_loss", "train_accuracy"} <= set(recs[0])
    final = recs[-1]
    assert final["step"] == 16 and 0 <= final["accuracy"] <= 1 and final["test_accuracy"] > 0.6, final
    assert f"test_accuracy {final['test_accuracy']:.6g}" in proc.stdout  # the final summary line
    rows = history(next((ref / "wandb").glob("offline-run-*/run-*.wandb")))
    assert any("test_accuracy" in r for r in rows) and any("accuracy" in r for r in rows)
    loss, acc = _curve(ref, "loss"), _curve(ref, "accuracy")
    for name, nproc, extra in [("dp2", 2, ["parallel.engine=torch"]),
                               ("lp2_ds", 2, ["parallel.engine=deepspeed", "parallel.lift_parallel=2"])]:
        d = tmp_path / name
        launch(d, nproc, *CLS, *data, *extra)
        assert_curves_match(_curve(d, "loss"), loss, rtol=1e-4)
        assert _curve(d, "accuracy") == acc  # the same hits, step by step
        assert _curve(d, "test_accuracy") == _curve(ref, "test_accuracy")
    stopped = tmp_path / "resumed"
    launch(stopped, 1, *CLS, *data, "parallel.engine=torch", "train.stop_at=7")
    launch(stopped, 2, *CLS, *data, "parallel.engine=torch")  # resumed on another layout
    assert_curves_match(_curve(stopped, "loss"), loss, rtol=1e-4)
    assert sorted(_curve(stopped, "loss")) == list(range(1, 17))  # each step once


@pytest.mark.timeout(600)
def test_bf16_cross_entropy_is_layout_independent(tmp_path):
    shards = _classes(tmp_path)
    bf16 = [*CLS, "data.kind=shards", f"data.path={shards}", "parallel.engine=deepspeed", "parallel.zero_stage=1",
            "parallel.precision=bf16", "train.steps=8"]
    launch(tmp_path / "a", 1, *bf16)
    launch(tmp_path / "b", 2, *bf16, "parallel.lift_parallel=2")
    a, b = _curve(tmp_path / "a", "loss"), _curve(tmp_path / "b", "loss")
    # bf16 sums in another order give results a few bf16 ulps (2^-8 relative) apart; the loss is
    # computed in float32 from the bf16 logits
    assert_curves_match(b, a, rtol=3e-2)
    assert all(np.isfinite(list(a.values())))


def _refused(tmp_path, name, *overrides, nproc=1):
    """Exit status 2 and one line: the plain entry point, or the launcher for 2 ranks (plain torchrun
    exits 1 whatever its workers' status)."""
    if nproc == 1:
        proc = launch(tmp_path / name, 1, *overrides, check=False, timeout=300)
    else:
        proc = run_launcher("run.sh", tmp_path / name, *overrides, env={"NPROC": str(nproc)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("randlift-train")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(600)
def test_malformed_data_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((64, 6)).astype(np.float32), rng.integers(0, 3, 64)
    bad = y.copy()
    bad[9] = 3
    np.savez(tmp_path / "range.npz", x=x, y=bad)
    np.savez(tmp_path / "float.npz", x=x, y=y.astype(np.float32))
    quick = [*CLS, "train.steps=2", "train.batch_size=16", "parallel.engine=torch"]
    line = _refused(tmp_path, "r1", *quick, "data.kind=npz", f"data.path={tmp_path / 'range.npz'}")
    assert "range.npz" in line and "labels outside [0, 3)" in line
    line = _refused(tmp_path, "r2", *quick, "data.kind=npz", f"data.path={tmp_path / 'float.npz'}")
    assert "float.npz" in line and "integer class labels" in line
    shards = _classes(tmp_path)
    f = sorted(shards.glob("train-*.y.npy"))[1]
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(bytes(raw))
    line = _refused(tmp_path, "r4", *quick, "data.kind=shards", f"data.path={shards}", nproc=2)
    assert f.name in line and "sha256 mismatch" in line
    np.save(f, np.zeros((3, 2), np.int64))
    line = _refused(tmp_path, "r5", *quick, "data.kind=shards", f"data.path={shards}")
    assert f.name in line and "the index says" in line
