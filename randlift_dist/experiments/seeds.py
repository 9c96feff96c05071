"""One training config over several seeds: the table of final test metrics (a README's results).

    python -m randlift_dist.experiments.seeds --config configs/mnist1d_cnn.yaml --seeds 5 \
        --out runs/mnist1d_cnn_seeds [--workers 2] [--threads 1] [key=value ...]

Seed s runs the real entry point (`python -m randlift_dist.train`) with `model.lift.seed=s
model.weight_seed=s run.dir=<out>/seed_<s> run.progress=false` and the given overrides, in its own
process (`--workers` at once, `OMP_NUM_THREADS=--threads` each); its stdout and stderr go to
`<out>/seed_<s>/log.txt`. A seed whose run finished is not rerun (the trainer says it is finished
and exits 0); an interrupted one resumes from its last checkpoint. Then, per seed, the last
evaluation in `metrics.jsonl` (`test_accuracy` for classification, `test_loss`) and the parameter
count (`lift_stats.json`) go to `<out>/summary.json` and a markdown table on stdout: per seed, and
mean, standard deviation (n - 1), min and max. Exit status: 0, or 2 for a bad argument or config
(one line), or 1 when a seed's run failed (its log's last lines are printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config


def run_seed(config: str, seed: int, out: Path, overrides: list[str], threads: int) -> tuple[int, int]:
    """Train one seed to the end (or find it finished): `(seed, exit status)`."""
    d = out / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "randlift_dist.train", "--config", config, f"model.lift.seed={seed}",
           f"model.weight_seed={seed}", f"run.dir={d}", "run.progress=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(d / "log.txt", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return seed, subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last evaluation of a run (`test_*` keys and its step) and its parameter count."""
    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("test_") for k in rec):
            last = {"step": rec["step"], **{k: v for k, v in rec.items() if k.startswith("test_")}}
    stats = json.loads((run_dir / "lift_stats.json").read_text())
    return {**last, "params": stats.get("params")}


def summarise(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[k] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def table(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]], keys: list[str]) -> str:
    head = "| seed | params | step | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    for r in rows:
        lines.append(f"| {r['seed']} | {r.get('params', '')} | {r.get('step', '')} | " +
                     " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    lines.append("| mean +- std (min, max) | | | " + " | ".join(
        f"{s['mean']:.4f} +- {s['std']:.4f} ({s['min']:.4f}, {s['max']:.4f})" if (s := summary.get(k)) else ""
        for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="training config (YAML)")
    ap.add_argument("--seeds", default="5", help="a count n (seeds 0..n-1) or a comma-separated list")
    ap.add_argument("--out", required=True, help="output directory (one run directory per seed)")
    ap.add_argument("--workers", type=int, default=1, help="seeds trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per seed")
    ap.add_argument("overrides", nargs="*", help="key=value training overrides for every seed")
    args = ap.parse_args(argv)
    try:
        seeds = list(range(int(args.seeds))) if "," not in args.seeds else [int(s) for s in args.seeds.split(",")]
        if not seeds or min(seeds) < 0 or args.workers < 1 or args.threads < 1:
            raise ValueError
    except ValueError:
        print(f"seeds: --seeds {args.seeds!r} --workers {args.workers} --threads {args.threads}: give a count or a "
              "list of non-negative seeds, and positive workers and threads", file=sys.stderr)
        return 2
    try:
        load_config(args.config, args.overrides)  # one line now rather than one failure per seed
    except ConfigError as err:
        print(f"seeds: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        codes = dict(pool.map(lambda s: run_seed(args.config, s, out, args.overrides, args.threads), seeds))
    failed = [s for s, c in codes.items() if c != 0]
    for s in failed:
        tail = (out / f"seed_{s}" / "log.txt").read_text().splitlines()[-5:]
        print(f"seeds: seed {s} exited {codes[s]}:\n  " + "\n  ".join(tail), file=sys.stderr)
    rows = [{"seed": s, **final_metrics(out / f"seed_{s}")} for s in seeds if s not in failed]
    keys = sorted({k for r in rows for k in r if k.startswith("test_")}, key=lambda k: (k != "test_accuracy", k))
    summary = summarise(rows, keys + ["params"])
    (out / "summary.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                  "rows": rows, "summary": summary}, indent=1) + "\n")
    print(table(rows, summary, keys))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
