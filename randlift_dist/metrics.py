"""Run observability: progress bar, `metrics.jsonl`, wandb; rank 0 writes, every rank reduces.

`reduce_over_ranks` turns per-rank numbers into layout-wide ones (sum, mean and max over the
world: the max shows the straggler). `lift_statistics` gathers what the lift and the plan are
(parameters, edges, degree histograms, halo, exchange mode and bytes per sample per edge).
`MetricsSink` (rank 0 only) shows a tqdm bar, appends one JSON object per record to
`<run.dir>/metrics.jsonl` and logs the same to wandb (imported lazily; `offline` writes under
`<run.dir>/wandb` and never touches the network; `disabled` writes nothing). A run resumed at
step k first rewrites `metrics.jsonl` to its records up to step k (none when k = 0), so replayed
steps appear once; wandb resumes the same run id (kept in `<run.dir>/wandb_id`).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist



def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def reduce_over_ranks(values: dict[str, float], ops: dict[str, str]) -> dict[str, float]:
    """Collective over the world: each key reduced by `sum`, `mean` or `max`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t_sum = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    t_max = t_sum.clone()
    dist.all_reduce(t_sum, op=dist.ReduceOp.SUM)
    dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
    n = dist.get_world_size()
    out = {}
    for i, k in enumerate(keys):
        op = ops.get(k, "mean")
        out[k] = float(t_max[i]) if op == "max" else float(t_sum[i]) / (n if op == "mean" else 1)
    return out


def lift_statistics(net, layout) -> dict[str, Any]:
    """Parameters, edges, degree histograms, halo fractions and exchange modes (collective over
    the lift-parallel group; the same dict on every rank)."""
    plan = net.plan
    mine: dict[str, Any] = {"params": sum(p.numel() for p in net.parameters()), "edges": {}, "remote": {},
                            "hist": {}, "halo_rows": {}, "rows_sent": {}}
    for e in net.base.edges:
        ep = plan.edges[e.key]
        k = str(e)
        mine["edges"][k], mine["remote"][k] = ep.n_edges, ep.n_edges - ep.n_local
        deg = plan.in_degrees(e.key)
        mine["hist"][k] = np.bincount(np.minimum(deg, 64), minlength=65)
        mine["halo_rows"][k] = ep.exchange.n_halo if ep.exchange is not None else 0
        mine["rows_sent"][k] = ep.exchange.rows_sent() if ep.exchange is not None else 0
    parts = [mine]
    if layout.lift_group is not None and layout.lift_parallel > 1:
        parts = [None] * layout.lift_parallel
        dist.all_gather_object(parts, mine, group=layout.lift_group)
    stats: dict[str, Any] = {"params": int(sum(p["params"] for p in parts)),
                             "edges": int(sum(sum(p["edges"].values()) for p in parts)),
                             "lift_fingerprint": net.lift.fingerprint(), "per_edge": {}}
    for e in net.base.edges:
        k, ex = str(e), plan.edges[e.key].exchange
        m = sum(p["edges"][k] for p in parts)
        hist = sum(p["hist"][k] for p in parts)
        stats["per_edge"][k] = {
            "edges": int(m), "mean_in_degree": m / net.lift.n(e.dst),
            "degree": net.lift.degrees.get(e.key), "all_pairs": net.lift.all_pairs(e),
            "in_degree_hist": {int(d): int(c) for d, c in enumerate(hist) if c},
            "halo_fraction": sum(p["remote"][k] for p in parts) / max(m, 1),
            "halo_rows": int(sum(p["halo_rows"][k] for p in parts)),
            "exchange": ex.mode if ex is not None else "none",
            "rows_sent_per_sample": int(sum(p["rows_sent"][k] for p in parts)),
        }
    return stats


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Keep the records of steps <= start_step (a resumed run replays the steps after it)."""
    if not path.exists():
        return
    keep = []
    if start_step > 0:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= start_step:
                keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsSink:
    """Rank 0's outputs: progress bar, metrics.jsonl and wandb."""

    def __init__(self, cfg, run_dir: Path, total_steps: int, start_step: int, config_dict: dict,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.last_test: dict[str, float] = {}  # shown on the progress bar until the next evaluation
        self.wandb_run = None
        if not enabled:
            return
        _truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.run.progress:
            from tqdm import tqdm

            # smoothing=0: the rate is steps / time since the clock started, and `advance` starts the
            # clock after the first step (imports, allocation, kernel caches), so the first estimate of
            # the time left is not that slow step's
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", smoothing=0,
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
            self._clock_started = False
        if cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb_run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                                        dir=str(run_dir), name=cfg.run.name or Path(run_dir).name,
                                        config=config_dict, resume="allow",
                                        id=_wandb_id(run_dir), settings=wandb.Settings(console="off"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])
        if self.bar is not None and "loss" in record:
            self.last_test.update({k: record[k] for k in ("test_loss", "test_accuracy") if k in record})
            shown = {"loss": record["loss"], "acc": record.get("accuracy"), **self.last_test}
            post = {k.replace("_accuracy", "_acc"): f"{v:.4g}" for k, v in shown.items() if v is not None}
            self.bar.set_postfix(**post, sps=f"{record.get('samples_per_s', 0):.0f}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is None:
            return
        self.bar.update(steps)
        if not self._clock_started:  # the rate counts the steps after this one only
            self._clock_started = True
            self.bar.initial = self.bar.n
            self.bar.start_t = self.bar.last_print_t = time.time()

    def summary(self, stats: dict[str, Any]) -> None:
        """Lift and plan statistics, once at start (wandb summary; also written as JSON)."""
        if not self.enabled:
            return
        (self.path.parent / "lift_stats.json").write_text(json.dumps(stats, indent=1))
        if self.wandb_run is not None:
            flat = {f"lift/{k}": v for k, v in stats.items() if isinstance(v, (int, float, str))}
            self.wandb_run.summary.update(flat)
            self.wandb_run.config.update({"lift_stats": stats}, allow_val_change=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    p = Path(run_dir) / "wandb_id"
    if p.exists():
        return p.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    p.write_text(rid)
    return rid
