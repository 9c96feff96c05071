"""Data: the teacher-student (witness) task, file datasets, and per-replica batches.

Teacher-student: the teacher is a small random sparse lift of the SAME base network with its own
seed and a Gaussian readout: a finite network of the family that reaches zero loss, i.e. the
witness of the convergence theorem (README, "Does it converge?"). Inputs are Gaussian or uniform on [-sqrt 3, sqrt 3] (unit variance);
labels are the teacher's outputs, standardised by the training labels' mean and std so a loss of
1.0 is "predicts the mean"; optional Gaussian label noise on the training split only.

Batches: the global batch of step `t` is a slice of a seeded permutation of the training set
(epoch `t // batches_per_epoch`), so the order is reproducible and a resumed run needs only the
step. Every rank of a lift-parallel group takes the same rows; data-parallel replica `k` of `D`
takes rows `[k B/D, (k+1) B/D)` of the global batch, so the layout never changes the samples.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError
from .graph import BaseGraph
from .lift import random_sparse_lift
from .model import LiftedNetwork


@dataclasses.dataclass
class Dataset:
    x_train: torch.Tensor  # [N, in_dim]
    y_train: torch.Tensor  # [N, out_dim]
    x_test: torch.Tensor
    y_test: torch.Tensor
    description: str = ""


def teacher_dataset(cfg: Config, base: BaseGraph, out_dim: int) -> Dataset:
    d = cfg.data
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
    mean, std = y[: d.n_train].mean(0), y[: d.n_train].std(0).clamp_min(1e-8)
    y = (y - mean) / std
    if d.label_noise > 0:
        y[: d.n_train] += d.label_noise * torch.randn(d.n_train, out_dim, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float()
    return Dataset(x[: d.n_train], y[: d.n_train], x[d.n_train:], y[d.n_train:],
                   f"teacher-student: teacher lift size {d.teacher_size}, degree {d.teacher_degree}, "
                   f"seed {d.teacher_seed}; {d.n_train} train / {d.n_test} test samples")


def file_dataset(cfg: Config, base: BaseGraph, out_dim: int) -> Dataset:
    path = Path(cfg.data.path)
    if not path.is_file():
        raise ConfigError(f"data.path={str(path)!r}: no such file")
    try:
        if path.suffix == ".npz":
            arrays = dict(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"data.path={str(path)!r}: use a .npz or .pt file holding arrays x and y")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: one line, not a torch traceback
        raise ConfigError(f"data.path={str(path)!r}: cannot read it as {path.suffix} arrays "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if not isinstance(arrays, dict) or "x" not in arrays or "y" not in arrays:
        raise ConfigError(f"data.path={str(path)!r}: the file must hold arrays named 'x' and 'y'")
    x, y = _numeric(path, "x", arrays["x"]), _numeric(path, "y", arrays["y"])
    if y.dim() == 1:
        y = y[:, None]
    if x.dim() != 2 or x.shape[1] != base.in_dim or y.shape[0] != x.shape[0] or y.shape[1] != out_dim:
        raise ConfigError(f"data.path={str(path)!r}: x {tuple(x.shape)} and y {tuple(y.shape)} do not fit "
                          f"the model (x [N, {base.in_dim}], y [N, {out_dim}])")
    n_test = min(cfg.data.n_test, x.shape[0] // 2)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.data.seed))
    x, y = x[perm], y[perm]
    n_train = x.shape[0] - n_test
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                   f"file {path.name}: {n_train} train / {n_test} test samples")


def _numeric(path: Path, name: str, a) -> torch.Tensor:
    """A float32 tensor of array `name`, or a one-line error: not numbers, or not finite."""
    arr = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"data.path={str(path)!r}: array {name!r} holds {arr.dtype} values, not numbers: "
                          "store float arrays")
    bad = ~np.isfinite(arr.astype(np.float64, copy=False))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ConfigError(f"data.path={str(path)!r}: array {name!r} has {int(bad.sum())} non-finite values "
                          f"(NaN or inf; the first at index {where}): clean the data before training")
    return torch.as_tensor(arr, dtype=torch.float32)


def build_dataset(cfg: Config, base: BaseGraph, out_dim: int) -> Dataset:
    ds = teacher_dataset(cfg, base, out_dim) if cfg.data.kind == "teacher" else file_dataset(cfg, base, out_dim)
    if cfg.train.batch_size > ds.x_train.shape[0]:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                          f"({ds.x_train.shape[0]} samples): lower it or add data")
    return ds


class Batches:
    """The batch of any step, for one data-parallel replica; reproducible from the seed."""

    def __init__(self, ds: Dataset, global_batch: int, data_rank: int, data_parallel: int, seed: int):
        # divisibility of the batch by the replicas is checked with the config (`Config.check_world`)
        self.ds, self.B, self.seed = ds, global_batch, seed
        self.per_replica = global_batch // data_parallel
        self.lo = data_rank * self.per_replica
        self.per_epoch = ds.x_train.shape[0] // global_batch
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.ds.x_train.shape[0], generator=g), epoch
        idx = self._perm[j * self.B + self.lo: j * self.B + self.lo + self.per_replica]
        return self.ds.x_train[idx], self.ds.y_train[idx]
