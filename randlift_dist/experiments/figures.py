"""Aggregation of a convergence experiment: `results.csv`, `summary.csv`, figures, wandb.

`aggregate(plan)` reads the `result.json` of every finished cell of the plan and writes, under the
experiment's `out` directory:

- `results.csv`: one row per finished cell (`RESULT_COLUMNS`);
- `summary.csv`: one row per (lift kind, size): cells, successes, P(reach the target) with its
  Wilson 95% interval, the target (`metric`, `target`: e.g. `test_accuracy >= 0.9`), medians of
  the target's metric, the final test and train loss (and test accuracy for classification),
  proxy test loss (regression), distance and parameter count; the mean, standard deviation, minimum
  and maximum of the target's metric over the seeds, and the median wall time of a cell;
- `summary.md`: the same per kind and size as a markdown table (parameters, the target's metric
  as mean +- std [min, max], successes, wall time): what the README's result tables are;
- `figures/p_reach.png` (P(target) against lift size, Wilson intervals, one line per kind; the
  axis names the target), `figures/final_loss.png` for a loss target, `final_accuracy.png` for
  an accuracy target (the target's metric against lift size and against parameter count; for
  `test_loss` with the readout-only proxy), `figures/distance.png` (distance travelled against
  lift size);
- with `wandb.mode` not `disabled`: a summary run (group = experiment name) with both tables and
  the images (the cells' own runs are logged by the trainer in the same group).

matplotlib (Agg backend) and wandb are imported only here, inside the functions.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from .target import Target, parse_target

RESULT_COLUMNS = ["id", "kind", "law", "degree", "size", "seed", "params", "edges", "steps", "eps", "train_loss",
                  "test_loss", "reached", "step_test_eps", "reached_train", "step_train_eps", "last_batch_loss",
                  "distance", "proxy_train_loss", "proxy_test_loss", "train_s", "wall_s", "metric", "target", "value",
                  "step_reached", "test_accuracy", "train_accuracy", "loss_name", "data_kind"]
SUMMARY_COLUMNS = ["kind", "size", "cells", "reached", "p_reach", "wilson_lo", "wilson_hi", "median_test_loss",
                   "median_train_loss", "median_proxy_test_loss", "median_distance", "params", "metric", "target",
                   "median_value", "median_test_accuracy", "mean_value", "std_value", "min_value", "max_value",
                   "median_wall_s"]


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """`(k/n, lo, hi)`: the Wilson score interval of a binomial proportion (95% for the default z)."""
    if n <= 0:
        raise ValueError(f"wilson: n={n}: need at least one trial")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} successes out of n={n}: need 0 <= k <= n")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def load_results(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished cells' results, in plan order (cells with another fingerprint are skipped)."""
    rows = []
    for cell in plan["cells"]:
        path = Path(plan["out"]) / "cells" / cell["id"] / "result.json"
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if r.get("fingerprint") == cell["fingerprint"]:
            rows.append(r)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kind, size) in first-seen kind order and increasing size."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    out = []
    for kind in kinds:
        for size in sorted({r["size"] for r in rows if r["kind"] == kind}):
            g = [r for r in rows if r["kind"] == kind and r["size"] == size]
            k = sum(bool(r["reached"]) for r in g)
            p, lo, hi = wilson(k, len(g))
            out.append({"kind": kind, "size": size, "cells": len(g), "reached": k, "p_reach": p, "wilson_lo": lo,
                        "wilson_hi": hi, "median_test_loss": _median(g, "test_loss"),
                        "median_train_loss": _median(g, "train_loss"),
                        "median_proxy_test_loss": _median(g, "proxy_test_loss"),
                        "median_distance": _median(g, "distance"), "params": _median(g, "params"),
                        "metric": g[0].get("metric"), "target": g[0].get("target"),
                        "median_value": _median(g, "value"), "median_test_accuracy": _median(g, "test_accuracy"),
                        **_spread(g, "value"), "median_wall_s": _median(g, "wall_s")})
    return out


