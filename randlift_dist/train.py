"""Entry point: `python -m randlift_dist.train [--config FILE] [key.path=value ...]` (`randlift-train`).

Works as a plain process (world size 1), under `torchrun --nproc_per_node N` (single or multi
node), and under `srun` with one task per process (ranks from SLURM_PROCID / SLURM_NTASKS). With
no `--config` it runs the embedded default: a tiny teacher-student task on the CPU.

Order of events: parse and validate the config and the layout (errors exit with status 2 before
any process group starts) -> process groups -> lift, shard, network -> data -> resume (weights
before the engine is built, moments after) -> train, evaluate, log, checkpoint. SIGTERM and
SIGUSR1 request a checkpoint at the next step boundary and a clean exit (SLURM preemption and
requeue); all ranks agree on it through a one-element all-reduce per step.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, ConfigError, describe_fields, dump_config, load_config
from .layout import Layout, LayoutError, check_degrees, discover_env

EXIT_CONFIG = 2
_stop_requested = {"signal": 0}


def _on_signal(signum, frame) -> None:
    _stop_requested["signal"] = signum


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="randlift-train", description="Train a random sparse lift.")
    ap.add_argument("--config", default=None, help="YAML config file (default: the embedded tiny run)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its doc and exit")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.lift.size=512")
    return ap.parse_args(argv)


def preflight(cfg: Config) -> None:
    """Checks that need the world size but no process group."""
    _, world_size, _ = discover_env()
    dp = check_degrees(world_size, cfg.parallel.lift_parallel)
    if cfg.train.batch_size % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel degree "
                          f"{dp} (world {world_size} / lift_parallel {cfg.parallel.lift_parallel}): "
                          f"use a multiple of {dp}")
    if cfg.parallel.engine == "deepspeed":
        from .engine import require_deepspeed

        require_deepspeed()


def lift_statistics(net, layout: Layout) -> dict[str, Any]:
    """Parameters, edges, degree histograms, halo fractions and exchange modes (collective)."""
    shard = net.shard
    mine: dict[str, Any] = {"params": sum(p.numel() for p in net.parameters()), "edges": {}, "remote": {},
                            "hist": {}, "halo_rows": {}}
    for e in net.base.edges:
        layer = net.edge_layer(e.key)
        m = layer.weight.shape[0]
        mine["edges"][str(e)] = m
        mine["remote"][str(e)] = m - layer.n_local
        deg = np.bincount(layer.global_index()[1], minlength=net.lift.n(e.dst))[shard.own(e.dst)]
        mine["hist"][str(e)] = np.bincount(np.minimum(deg, 64), minlength=65)
        plan = shard.plans.get(e.key)
        mine["halo_rows"][str(e)] = int(sum(plan.recv_splits)) if plan is not None else 0
    parts = [mine]
    if layout.lift_group is not None and layout.lift_parallel > 1:
        parts = [None] * layout.lift_parallel
        dist.all_gather_object(parts, mine, group=layout.lift_group)
    stats: dict[str, Any] = {"params": int(sum(p["params"] for p in parts)),
                             "edges": int(sum(sum(p["edges"].values()) for p in parts)),
                             "lift_fingerprint": net.lift.fingerprint(), "per_edge": {}}
    for e in net.base.edges:
        k = str(e)
        m = sum(p["edges"][k] for p in parts)
        hist = sum(p["hist"][k] for p in parts)
        plan = shard.plans.get(e.key)
        stats["per_edge"][k] = {
            "edges": int(m), "mean_in_degree": m / net.lift.n(e.dst),
            "in_degree_hist": {int(d): int(c) for d, c in enumerate(hist) if c},
            "halo_fraction": sum(p["remote"][k] for p in parts) / max(m, 1),
            "halo_rows": int(sum(p["halo_rows"][k] for p in parts)),
            "exchange": plan.mode if plan is not None else "none",
        }
    return stats


def evaluate(engine, ds, layout: Layout) -> float:
    """Test MSE; the test rows are split over data-parallel replicas (collective)."""
    n = ds.x_test.shape[0]
    if n == 0:
        return float("nan")
    lo = n * layout.data_rank // layout.data_parallel
    hi = n * (layout.data_rank + 1) // layout.data_parallel
    sse = torch.tensor([engine.sum_squared_error(ds.x_test[lo:hi], ds.y_test[lo:hi])], dtype=torch.float64)
    if layout.data_group is not None and layout.data_parallel > 1:
        dist.all_reduce(sse, group=layout.data_group)
    return float(sse) / n


def run(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Train with `cfg` on `layout`; returns the final metrics (same on every rank)."""
    from .data import Batches, build_dataset
    from .engine import build_engine
    from .metrics import MetricsSink, peak_memory_mb, reduce_over_ranks
    from .model import LiftedNetwork
    from .partition import Shard

    t_setup = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    m = cfg.model
    base, lift = cfg.build_lift()
    out_dim = m.out_dim if m.out_dim is not None else base.dim(base.outputs[0])  # dims agree (validated)
    shard = Shard.create(lift, layout, cfg.parallel.partition, cfg.parallel.exchange, cfg.parallel.allgather_threshold)
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    net = LiftedNetwork(base, lift, out_dim=out_dim, readout_scale=m.readout_scale, weight_scale=m.weight_scale,
                        seed=m.weight_seed, readout_init=m.readout_init, impl=m.impl, shard=shard, dtype=dtype)
    net.to(layout.device())
    ds = build_dataset(cfg, base, out_dim)
    batches = Batches(ds, cfg.train.batch_size, layout.data_rank, layout.data_parallel, cfg.data.seed)

    ckpt_root = run_dir / "checkpoints"
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = ckpt.find_latest(ckpt_root)
    elif cfg.train.resume != "none":
        resume_from = Path(cfg.train.resume)
    start_step, state = 0, None
    if resume_from is not None:
        start_step, state = ckpt.load_weights(resume_from, cfg, lift, net)
    engine = build_engine(net, cfg, layout)
    if state is not None:
        ckpt.load_moments(state, start_step, engine)
        engine.step_count = start_step
        if hasattr(engine, "scheduler") and engine.scheduler is not None:
            engine.scheduler.last_epoch = start_step - 1
            engine.scheduler.step()

    stats = lift_statistics(engine.net, layout)
    sink = MetricsSink(cfg, run_dir, cfg.train.steps, start_step, cfg.to_dict(), enabled=layout.rank == 0)
    sink.summary({**stats, "layout": layout.describe(), "dataset": ds.description,
                  "setup_s": time.perf_counter() - t_setup})
    sink.print(f"randlift_dist: {layout.describe()}; lift {stats['params']:,} parameters, {stats['edges']:,} "
               f"lifted edges; {ds.description}; engine {engine.name}"
               + (f"; resumed from {resume_from} at step {start_step}" if resume_from is not None else ""))
    for k, v in stats["per_edge"].items():
        sink.print(f"  edge {k}: {v['edges']:,} edges, mean in-degree {v['mean_in_degree']:.2f}, "
                   f"halo fraction {v['halo_fraction']:.3f}, exchange {v['exchange']}")

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)
    dev = layout.device()
    edges_per_step = stats["edges"] * 1.0
    window = {"t": 0.0, "samples": 0, "steps": 0}
    last: dict[str, Any] = {}
    step = start_step
    stopped_by = 0
    if start_step == 0:  # the starting point of the curve
        sink.log({"step": 0, "test_loss": evaluate(engine, ds, layout)})
    while step < cfg.train.steps:
        x, y = batches(step)
        shard.stats.reset()
        t0 = time.perf_counter()
        out = engine.train_step(x, y)
        dt = time.perf_counter() - t0
        step += 1
        window["t"] += dt
        window["samples"] += cfg.train.batch_size
        window["steps"] += 1
        sink.advance()
        flag = torch.tensor([float(_stop_requested["signal"])])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopped_by = int(flag)
        if cfg.train.stop_at is not None and step >= cfg.train.stop_at and step < cfg.train.steps:
            stopped_by = stopped_by or -1  # -1: stop_at
        log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps or stopped_by
        eval_now = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps
        if log_now or eval_now:
            red = reduce_over_ranks({"comm_bytes": shard.stats.bytes_total, "comm_bytes_max": shard.stats.bytes_total,
                                     "exchange_s_max": shard.stats.wait_s,
                                     "peak_mem_mb_max": peak_memory_mb(dev), "step_time_max": window["t"]},
                                    {"comm_bytes": "sum", "comm_bytes_max": "max", "exchange_s_max": "max",
                                     "peak_mem_mb_max": "max", "step_time_max": "max"})
            wall = max(red["step_time_max"], 1e-9)
            record = {"step": step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "samples_per_s": window["samples"] / wall,
                      "edges_per_s": edges_per_step * window["steps"] / wall,
                      "comm_bytes": int(red["comm_bytes"]),
                      "comm_bytes_max_rank": int(red["comm_bytes_max"]),
                      "exchange_s_max": red["exchange_s_max"], "peak_mem_mb": red["peak_mem_mb_max"]}
            if eval_now:
                record["test_loss"] = evaluate(engine, ds, layout)
            sink.log(record)
            last = record
            window = {"t": 0.0, "samples": 0, "steps": 0}
        if stopped_by or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
            path = ckpt.save(ckpt_root, step, cfg, lift, engine, layout, cfg.checkpoint.keep)
            sink.print(f"checkpoint {path} (step {step})")
        if stopped_by:
            why = "train.stop_at" if stopped_by == -1 else f"signal {stopped_by}"
            sink.print(f"stopping at step {step} ({why}): checkpoint written; "
                       "rerun with train.resume=auto to continue")
            break
    sink.close()
    return {**last, "stopped_by_signal": stopped_by, "step": step}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        preflight(cfg)
    except (ConfigError, LayoutError) as err:
        print(f"randlift-train: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    layout = Layout.create(cfg.parallel.lift_parallel, backend, need_group=cfg.parallel.engine == "deepspeed")
    try:
        result = run(cfg, layout)
    except (ConfigError, ckpt.CheckpointError, LayoutError) as err:
        print(f"randlift-train: error: {err}", file=sys.stderr)
        code = EXIT_CONFIG
    else:
        code = 0
        if layout.rank == 0:
            print(f"final step {result['step']}: loss {result.get('loss', float('nan')):.6g}"
                  + (f", test_loss {result['test_loss']:.6g}" if "test_loss" in result else ""), flush=True)
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip gloo's thread teardown at exit, which can abort (ENVIRONMENT.md)
    return code


if __name__ == "__main__":
    sys.exit(main())
