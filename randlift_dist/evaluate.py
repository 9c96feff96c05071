"""Evaluate a trained run: `python -m randlift_dist.evaluate --run DIR [--data FILE] [--json]`.

Prints the task's metrics, one line each (`loss`, and `accuracy` for classification; values in
full precision), or one JSON object with `--json` (also `samples`, `step`, `checkpoint`, `data`).
What is evaluated:
- by default the run's own test split, rebuilt from its config (`data.build_dataset`: the teacher's
  test set drawn again, the test rows of its file, shards or packaged data set; `--split train`:
  every training row), with the trainer's own arithmetic: data-parallel replicas take contiguous
  parts, chunks of the run's training micro-batch (`limits.eval_chunk`: at most 1024) rows, float64 sums (`Task.sums`) added
  over the replicas. So on the run's layout the numbers are the trainer's final `test_loss` /
  `test_accuracy` of `metrics.jsonl` (same checkpoint, same weights); on another layout they
  differ only by float32 rounding;
- with `--data FILE`, the arrays `x` and `y` of a `.npz` (or `.pt`) file, checked like training
  data (`data.files`: width, finite inputs, labels that fit the task, `classes` if declared).
Bad input (no such run or file, no intact checkpoint, a wrong width, NaN, labels out of range):
one line, exit 2. Any layout under a launcher, as `predict` (`torchrun ... -m randlift_dist.evaluate
--run-dir DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import TensorSource, build_dataset
from .data.files import labelled_arrays, read_arrays
from .data.shards import DataError
from .limits import eval_chunk
from .runs import EXIT_OK, LoadedRun, load_run, read_run_config, replica_rows, run_command, start_layout
from .tasks import Task

PROG = "randlift-evaluate"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Evaluate a trained run: the task's metrics.")
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="the run directory (run.dir of a training run); under torchrun spell it --run-dir")
    ap.add_argument("--data", default=None, help=".npz (or .pt) file with arrays x and y (default: the run's own data)")
    ap.add_argument("--split", choices=("test", "train"), default=None,
                    help="the run's own split to evaluate (default: test); not with --data")
    ap.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: newest intact)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per forward (default: the run's training micro-batch, at most 1024)")
    ap.add_argument("--lift-parallel", type=int, default=None,
                    help="under a launcher: ranks sharing the network (default: the run's, when it divides the world)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu, or the rank's GPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of one line per metric")
    return ap.parse_args(argv)


def read_labelled(path: Path, task: Task, in_dim: int) -> TensorSource:
    """Rows `x` and labels `y` of a file, checked against the model and the task."""
    x, y, _ = labelled_arrays(f"--data={str(path)!r}", read_arrays(path, key="--data"), task, in_dim)
    return TensorSource(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


@torch.no_grad()
def evaluate_source(run: LoadedRun, src, batch_size: int) -> dict[str, float]:
    """The task's metrics over every row of a source (`{loss, accuracy?}` and `samples`);
    collective inside a process group (every rank calls it with the same source)."""
    L, n = run.layout, len(src)
    lo, hi = replica_rows(n, L)
    sums = {"loss": 0.0, "correct": 0.0}
    for a in range(lo, hi, batch_size):
        x, y = src.span(a, min(hi, a + batch_size))
        for k, v in run.task.sums(run.predict(x), y).items():
            sums[k] += v
    t = torch.tensor([sums["loss"], sums["correct"]], dtype=torch.float64)
    if L is not None and L.data_parallel > 1:
        dist.all_reduce(t, group=L.data_group)
    got = run.task.metrics({"loss": float(t[0]), "correct": float(t[1])}, n, "m")
    return {**{k[2:]: v for k, v in got.items()}, "samples": n}


def _main(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size <= 0:
        raise DataError(f"--batch-size={args.batch_size}: must be > 0")
    if args.data is not None and args.split is not None:
        raise DataError("--split picks one of the run's own splits: leave it out with --data FILE")
    cfg = read_run_config(args.run)
    base = cfg.build_lift()[0]
    task = Task(cfg.train.loss, cfg.out_dim(base))
    if args.data is not None:  # every check before any process group starts
        src, what = read_labelled(Path(args.data), task, base.in_dim), str(args.data)
    else:
        split = args.split or "test"
        src, what = getattr(build_dataset(cfg, base, task.out_dim), split), f"{split} split"
    layout = start_layout(cfg, args.lift_parallel)
    run = load_run(args.run, step=args.step, device=args.device, layout=layout)
    result = evaluate_source(run, src, args.batch_size or eval_chunk(cfg.train.batch_size, 1, cfg.train.micro_batch_size))
    if layout is None or layout.rank == 0:
        if args.json:
            print(json.dumps({**result, "step": run.step, "checkpoint": str(run.checkpoint), "data": what}))
        else:
            print(f"{PROG}: {what} of {args.run} ({result['samples']} samples), checkpoint {run.checkpoint.name} "
                  f"(step {run.step})", file=sys.stderr, flush=True)
            for k in task.metric_names:
                print(f"{k} {result[k]!r}")
        sys.stdout.flush()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
