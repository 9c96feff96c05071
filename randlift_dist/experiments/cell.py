"""One experiment cell's measurements, from its finished run directory (`analyse`).

Inputs: the resolved `config.yaml` the trainer wrote, its `metrics.jsonl`, its final checkpoint.
Outputs (a flat dict, the cell's `result.json` without its identity):

- the task's metrics of the final weights: `train_loss`, `test_loss` and, for classification,
  `train_accuracy`, `test_accuracy`. With `extras` and data held in memory (every kind but
  shards): computed here on the WHOLE training set and the test set (regression: `mse`, the
  trainer's loss in float64, as the convergence grid always did; classification: `tasks.Task`
  sums, as the trainer evaluates). Otherwise (no extras, or shards): the trainer's own final
  evaluation record, whose train metrics cover up to `train.eval_train_max` training rows
  (`eval_train_max` / `train_rows` say so); nothing is rebuilt then, and `params` is the
  trainer's `lift_stats.json` count.
- with a `target` (`target.Target`): `metric`, `target` (its label), `value`, `reached` (the final
  value meets the target), `step_reached` (first evaluation step meeting it), `reached_train` (the
  training-split analogue meets it). For a loss target, `eps` is its bound and `step_test_eps` /
  `step_train_eps` are the first evaluation step with test loss <= eps / first logged step whose
  (minibatch) training loss is <= eps.
- `params`, `edges`; with `extras`: `distance` = `||theta_T - theta_0|| / ||theta_0||` over the
  non-readout parameters (edge weights and biases; `theta_0` rebuilt at world size 1 from the same
  config, the trainer's initial weights, `theta_T` loaded from the final checkpoint); and, for
  regression on in-memory data only (a least-squares fit has no meaning for class labels, and lazy
  data is never loaded whole), `proxy_train_loss`, `proxy_test_loss`: the readout-only fit at
  initialisation: least squares (ridge `RIDGE` x mean eigenvalue) of the training targets on the
  lifted output features `c * y_t(x)` (all output fibres, flattened per sample). Skipped extras are
  absent from the dict (empty in tables), never estimated some other way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

RIDGE = 1e-8
CHUNK = 4096


def readout_constant(net, readout_scale: str) -> float:
    """The readout normalisation c: 1, 1/N or 1/sqrt(N), N the number of lifted output vertices."""
    n_out = sum(net.lift.n(t) for t in net.base.outputs)
    return {"sum": 1.0, "mean": 1.0 / n_out, "sqrt": 1.0 / math.sqrt(n_out)}[readout_scale]


def output_features(net, x: torch.Tensor, c: float) -> torch.Tensor:
    """`[B, F]` float64 features `c * y_t` of the output fibres (F = sum_t n_t d_t) for `x [B, in_dim]`."""
    parts = []
    with torch.no_grad():
        for i in range(0, x.shape[0], CHUNK):
            ys = net.activations(x[i:i + CHUNK])  # {v: [n_v, d_v, b]}
            f = torch.cat([ys[t].permute(2, 0, 1).reshape(ys[t].shape[2], -1) for t in net.base.outputs], 1)
            parts.append(f.double() * c)  # [b, F]
    return torch.cat(parts)


def ridge_fit(f: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """`[F, out]` readout minimising `||f W - y||^2 + lam ||W||^2`, lam = ridge x mean eigenvalue of f^T f."""
    f, y = f.double(), y.double()  # [N, F], [N, out]
    gram = f.T @ f  # [F, F]
    lam = ridge * max(float(torch.trace(gram)) / max(gram.shape[0], 1), 1e-300)
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), f.T @ y)


def mse(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The trainer's loss: squared error averaged over outputs, then over samples."""
    return float(((pred.double() - y.double()) ** 2).mean(1).mean())


def readout_proxy(net, ds, c: float) -> dict[str, float]:
    """Train and test loss of the best readout on the initial network's output features."""
    f_train, f_test = output_features(net, ds.x_train, c), output_features(net, ds.x_test, c)
    w = ridge_fit(f_train, ds.y_train)
    return {"proxy_train_loss": mse(f_train @ w, ds.y_train),
            "proxy_test_loss": mse(f_test @ w, ds.y_test) if ds.x_test.shape[0] else float("nan")}


def network_loss(net, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)])  # [N, out]
    return mse(pred, y)


