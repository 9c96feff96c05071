"""The teacher-student task (`data.kind: teacher`): the witness network of the convergence theorem.

The teacher is a small random sparse lift of the SAME base network (`data.teacher_size`,
`teacher_degree`, `teacher_seed`) with a Gaussian readout: a finite network of the family that
fits the task exactly. Inputs are Gaussian or uniform on [-sqrt 3, sqrt 3] (unit variance).
- Regression (`train.loss: mse`): labels are the teacher's outputs, standardised by the training
  labels' mean and std (a loss of 1.0 is "predicts the mean"), with optional Gaussian label noise
  on the training split only (`data.label_noise`).
- Classification (`train.loss: cross_entropy`): the label of a sample is the index of the teacher's
  largest output (`out_dim >= 2` classes), so the teacher reaches accuracy 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..graph import BaseGraph
from ..lift import random_sparse_lift
from ..model import LiftedNetwork
from ..tasks import Task
from .shards import DataError


def teacher_arrays(d, base: BaseGraph, task: Task):
    """`(x_train, y_train, x_test, y_test, description)` of the teacher task for data config `d`."""
    out_dim = task.out_dim
    if task.classification and out_dim < 2:
        raise DataError("data.kind=teacher with train.loss=cross_entropy labels each sample by the teacher's "
                        "largest output: it needs model.out_dim >= 2 classes")
    lift = random_sparse_lift(base, d.teacher_size, d.teacher_degree, seed=d.teacher_seed)
    teacher = LiftedNetwork(base, lift, out_dim=out_dim, readout_scale="sqrt", seed=d.teacher_seed,
                            readout_init="normal", dtype=torch.float64)
    g = torch.Generator().manual_seed(d.seed)
    n = d.n_train + d.n_test
    if d.input_dist == "gaussian":
        x = torch.randn(n, base.in_dim, generator=g, dtype=torch.float64)
    else:
        x = (torch.rand(n, base.in_dim, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3.0)
    with torch.no_grad():
        y = torch.cat([teacher(x[i:i + 4096]) for i in range(0, n, 4096)])
    what = (f"teacher-student: teacher lift size {d.teacher_size}, degree {d.teacher_degree}, seed {d.teacher_seed}; "
            f"{d.n_train} train / {d.n_test} test samples")
    if task.classification:
        labels = y.argmax(1).numpy().astype(np.int64)
        x = x.float().numpy()
        return x[: d.n_train], labels[: d.n_train], x[d.n_train:], labels[d.n_train:], \
            what + f", {out_dim} classes (argmax of the teacher's outputs)"
    mean, std = y[: d.n_train].mean(0), y[: d.n_train].std(0).clamp_min(1e-8)
    y = (y - mean) / std
    if d.label_noise > 0:
        y[: d.n_train] += d.label_noise * torch.randn(d.n_train, out_dim, generator=g, dtype=torch.float64)
    x, y = x.float().numpy(), y.float().numpy()
    return x[: d.n_train], y[: d.n_train], x[d.n_train:], y[d.n_train:], what
