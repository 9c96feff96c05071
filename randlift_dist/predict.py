"""Predict with a trained run: `python -m randlift_dist.predict --run DIR --input FILE --output FILE`.

Input: the rows to predict, a `.npy` array or the array `x` (`--key`) of a `.npz`: `[N, in_dim]`
numbers (or `[N, ...]` with `in_dim` values per row, flattened row by row), checked like training
data: a wrong width, strings or a NaN / inf give one line naming the file and exit 2.
Output: `[N, out_dim]` outputs (logits for classification), row i for input row i: a `.npy` holds
them; a `.npz` holds `outputs` and, for classification, `classes` (the top-1 class, `argmax`, ties
to the lowest index). Written atomically (`<output>.tmp`, then renamed) by rank 0.

Rows run in batches of `--batch-size` (a tqdm bar on rank 0, `--no-progress` hides it). Any layout
under a launcher (`torchrun --nproc_per_node N -m randlift_dist.predict --run-dir DIR ...`: torchrun's own
parser takes `--run` for its `--run-path`, so spell it `--run-dir` there; or srun): the network
is sharded over `--lift-parallel` ranks (default: the run's `parallel.lift_parallel` when it divides
the world, else 1); data-parallel replicas take contiguous parts of the rows, the ranks of one
replica all run every batch of it (the forward is collective), and rank 0 gathers the parts.
Every rank reads and checks the whole input before any process group starts, so bad input is
refused by every rank alike, and said once. Exit statuses as `randlift-train`: 0, 2 bad input, 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data.files import inputs
from .data.shards import DataError
from .runs import EXIT_OK, LoadedRun, load_run, read_run_config, replica_rows, run_command, start_layout

PROG = "randlift-predict"
SUFFIXES = (".npy", ".npz")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Predict with a trained run (outputs of its network).")
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="the run directory (run.dir of a training run); under torchrun spell it --run-dir")
    ap.add_argument("--input", required=True, help="rows to predict: a .npy [N, in_dim], or a .npz with array x")
    ap.add_argument("--output", required=True, help=".npz (outputs, classes) or .npy (outputs) to write")
    ap.add_argument("--key", default="x", help="the array of a .npz input holding the rows (default: x)")
    ap.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: newest intact)")
    ap.add_argument("--batch-size", type=int, default=1024, help="rows per forward (default: 1024)")
    ap.add_argument("--lift-parallel", type=int, default=None,
                    help="under a launcher: ranks sharing the network (default: the run's, when it divides the world)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu, or the rank's GPU)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def read_inputs(path: Path, key: str, in_dim: int) -> np.ndarray:
    """The rows of a `.npy` / `.npz` as float32 `[N, in_dim]`, checked, or a `DataError` in one line."""
    where = f"--input={str(path)!r}"
    if path.suffix not in SUFFIXES:
        raise DataError(f"{where}: use a .npy file (the rows) or a .npz file with an array {key!r}")
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        if path.suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                if key not in f.files:
                    raise DataError(f"{where}: no array {key!r} in it (it has {sorted(f.files)}): pass --key NAME")
                a = f[key]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        raise DataError(f"{where}: cannot read it as {path.suffix} ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None
    return inputs(where, key, a, in_dim)


def check_output(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise DataError(f"--output={str(path)!r}: use a .npz (outputs and classes) or a .npy (outputs) path")
    if not path.parent.is_dir():
        raise DataError(f"--output={str(path)!r}: directory {str(path.parent)!r} does not exist")


def write_outputs(path: Path, outputs: np.ndarray, classes: np.ndarray | None) -> None:
    """Atomically: a temporary file beside `path`, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: numpy adds no suffix of its own
        if path.suffix == ".npy":
            np.save(f, outputs)
        else:
            np.savez(f, outputs=outputs, **({} if classes is None else {"classes": classes}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def predict_rows(run: LoadedRun, x: np.ndarray, batch_size: int, progress: bool = False) -> np.ndarray | None:
    """Outputs `[N, out_dim]` of all rows of `x`: on rank 0 (and at world size 1), None elsewhere.
    Collective inside a process group: every rank calls it with the same `x`."""
    L, net = run.layout, run.net
    lo, hi = replica_rows(x.shape[0], L)
    rank0 = L is None or L.rank == 0
    bar = None
    if progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, desc="predict", unit="row", file=sys.stderr, dynamic_ncols=True)
    parts = []
    for a in range(lo, hi, batch_size):
        b = min(hi, a + batch_size)
        parts.append(run.predict(torch.from_numpy(x[a:b])).cpu())  # [b - a, out_dim]
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    mine = (torch.cat(parts) if parts else torch.zeros(0, net.out_dim, dtype=next(net.parameters()).dtype)).numpy()
    if L is None:
        return mine
    box = [None] * L.world_size if L.rank == 0 else None
    dist.gather_object((lo, mine) if L.lift_rank == 0 else None, box, dst=0)
    if L.rank != 0:
        return None
    return np.concatenate([m for _, m in sorted((p for p in box if p is not None), key=lambda p: p[0])])


def _main(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise DataError(f"--batch-size={args.batch_size}: must be > 0")
    out_path = Path(args.output)
    check_output(out_path)
    cfg = read_run_config(args.run)
    base = cfg.build_lift()[0]
    x = read_inputs(Path(args.input), args.key, base.in_dim)
    layout = start_layout(cfg, args.lift_parallel)
    run = load_run(args.run, step=args.step, device=args.device, layout=layout)
    out = predict_rows(run, x, args.batch_size, progress=not args.no_progress)
    if out is not None:
        classes = out.argmax(1).astype(np.int64) if run.task.classification else None
        write_outputs(out_path, out, classes)
        print(f"{PROG}: {out.shape[0]} rows -> {out_path} (outputs [{out.shape[0]}, {out.shape[1]}]"
              f"{', classes' if classes is not None and out_path.suffix == '.npz' else ''}; checkpoint "
              f"{run.checkpoint.name}, step {run.step})", file=sys.stderr, flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