def _spread(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Mean, sample standard deviation, minimum and maximum of a column over the seeds of a row."""
    xs = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return {"mean_value": statistics.fmean(xs) if xs else None,
            "std_value": statistics.stdev(xs) if len(xs) > 1 else None,
            "min_value": min(xs) if xs else None, "max_value": max(xs) if xs else None}


def markdown(summary: list[dict[str, Any]], target: Target) -> str:
    """`summary.md`: per kind and size, the parameters (median over seeds), the target's metric over
    the seeds (mean, standard deviation, range), successes and the median wall time of a cell."""
    head = (f"| kind | s | params | {target.metric}: mean +- std [min, max] | {target.label} | wall s / cell |\n"
            "|---|---:|---:|---|---:|---:|\n")
    lines = []
    for r in summary:
        v = r["mean_value"]
        spread = "-" if v is None else (f"{v:.4f} +- {r['std_value']:.4f}" if r["std_value"] is not None else f"{v:.4f}")
        rng = "" if v is None else f" [{r['min_value']:.4f}, {r['max_value']:.4f}]"
        lines.append(f"| {r['kind']} | {r['size']} | {r['params']:,.0f} | {spread}{rng} | {r['reached']} / {r['cells']} "
                     f"| {r['median_wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.median(xs) if xs else None


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    tmp.replace(path)


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["kind"], []).append(r)
    return out


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], fig_dir: Path, target: Target,
         title: str) -> list[Path]:
    """The three figures (PNG, Agg backend); returns their paths. Every axis that shows success or
    the target's metric names it (`target.label`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(dict.fromkeys(r["kind"] for r in rows))}
    n_seeds = max((s["cells"] for s in summary), default=0)
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (kind, g) in enumerate(_by_kind(summary).items()):
        x = [s["size"] * (1 + 0.04 * (i - 1)) for s in g]  # a small offset keeps the bars apart
        y = [s["p_reach"] for s in g]
        err = [[s["p_reach"] - s["wilson_lo"] for s in g], [s["wilson_hi"] - s["p_reach"] for s in g]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[kind], label=kind)
    ax.set(xscale="log", xlabel="lift size s", ylabel=f"P(final {target.label})", ylim=(-0.05, 1.05),
           title=f"{title}: reaching {target.label} ({n_seeds} seeds, Wilson 95%)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, fig_dir / "p_reach.png"))

    metric, proxy = target.metric, target.metric == "test_loss"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for kind, g in _by_kind(rows).items():
        for ax, key in zip(axes, ("size", "params")):
            ax.scatter([r[key] for r in g], [r.get(metric) for r in g], s=10, alpha=0.45, color=colours[kind])
    for kind, g in _by_kind(summary).items():
        for ax, key in zip(axes, ("size", "params")):
            ax.plot([s[key] for s in g], [s["median_value"] for s in g], "-o", color=colours[kind],
                    label=f"{kind}: trained (median)")
            if proxy and any(s["median_proxy_test_loss"] is not None for s in g):
                ax.plot([s[key] for s in g], [s["median_proxy_test_loss"] for s in g], "--", color=colours[kind],
                        alpha=0.7, label=f"{kind}: readout-only proxy")
    for ax, label in zip(axes, ("lift size s", "parameters")):
        ax.axhline(target.bound, color="k", lw=0.8, ls=":", label=f"target: {target.label}")
        ax.set(xscale="log", yscale="log" if target.is_loss else "linear", xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylabel(f"final {metric.replace('_', ' ')}")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{title}: final {metric.replace('_', ' ')} (dots: cells)")
    paths.append(_save(fig, fig_dir / ("final_loss.png" if target.is_loss else "final_accuracy.png")))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, g in _by_kind(rows).items():
        ax.scatter([r["size"] for r in g], [r["distance"] for r in g], s=10, alpha=0.45, color=colours[kind])
    for kind, g in _by_kind(summary).items():
        ax.plot([s["size"] for s in g], [s["median_distance"] for s in g], "-o", color=colours[kind], label=kind)
    ax.set(xscale="log", yscale="log", xlabel="lift size s", ylabel="||theta_T - theta_0|| / ||theta_0||",
           title=f"{title}: distance travelled (non-readout weights)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, fig_dir / "distance.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb(plan: dict[str, Any], rows: list[dict[str, Any]], summary: list[dict[str, Any]],
              figures: list[Path]) -> None:
    """A summary run (job type `summary`) with the tables and the figures, in the experiment's group."""
    import os

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    exp, out = plan["experiment"], Path(plan["out"])
    run = wandb.init(project=plan["wandb_project"], entity=plan["wandb_entity"], mode=plan["wandb_mode"],
                     dir=str(out), group=exp["name"], job_type="summary", name=f"{exp['name']}-summary",
                     config={"experiment": exp}, settings=wandb.Settings(console="off"))
    run.log({"results": wandb.Table(columns=RESULT_COLUMNS, data=[[r.get(c) for c in RESULT_COLUMNS] for r in rows]),
             "summary": wandb.Table(columns=SUMMARY_COLUMNS,
                                    data=[[s.get(c) for c in SUMMARY_COLUMNS] for s in summary]),
             **{f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.finish()


def aggregate(plan: dict[str, Any]) -> dict[str, Any]:
    """Write the tables and figures of the finished cells; returns `{rows, summary, figures}`."""
    out, exp = Path(plan["out"]), plan["experiment"]
    rows = load_results(plan)
    write_csv(out / "results.csv", rows, RESULT_COLUMNS)
    summary = summarise(rows) if rows else []
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    if summary:
        (out / "summary.md").write_text(markdown(summary, parse_target(exp["target"])))
    figures = plot(rows, summary, out / "figures", parse_target(exp["target"]), exp["name"]) if rows else []
    if rows and plan.get("wandb_mode", "disabled") != "disabled":
        log_wandb(plan, rows, summary, figures)
    return {"rows": rows, "summary": summary, "figures": figures}
