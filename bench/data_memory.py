"""Peak memory of training on sharded data sets of growing size, measured from outside.

`python bench/data_memory.py [--sizes-gb 0.5,8] [--nproc 1,2] [--steps 30] [--dir DIR] [--npz-gb 0.5]`

For each size, a shard directory (`randlift_dist.data.write_shards`, written chunk by chunk, never
whole in memory; kept in `--dir` and reused) holds `x` float32 `[N, 64]` and 8-class labels (the
argmax of a fixed linear map of x, so there is something to learn); 8192 test rows. The real CLI
trains a random sparse lift on it (`data.kind=shards`, torch engine, batch 256, `--steps` steps,
every shard hashed and every label checked at the start, an evaluation of the test split and 4096
training rows at the end), on 1 rank and on 2 (torchrun, data-parallel), while the harness reads
every rank's VmHWM (the kernel's peak resident set; page-cache pages that `read` fills are not in
it) every 20 ms. For contrast, `--npz-gb` trains the same rows from one `.npz` (`data.kind=npz`,
held in memory). Printed: the hardware, then per run the rows, bytes on disk, ranks, peak MB of each
rank, and the growth over the smallest size's run with the same ranks: the claim under test is that
it stays flat (the batch, the evaluation chunk and the index only), while the npz run grows by the
data's size.

Measured on the 2-core CPU machine (load about 2): 0.5 GB of shards 449 MB (1 rank), 455 / 449 MB (2
ranks); 8 GB 448 MB, 455 / 451 MB; the 0.5 GB npz 982 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from hardware import hardware_line  # noqa: E402
from memory import _children, _is_rank, _status  # noqa: E402

from randlift_dist.data import read_index, write_shards  # noqa: E402

IN_DIM, CLASSES, TEST_ROWS, CHUNK = 64, 8, 8192, 1 << 16
ROW_BYTES = IN_DIM * 4 + 8


def _teacher() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((IN_DIM, CLASSES)).astype(np.float32)


def _chunks(rows: int, seed: int):
    rng, w = np.random.default_rng(seed), _teacher()
    for a in range(0, rows, CHUNK):
        x = rng.standard_normal((min(CHUNK, rows - a), IN_DIM), dtype=np.float32)
        yield x, (x @ w).argmax(1).astype(np.int64)


def shard_dir(root: Path, gb: float) -> Path:
    rows = int(gb * 1e9 / ROW_BYTES)
    out = root / f"shards_{gb:g}gb"
    if (out / "index.json").is_file() and read_index(out)["splits"]["train"]["rows"] == rows:
        return out
    t0 = time.time()
    test = next(_chunks(TEST_ROWS, seed=99))
    write_shards(out, _chunks(rows, seed=0), None, *test, classes=CLASSES)
    print(f"wrote {out} ({rows:,} rows, {gb:g} GB) in {time.time() - t0:.0f} s", flush=True)
    return out


def npz_file(root: Path, gb: float) -> Path:
    path = root / f"data_{gb:g}gb.npz"
    if not path.is_file():
        rows = int(gb * 1e9 / ROW_BYTES)
        xs, ys = zip(*_chunks(rows, seed=0))
        xt, yt = next(_chunks(TEST_ROWS, seed=99))
        np.savez(path, x=np.concatenate(xs), y=np.concatenate(ys), x_test=xt, y_test=yt)
    return path


def train(data: list[str], ranks: int, steps: int, work: Path) -> list[int]:
    """Train through the CLI on `ranks` ranks; the peak resident set of each rank (bytes)."""
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run_"))
    args = ["-m", "randlift_dist.train", *data, "train.loss=cross_entropy", f"model.base.in_dim={IN_DIM}",
            f"model.base.out_dim={CLASSES}", "model.base.hidden_dims=[1,1]", "model.lift.size=256",
            "model.lift.degree=8", "parallel.engine=torch", f"train.steps={steps}", "train.batch_size=256",
            "train.eval_every=0", "checkpoint.every=0", "wandb.mode=disabled", "run.progress=false",
            f"run.dir={run_dir}"]
    cmd = [sys.executable] + (args if ranks == 1 else
                              ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] + args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in ([proc.pid] if ranks == 1 else [c for c in _children(proc.pid) if _is_rank(c)]):
            hwm = _status(pid).get("VmHWM")
            if hwm:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
        time.sleep(0.02)
    log = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{log[-3000:]}")
    final = [ln for ln in log.splitlines() if ln.startswith("final step")]
    print(f"    {final[-1] if final else '(no final line)'}", flush=True)
    return sorted(peaks.values(), reverse=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", default="0.5,8")
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--npz-gb", default="0.5", help="in-memory contrast runs (empty: none)")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "randlift_data_memory"))
    args = ap.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(hardware_line())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    first: dict[int, int] = {}
    for gb in [float(s) for s in args.sizes_gb.split(",") if s]:
        folder = shard_dir(root, gb)
        disk = sum(f.stat().st_size for f in folder.iterdir())
        for ranks in [int(r) for r in args.nproc.split(",")]:
            peaks = train(["data.kind=shards", f"data.path={folder}"], ranks, args.steps, root)
            first.setdefault(ranks, peaks[0])
            print(f"shards {gb:g} GB ({disk / 1e9:.2f} GB on disk), {ranks} rank(s): peak "
                  f"{'/'.join(f'{p / 1e6:.0f}' for p in peaks)} MB; growth over the first size "
                  f"{(peaks[0] - first[ranks]) / 1e6:+.0f} MB", flush=True)
    for gb in [float(s) for s in args.npz_gb.split(",") if s]:
        path = npz_file(root, gb)
        peaks = train(["data.kind=npz", f"data.path={path}"], 1, args.steps, root)
        print(f"npz {gb:g} GB in memory, 1 rank: peak {peaks[0] / 1e6:.0f} MB", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
