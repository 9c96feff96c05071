"""The associative recall data kind, the CNN and attention configs, and the seeds experiment.

- `recall_arrays_from`: distinct keys per sample, the query is one of them, the label is its
  value; deterministic; bad settings are one line.
- `configs/mnist1d_cnn.yaml` and `configs/attention_recall.yaml` load, build their lifts, and
  their data has the model's width (recall generated here; MNIST-1D only if the package is there).
- `python -m randlift_dist.experiments.seeds` runs a config over two seeds and writes the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import train_env
from randlift_dist import LiftedNetwork
from randlift_dist.config import ConfigError, load_config
from randlift_dist.data.recall import recall_arrays_from

REPO = Path(__file__).resolve().parents[1]


def test_recall_samples():
    x, y = recall_arrays_from(500, 4, 9, 6, seed=3)
    assert x.shape == (500, 9) and x.dtype == np.float32 and y.shape == (500,) and y.dtype == np.int64
    keys, vals, q = x[:, 0:8:2].astype(int), x[:, 1:8:2].astype(int), x[:, 8].astype(int)
    assert all(len(set(k)) == 4 for k in keys) and keys.max() < 9 and vals.min() >= 9 and vals.max() < 15
    for i in range(500):
        (j,) = np.flatnonzero(keys[i] == q[i])
        assert y[i] == vals[i, j] - 9
    assert set(np.unique(y)) == set(range(6))
    x2, y2 = recall_arrays_from(500, 4, 9, 6, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(recall_arrays_from(500, 4, 9, 6, seed=4)[0], x)
    with pytest.raises(ConfigError, match="keys >= pairs"):
        recall_arrays_from(10, 5, 4, 6, seed=0)


@pytest.mark.parametrize("name", ["attention_recall", "mnist1d_cnn"])
def test_configs_build(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=cfg.out_dim(base))
    assert cfg.train.loss == "cross_entropy" and net.out_dim == (10 if name == "mnist1d_cnn" else 32)
    if name == "attention_recall":
        from randlift_dist.data import build_dataset

        ds = build_dataset(cfg, base, net.out_dim)
        assert ds.x_train.shape == (8000, base.in_dim) and ds.y_train.max() < 32
        import torch

        out = net(ds.x_test[:3])
        assert out.shape == (3, 32) and torch.isfinite(out).all()


@pytest.mark.timeout(300)
def test_seeds_experiment(tmp_path):
    cmd = [sys.executable, "-m", "randlift_dist.experiments.seeds", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--seeds", "2", "--out", str(tmp_path), "--workers", "2", "train.steps=4", "train.eval_every=2",
           "parallel.engine=torch", "wandb.mode=disabled", "checkpoint.every=0"]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["seed"] for r in summary["rows"]] == [0, 1] and all(r["step"] == 4 for r in summary["rows"])
    assert summary["summary"]["test_loss"]["n"] == 2 and "| mean +- std" in proc.stdout
    again = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=280)  # finished: no rerun
    assert again.returncode == 0 and json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
    bad = subprocess.run(cmd[:-4] + ["train.stepz=3"], env=train_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.stepz" in bad.stderr and "Traceback" not in bad.stderr