def distance(net0, net_t) -> tuple[float, float]:
    """`(||theta_T - theta_0|| / ||theta_0||, ||theta_0||)` over the parameters outside the readout."""
    num, den = 0.0, 0.0
    final = dict(net_t.named_parameters())
    with torch.no_grad():
        for name, p0 in net0.named_parameters():
            if name.startswith("readouts."):
                continue
            num += float(((final[name].double() - p0.double()) ** 2).sum())
            den += float((p0.double() ** 2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300), math.sqrt(den)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def first_step(records: list[dict[str, Any]], key: str, eps: float) -> int | None:
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and v <= eps:
            return int(r["step"])
    return None


def build_network(cfg):
    """`(base, lift, out_dim, net)`: the trainer's initial network, at world size 1."""
    from ..model import LiftedNetwork

    base, lift = cfg.build_lift()
    m = cfg.model
    out_dim = m.out_dim if m.out_dim is not None else base.dim(base.outputs[0])
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    net = LiftedNetwork(base, lift, out_dim=out_dim, readout_scale=m.readout_scale, weight_scale=m.weight_scale,
                        seed=m.weight_seed, readout_init=m.readout_init, dtype=dtype)
    return base, lift, out_dim, net


def _split_metrics(net, ds, regression: bool) -> dict[str, float]:
    """Metrics of `net` on the whole in-memory training and test sets."""
    if regression:
        return {"train_loss": network_loss(net, ds.x_train, ds.y_train),
                "test_loss": network_loss(net, ds.x_test, ds.y_test)}
    out: dict[str, float] = {}
    for prefix, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        sums = {"loss": 0.0, "correct": 0.0}
        with torch.no_grad():
            for i in range(0, x.shape[0], CHUNK):
                for k, v in ds.task.sums(net(x[i:i + CHUNK]), y[i:i + CHUNK]).items():
                    sums[k] += v
        out.update(ds.task.metrics(sums, int(x.shape[0]), prefix))
    return out


def _final_record(records: list[dict[str, Any]], step: int, run_dir: Path, task_metrics: tuple[str, ...]):
    """The task's metrics from the trainer's evaluation at `step` (the final one)."""
    final = [r for r in records if r.get("step") == step and "test_loss" in r]
    if not final:
        raise FileNotFoundError(f"{run_dir}: metrics.jsonl has no evaluation at the final step {step}")
    keys = [f"{split}_{m}" for split in ("train", "test") for m in task_metrics]
    return {k: final[-1][k] for k in keys if k in final[-1]}


def analyse(run_dir: Path, target=None, extras: bool = True) -> dict[str, Any]:
    """The measurements of a finished run in `run_dir` (see the module docstring); `target` a
    `target.Target` or None (metrics only). Without `extras` nothing is rebuilt: the metrics are
    the trainer's final evaluation record, the counts its `lift_stats.json`."""
    from .. import checkpoint as ckpt
    from ..config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = ckpt.find_latest(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint: the run did not finish")
    records = read_metrics(run_dir / "metrics.jsonl")
    trained = [r for r in records if isinstance(r.get("loss"), (int, float))]
    stats = json.loads((run_dir / "lift_stats.json").read_text())
    names = ("loss", "accuracy") if cfg.train.loss == "cross_entropy" else ("loss",)
    if extras:
        out = _rebuilt(run_dir, cfg, path, records, names)
    else:
        step = int(ckpt.read_meta(path)["step"])
        out = {"step": step, **_final_record(records, step, run_dir, names), "params": stats.get("params"),
               "eval_train_max": cfg.train.eval_train_max}
    out.update({"steps": cfg.train.steps, "last_batch_loss": trained[-1]["loss"] if trained else None,
                "edges": stats.get("edges"), "loss_name": cfg.train.loss, "data_kind": cfg.data.kind})
    if cfg.data.kind == "teacher":
        out.update(label_noise=cfg.data.label_noise, teacher_size=cfg.data.teacher_size)
    if target is not None:
        value = out.get(target.metric)
        out.update(metric=target.metric, target=target.label, value=value, reached=target.met(value),
                   step_reached=target.first_step(records), reached_train=target.met(out.get(target.train_metric)))
        if target.is_loss:
            out.update(eps=target.bound, step_test_eps=first_step(records, "test_loss", target.bound),
                       step_train_eps=first_step(records, "loss", target.bound))
    return out


def _rebuilt(run_dir: Path, cfg, path: Path, records: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """Metrics, parameter count, distance and (regression, in-memory data) the readout proxy, from the
    initial network rebuilt from the config and the final one loaded from the checkpoint."""
    from .. import checkpoint as ckpt
    from ..data import build_dataset

    base, lift, out_dim, net0 = build_network(cfg)
    _, _, _, net_t = build_network(cfg)
    step, _ = ckpt.load_weights(path, cfg, lift, net_t)
    ds = build_dataset(cfg, base, out_dim)
    regression = not ds.task.classification
    in_memory = not getattr(ds.train, "lazy", False)
    if in_memory:
        metrics = _split_metrics(net_t, ds, regression)
    else:  # shards: the trainer's own final evaluation
        metrics = _final_record(records, step, run_dir, names)
        limit = cfg.train.eval_train_max
        metrics["train_rows"] = len(ds.train) if limit is None else min(limit, len(ds.train))
    dist_rel, norm0 = distance(net0, net_t)
    out = {"step": step, **metrics, "params": sum(p.numel() for p in net0.parameters()), "distance": dist_rel,
           "theta0_norm": norm0}
    if regression and in_memory:
        out.update(readout_proxy(net0, ds, readout_constant(net0, cfg.model.readout_scale)))
    return out
