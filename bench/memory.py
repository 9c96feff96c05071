"""Peak memory of real training runs, measured from outside, against `randlift_dist.estimate`.

`python bench/memory.py [--cases NAME,...] [--steps N] [--list] [--json FILE]`, or
`python bench/memory.py --config FILE --nproc N` (a config file as it is, e.g. configs/cpu_500m.yaml)

Each case is a config (written to a temporary directory) trained through the real CLI:
`python -m randlift_dist.train --config F` for one rank, `torchrun --standalone --nproc_per_node
2 -m randlift_dist.train ... parallel.lift_parallel=2` for two, with `parallel.engine=torch`,
fp32, Adam, `wandb.mode=disabled`, `checkpoint.every=0`, `run.progress=false`, a few steps.
While it runs, every 20 ms, the harness reads `/proc/<pid>/status` (VmHWM: the kernel's peak
resident set) of every rank process (the launched process, or torchrun's children running the
trainer); a rank's peak is its last VmHWM. Printed per case: parameters, the predicted peak per
rank (`estimate`, with its phase), the measured peak of each rank, the ratio of the busiest rank
to the prediction, the marginal and overall bytes per parameter, and the step time
(`metrics.jsonl`). The hardware line comes first. Only one case runs at a time.

Cases (`--list`): `r16_*`: residual MLP of 16-dimensional vertices (depth 4, gelu, degree 16);
`s1_*`: MLP of scalar vertices (4 hidden layers, tanh, degree 32); the suffix is the size in
millions of parameters and `_p2` marks two ranks; `r16_560m_*` (~10 GB, one at a time) measure
bytes per parameter at d = 16 with a small batch or micro-batches; `r24t_*` and `r16d2_*` are
two-rank shapes off the calibration ones (width 24 and tanh with micro-batches; depth 2 with
all-to-all exchange); `cnn1d_*` (configs/mnist1d_cnn.yaml's 1-D CNN scaled up: conv vertices with
positions, unfold chunks, a flatten head) and `trf_*` (configs/attention_recall.yaml's transformer
block: token embeddings, attention, layer norms) check the model on vertices with positions,
`cnn1d_12m_eval` with an evaluation chunk of 1024 samples. The runs get the CLI's allocator
settings (`train.limit_heap`; set `RANDLIFT_MALLOC=default` to measure glibc's default). Measurements: `docs/scale.md`, README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from hardware import hardware_line  # noqa: E402

from randlift_dist.config import load_config  # noqa: E402
from randlift_dist.estimate import estimate  # noqa: E402

R16 = {"builder": "residual_mlp", "in_dim": 16, "width": 16, "depth": 4, "out_dim": 1, "activation": "gelu"}
S1 = {"builder": "mlp", "in_dim": 4, "hidden_dims": [1, 1, 1, 1], "out_dim": 1, "activation": "tanh"}
# other shapes, to check the model off its calibration cases
R24T = {"builder": "residual_mlp", "in_dim": 8, "width": 24, "depth": 3, "out_dim": 2, "activation": "tanh"}
R16D2 = {"builder": "residual_mlp", "in_dim": 16, "width": 16, "depth": 2, "out_dim": 1, "activation": "gelu"}
# vertices with positions: configs/mnist1d_cnn.yaml's CNN (40 -> 19 -> 10 -> 5 positions, groups of 4 channels,
# a flatten head into y) and configs/attention_recall.yaml's transformer block (33 token positions)
CNN1D = {"builder": "cnn1d", "length": 40, "channels": 1, "dims": [4, 4, 4], "out_dim": 10, "kernel": [5, 3, 3],
         "stride": 2, "padding": 1, "activation": "relu", "head": "flatten"}
TRF = {"builder": "transformer", "seq_len": 33, "tokens": 64, "width": 8, "head_dim": 8, "mlp_dim": 16, "out_dim": 32,
       "depth": 1, "mixer_kernel": 3, "readout": "select"}
RECALL = {"kind": "recall", "recall": {"n_train": 1024, "n_test": 32, "pairs": 16, "keys": 32, "values": 32, "seed": 0}}


def _cnn_lift(s: int, degree: int) -> tuple[dict, dict]:
    """configs/mnist1d_cnn.yaml's lift scaled: conv fibres of s members, y of s / 2."""
    return {"c1": s, "c2": s, "c3": s, "y": s // 2}, {"x->c1": 1, "c1->c2": degree, "c2->c3": degree, "c3->y": 12}
# name: (base, lift size, degree, ranks, batch[, settings merged into the config])
# ~ params: r16 21504 x s, s1 128 x s
CASES = {
    "r16_tiny": (R16, 32, 16, 1, 64), "r16_tiny_p2": (R16, 32, 16, 2, 64),
    "r16_10m": (R16, 480, 16, 1, 64), "r16_50m": (R16, 2400, 16, 1, 64), "r16_200m": (R16, 9600, 16, 1, 64),
    "r16_50m_p2": (R16, 2400, 16, 2, 64), "r16_200m_p2": (R16, 9600, 16, 2, 64),
    "s1_10m": (S1, 80000, 32, 1, 64), "s1_40m": (S1, 320000, 32, 1, 64), "s1_100m": (S1, 800000, 32, 1, 64),
    "s1_40m_p2": (S1, 320000, 32, 2, 64),
    "r16_500m_p2": (R16, 24000, 16, 2, 32),
    # bytes per parameter at d = 16 on one rank: a lift big enough to amortise the process, and
    # activations kept small by the batch (b16) or by micro-batches (mb8); ~10 GB each
    "r16_560m_b16": (R16, 26000, 16, 1, 16),
    "r16_560m_b16_blocked": (R16, 26000, 16, 1, 16, {"model": {"impl": "blocked"}}),
    "r16_560m_mb8": (R16, 26000, 16, 1, 64, {"train": {"micro_batch_size": 8}}),
    # 2 ranks off the calibration shapes: width 24, tanh, micro-batches; depth 2, all-to-all, a
    # bigger test set (evaluation at 256 samples)
    "r24t_190m_p2": (R24T, 10000, 10, 2, 48, {"model": {"lift": {"seed": 3}}, "data": {"n_test": 96},
                                              "train": {"micro_batch_size": 24}}),
    "r16d2_90m_p2_a2a": (R16D2, 12000, 24, 2, 32, {"model": {"lift": {"seed": 5}}, "data": {"n_test": 256},
                                                   "parallel": {"exchange": "alltoall"}}),
    # positions: activations [n, d, B * P], conv unfold chunks, attention, layer norms, embeddings; the
    # evaluations run at the training batch (n_test and train.eval_train_max = batch)
    "cnn1d_23m": (CNN1D, *_cnn_lift(8192, 16), 1, 64, {"data": {"n_test": 64}, "train": {"eval_train_max": 64}}),
    "cnn1d_23m_p2": (CNN1D, *_cnn_lift(8192, 16), 2, 64, {"data": {"n_test": 64}, "train": {"eval_train_max": 64}}),
    "trf_20m": (TRF, 1024, 16, 1, 32, {"data": RECALL, "train": {"eval_train_max": 32, "loss": "cross_entropy"}}),
    "trf_20m_p2": (TRF, 1024, 16, 2, 32, {"data": RECALL, "train": {"eval_train_max": 32, "loss": "cross_entropy"}}),
}


def _merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if k == "data" and "kind" in v:  # another kind of data: replaced whole
            into[k] = v
        elif isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v
    return into


def case_config(name: str, steps: int, run_dir: str) -> dict:
    base, size, degree, ranks, batch, *extra = CASES[name]
    return _merge({"model": {"base": base, "lift": {"size": size, "degree": degree, "seed": 0}},
            "data": {"kind": "teacher", "n_train": 1024, "n_test": 64, "teacher_size": 8, "teacher_degree": 4},
            "train": {"steps": steps, "lr": 0.003, "batch_size": batch, "optimizer": "adam", "warmup_steps": 1,
                      "log_every": 1, "eval_every": 0},
            "parallel": {"lift_parallel": ranks, "engine": "torch"},
            "checkpoint": {"every": 0}, "run": {"dir": run_dir, "progress": False}, "wandb": {"mode": "disabled"}},
                  extra[0] if extra else {})


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _is_rank(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"randlift_dist.train" in cmd and b"torch.distributed.run" not in cmd


def run_case(name: str, steps: int, workdir: Path, config: str | None = None, ranks: int = 1) -> dict:
    """Train one case (or the config file `config` on `ranks` ranks) and measure it."""
    cfg_path = workdir / f"{name}.yaml"
    run_dir = workdir / f"run_{name}"
    if config is None:
        ranks = CASES[name][3]
        cfg_path.write_text(yaml.safe_dump(case_config(name, steps, str(run_dir))))
    else:
        data = yaml.safe_load(Path(config).read_text())
        data.setdefault("run", {})["dir"] = str(run_dir)
        data.setdefault("checkpoint", {})["keep"] = 1
        cfg_path.write_text(yaml.safe_dump(data))
    train = ["-m", "randlift_dist.train", "--config", str(cfg_path)]
    cmd = [sys.executable] + (train if ranks == 1 else
                              ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] + train)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks))))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        pids = [proc.pid] if ranks == 1 else [c for c in _children(proc.pid) if _is_rank(c)]
        for pid in pids:
            hwm = _status(pid).get("VmHWM")
            if hwm:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
        time.sleep(0.02)
    log = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n{log[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    batch = load_config(str(cfg_path)).train.batch_size
    steps_t = [1 / r["samples_per_s"] * batch for r in recs if r.get("samples_per_s")]
    losses = [r["loss"] for r in recs if "loss" in r]
    est = estimate(load_config(str(cfg_path)), ranks)
    measured = sorted(peaks.values(), reverse=True)
    return {"case": name, "ranks": ranks, "params": est["params"], "params_per_rank": est["params_per_rank"],
            "predicted": est["peak_bytes_per_rank"], "phase": est["peak_phase"], "measured": measured,
            "ratio": measured[0] / est["peak_bytes_per_rank"] if measured else float("nan"),
            "step_s": sorted(steps_t[1:] or steps_t)[len(steps_t[1:] or steps_t) // 2] if steps_t else float("nan"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "peak_mem_mb_metrics": max((r.get("peak_mem_mb", 0) for r in recs), default=0),
            "wall_s": time.time() - t0, "estimate": {k: v for k, v in est.items() if k.endswith("_bytes")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="r16_10m,r16_50m,s1_10m,s1_40m,r16_50m_p2,s1_40m_p2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--config", default=None, help="measure this config file instead of the cases")
    ap.add_argument("--nproc", type=int, default=1, help="ranks for --config (parallel.lift_parallel must fit)")
    args = ap.parse_args(argv)
    if args.list:
        for k, (_, s, deg, p, b, *extra) in CASES.items():
            print(f"{k}: size {s}, degree {deg}, {p} rank(s), batch {b}" + (f", {extra[0]}" if extra else ""))
        return 0
    print(hardware_line())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    MB = 1e6
    print(f"{'case':<13}{'params':>12}{'pred MB':>10}{'phase':>10}{'measured MB (ranks)':>22}{'ratio':>7}"
          f"{'B/param':>9}{'step s':>8}")
    results = []
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as tmp:
        names = [Path(args.config).stem] if args.config else args.cases.split(",")
        for name in names:
            r = run_case(name, args.steps, Path(tmp), args.config, args.nproc)
            results.append(r)
            meas = "/".join(f"{m / MB:.0f}" for m in r["measured"])
            print(f"{name:<13}{r['params']:>12,.0f}{r['predicted'] / MB:>10.0f}{r['phase']:>10}{meas:>22}"
                  f"{r['ratio']:>7.3f}{r['measured'][0] / r['params_per_rank']:>9.1f}{r['step_s']:>8.2f}", flush=True)
            print(f"  loss {r['loss_first']:.4g} -> {r['loss_last']:.4g}; load average {os.getloadavg()[0]:.2f}", flush=True)
    by = {r["case"]: r for r in results}
    for a, b in (("r16_10m", "r16_50m"), ("r16_50m", "r16_200m"), ("s1_10m", "s1_40m"), ("s1_40m", "s1_100m")):
        if a in by and b in by:
            dm = by[b]["measured"][0] - by[a]["measured"][0]
            dp = by[b]["params"] - by[a]["params"]
            print(f"marginal bytes/param {a} -> {b}: {dm / dp:.2f} measured, "
                  f"{(by[b]['predicted'] - by[a]['predicted']) / dp:.2f} predicted")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
