"""Gather a sweep's runs into one table: `python -m randlift_dist.experiments.collect ROOT`.

Every directory under ROOT holding a `metrics.jsonl` is a run. Its lift size and seed come from
the resolved `config.yaml` the trainer wrote beside it (not from the directory name), its final
metrics from the last record of `metrics.jsonl` that has a `test_loss` (the final evaluation of a
finished run). Per lift size: the number of runs, how many finished (`step == train.steps`), the
min / median / max final test loss and, with `--target-loss EPS`, the fraction of runs whose final
test loss is <= EPS. A run that has not logged a test loss counts as not reaching EPS; an
unfinished run counts with its latest test loss, and the `done` column shows it.

Reads files only: no process group, no torch import.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run's identity (size, seed) and final metrics; `error` says what is missing."""
    run: dict[str, Any] = {"dir": str(run_dir), "size": None, "seed": None, "steps": None, "step": None,
                           "loss": None, "test_loss": None, "best_test_loss": None, "done": False}
    cfg_path = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        lift = cfg["model"]["lift"]
        run.update(size=int(lift["size"]), seed=int(lift["seed"]), steps=int(cfg["train"]["steps"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        run["error"] = f"no usable {cfg_path.name} ({type(err).__name__}: {err})"
        return run
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; the rest is still good
    tested = [r for r in records if _finite(r.get("test_loss"))]
    trained = [r for r in records if _finite(r.get("loss"))]
    if trained:
        run["loss"] = trained[-1]["loss"]
    if not tested:
        run["error"] = "no test_loss recorded yet"
        return run
    last = tested[-1]
    run.update(step=last["step"], test_loss=last["test_loss"],
               best_test_loss=min(r["test_loss"] for r in tested),
               done=last["step"] >= run["steps"])
    return run


def find_runs(root: Path) -> list[dict[str, Any]]:
    runs = [read_run(p.parent) for p in sorted(root.rglob("metrics.jsonl"))]
    return sorted(runs, key=lambda r: (r["size"] is None, r["size"] or 0, r["seed"] or 0, r["dir"]))


def by_size(runs: list[dict[str, Any]], target: float | None) -> list[dict[str, Any]]:
    """Per lift size: counts, final test loss statistics, fraction reaching the target."""
    rows = []
    for size in sorted({r["size"] for r in runs if r["size"] is not None}):
        group = [r for r in runs if r["size"] == size]
        losses = [r["test_loss"] for r in group if r["test_loss"] is not None]
        row: dict[str, Any] = {"size": size, "runs": len(group), "done": sum(r["done"] for r in group),
                               "seeds": sorted(r["seed"] for r in group),
                               "min": min(losses) if losses else None,
                               "median": statistics.median(losses) if losses else None,
                               "max": max(losses) if losses else None}
        if target is not None:
            reached = sum(1 for x in losses if x <= target)
            row["reached"] = reached
            row["fraction"] = reached / len(group)
        rows.append(row)
    return rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def render(root: Path, runs: list[dict[str, Any]], sizes: list[dict[str, Any]], target: float | None) -> str:
    out = [f"{len(runs)} runs under {root}", ""]
    out.append(_table(["size", "seed", "step", "steps", "done", "loss", "test_loss", "best_test", "dir"],
                      [[r["size"], r["seed"], r["step"], r["steps"], "yes" if r["done"] else "no", r["loss"],
                        r["test_loss"], r["best_test_loss"],
                        _rel(r["dir"], root) + (f"  ({r['error']})" if "error" in r else "")] for r in runs]))
    out.append("")
    header = ["size", "runs", "done", "min_test", "median_test", "max_test"]
    if target is not None:
        header += [f"reached<={target:g}", "fraction"]
    out.append(_table(header, [[s["size"], s["runs"], s["done"], s["min"], s["median"], s["max"]]
                               + ([s["reached"], s["fraction"]] if target is not None else []) for s in sizes]))
    return "\n".join(out)


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root)) or "."
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m randlift_dist.experiments.collect",
                                 description="Gather the final metrics of every run under ROOT into one table.")
    ap.add_argument("root", type=Path, help="sweep directory (the runs are its subdirectories with metrics.jsonl)")
    ap.add_argument("--target-loss", type=float, default=None, metavar="EPS",
                    help="also report, per lift size, the fraction of runs with final test_loss <= EPS")
    ap.add_argument("--json", action="store_true", help="print JSON {root, target_loss, runs, by_size} instead")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"collect: {args.root}: no such directory", file=sys.stderr)
        return 2
    runs = find_runs(args.root)
    if not runs:
        print(f"collect: no run under {args.root} (no metrics.jsonl found)", file=sys.stderr)
        return 1
    sizes = by_size(runs, args.target_loss)
    if args.json:
        print(json.dumps({"root": str(args.root), "target_loss": args.target_loss, "runs": runs, "by_size": sizes},
                         indent=1))
    else:
        print(render(args.root, runs, sizes, args.target_loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
