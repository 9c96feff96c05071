"""Run observability: progress bar, `metrics.jsonl`, wandb; rank 0 writes, every rank reduces.

`reduce_over_ranks` turns per-rank numbers into layout-wide ones (sum, mean and max over the
world: the max shows the straggler). `MetricsSink` (rank 0 only) shows a tqdm bar, appends one
JSON object per record to `<run.dir>/metrics.jsonl` and logs the same to wandb (imported lazily;
`offline` writes under `<run.dir>/wandb` and never touches the network; `disabled` writes nothing).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

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


class MetricsSink:
    """Rank 0's outputs: progress bar, metrics.jsonl and wandb."""

    def __init__(self, cfg, run_dir: Path, total_steps: int, start_step: int, config_dict: dict,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        self.file = open(self.path, "a")
        if cfg.run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
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
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", sps=f"{record.get('samples_per_s', 0):.0f}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

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
