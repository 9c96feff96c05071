"""One convergence cell's measurements, from its finished run directory (`analyse`).

Inputs: the resolved `config.yaml` the trainer wrote, its `metrics.jsonl`, its final checkpoint.
Outputs (a flat dict, the cell's `result.json` without its identity):

- `train_loss`, `test_loss`: MSE (mean over outputs and samples, the trainer's loss) of the final
  weights on the whole training set (noisy labels) and the test set (clean labels).
- `reached`: success, defined by the TEST loss: `test_loss <= eps` at the end of training.
  `step_test_eps`: first evaluation step with test loss <= eps; `step_train_eps`: first logged
  step whose (minibatch) training loss is <= eps; `reached_train`: final train loss <= eps.
- `params`: parameter count; `distance`: `||theta_T - theta_0|| / ||theta_0||` over the non-readout
  parameters (edge weights and biases); `theta_0` is rebuilt at world size 1 from the same config
  (the trainer's initial weights), `theta_T` loaded from the final checkpoint.
- `proxy_train_loss`, `proxy_test_loss`: the readout-only fit at initialisation: least squares
  (ridge `RIDGE` x mean eigenvalue) of the training targets on the lifted output features
  `c * y_t(x)` (all output fibres, flattened per sample), evaluated on train and test.
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


def analyse(run_dir: Path, eps: float) -> dict[str, Any]:
    """The measurements of a finished run in `run_dir` (see the module docstring)."""
    from .. import checkpoint as ckpt
    from ..config import load_config
    from ..data import build_dataset

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    base, lift, out_dim, net0 = build_network(cfg)
    _, _, _, net_t = build_network(cfg)
    path = ckpt.find_latest(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint: the run did not finish")
    step, _ = ckpt.load_weights(path, cfg, lift, net_t)
    ds = build_dataset(cfg, base, out_dim)
    records = read_metrics(run_dir / "metrics.jsonl")
    trained = [r for r in records if isinstance(r.get("loss"), (int, float))]
    dist_rel, norm0 = distance(net0, net_t)
    train_loss, test_loss = network_loss(net_t, ds.x_train, ds.y_train), network_loss(net_t, ds.x_test, ds.y_test)
    out = {"step": step, "steps": cfg.train.steps, "eps": eps, "train_loss": train_loss, "test_loss": test_loss,
           "last_batch_loss": trained[-1]["loss"] if trained else None,
           "reached": bool(test_loss <= eps), "reached_train": bool(train_loss <= eps),
           "step_test_eps": first_step(records, "test_loss", eps), "step_train_eps": first_step(records, "loss", eps),
           "params": sum(p.numel() for p in net0.parameters()),
           "edges": json.loads((run_dir / "lift_stats.json").read_text()).get("edges"), "distance": dist_rel, "theta0_norm": norm0,
           "label_noise": cfg.data.label_noise, "teacher_size": cfg.data.teacher_size}
    out.update(readout_proxy(net0, ds, readout_constant(net0, cfg.model.readout_scale)))
    return out
