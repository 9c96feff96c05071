"""Tasks: what a run's outputs are compared with, and how. A `Task` owns the loss and the metrics.

- `mse` (regression): labels `[N, out_dim]` floats; loss = mean over samples and outputs of the
  squared error (the historical loss of the project); metric: `loss`.
- `cross_entropy` (classification): labels are integer classes `[N]` in `[0, classes)`, the readout's
  `out_dim = classes` outputs are logits; loss = mean over samples of `-log softmax(logits)[label]`
  (`torch.nn.functional.cross_entropy`: log-sum-exp with the maximum subtracted, so stable for any
  logits); metrics: `loss` and top-1 `accuracy` (ties go to the lowest class index, `argmax`).

Both compute in float32 (float64 when the outputs are float64) whatever the network's precision, so
a bf16 network's loss is the float32 loss of its bf16 logits, and the value does not depend on the
layout: every rank of a lift-parallel group holds the same outputs (the readout is all-reduced),
and data-parallel replicas' sums are added by the caller.

Evaluation sums (`Task.sums`) are plain per-sample sums (`loss` summed over samples, `correct`
counted), so that chunks and replicas add up exactly; `Task.metrics(sums, n)` turns them into
means. Labels are checked once, where the data is loaded (`check_labels`), not per batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from .config_parse import ConfigError

LOSSES = ("mse", "cross_entropy")


class LabelError(ConfigError):
    """Labels do not fit the task; the message names the array, the rule and the fix (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """The loss and metrics of a run: `loss` (`mse` or `cross_entropy`) and the readout width."""

    loss_name: str
    out_dim: int

    def __post_init__(self):
        if self.loss_name not in LOSSES:
            raise ValueError(f"loss {self.loss_name!r}: choose one of {LOSSES}")

    @property
    def classification(self) -> bool:
        return self.loss_name == "cross_entropy"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "accuracy") if self.classification else ("loss",)

    def label_dtype(self) -> torch.dtype:
        return torch.int64 if self.classification else torch.float32

    # ------------------------------------------------------------ training
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch: `out` `[B, out_dim]`, `y` `[B, out_dim]` floats or `[B]` classes."""
        out = _wide(out)
        y = y.to(out.device)
        if self.classification:
            return F.cross_entropy(out, y.long())
        return torch.mean((out - y.to(out.dtype)) ** 2)

    @torch.no_grad()
    def correct(self, out: torch.Tensor, y: torch.Tensor) -> int:
        """Top-1 hits of a batch (0 for regression)."""
        if not self.classification:
            return 0
        return int((out.argmax(1) == y.to(out.device).long()).sum())

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sums(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """`{"loss": sum over samples of the per-sample loss, "correct": top-1 hits}` (float64 sums)."""
        out = _wide(out)
        y = y.to(out.device)
        if self.classification:
            per = F.cross_entropy(out, y.long(), reduction="none")
            return {"loss": float(per.double().sum()), "correct": float(self.correct(out, y))}
        per = ((out - y.to(out.dtype)) ** 2).mean(1)
        return {"loss": float(per.double().sum()), "correct": 0.0}

    def metrics(self, sums: dict[str, float], n: int, prefix: str) -> dict[str, float]:
        """Means of summed evaluation results over `n` samples: `{prefix_loss, prefix_accuracy}`."""
        if n <= 0:
            return {f"{prefix}_{k}": float("nan") for k in self.metric_names}
        out = {f"{prefix}_loss": sums["loss"] / n}
        if self.classification:
            out[f"{prefix}_accuracy"] = sums["correct"] / n
        return out


def _wide(out: torch.Tensor) -> torch.Tensor:
    """The outputs in float32 (float64 stays float64): the loss never runs in bf16/fp16."""
    return out if out.dtype == torch.float64 else out.float()


def check_labels(task: Task, y: np.ndarray, where: str, classes: int | None = None) -> np.ndarray:
    """Validate labels for `task` and return them in the task's layout (`[N]` int64 classes, or
    `[N, out_dim]` float32 targets). `where` names the data (a file, a data kind) in messages;
    `classes` is the class count the data declares, when it declares one."""
    y = np.asarray(y)
    if task.classification:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dtype.kind == "f":
            raise LabelError(f"{where}: labels are floats ({y.dtype}), but train.loss=cross_entropy needs integer "
                             "class labels: store them as integers (e.g. y.astype('int64')), or use train.loss=mse "
                             "for regression")
        if y.dtype.kind not in "biu" or y.ndim != 1:
            raise LabelError(f"{where}: labels of dtype {y.dtype} and shape {tuple(y.shape)}: cross_entropy needs "
                             "one integer class per sample, shape [N]")
        if classes is not None and classes != task.out_dim:
            raise LabelError(f"{where}: the data has {classes} classes but the readout has {task.out_dim} outputs: "
                             f"set model.out_dim={classes}")
        if y.size:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= task.out_dim:
                bad = y[(y < 0) | (y >= task.out_dim)]
                raise LabelError(f"{where}: {bad.size} labels outside [0, {task.out_dim}) (e.g. {int(bad[0])}; "
                                 f"labels span {lo}..{hi}): class labels must be 0..classes-1 and the readout "
                                 f"needs model.out_dim >= {hi + 1}")
        return y.astype(np.int64, copy=False)
    if y.dtype.kind not in "biuf":
        raise LabelError(f"{where}: labels of dtype {y.dtype}: regression (train.loss=mse) needs numbers")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != task.out_dim:
        raise LabelError(f"{where}: labels of shape {tuple(y.shape)} do not fit the readout's {task.out_dim} "
                         f"outputs (expected [N, {task.out_dim}]): set model.out_dim or reshape the labels")
    return y.astype(np.float32, copy=False)
