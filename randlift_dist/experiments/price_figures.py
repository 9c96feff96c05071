"""Figures of the price-of-randomness experiment, drawn from the rows of `price.csv` and
`p_curve.csv` (`price_report.tables`) so that they show exactly the tables' numbers.

- `s90_vs_smin.png`: s_top (the highest level, 0.9 by default) against s_min, log-log, one point
  per task x kind (colour: kind, marker: task), vertical bars: the bootstrap interval of s_top;
  dotted lines: ratio 1, 2, 4, 8, 16. Censored values are drawn at their bound with an open marker.
- `ratio_vs_degree.png`: s_top / s_min against the degree (log2 axis; the fully-connected lift
  at the right, labelled `full`), one line per task, bars: the ratio's interval.
- `p_collapse.png`: the fitted P against s / s_min (log axis), one line per pair (dots: raw P);
  if the price of randomness were one number, the curves would lie on one another.
- `p_curves.png`: P against s, one panel per task (its target in the title), s_q marked.
matplotlib (Agg) is imported inside `plot` only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MARKERS = "osD^v<>Ph*X"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot(ctx: dict[str, Any], price: list[dict[str, Any]], curves: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    fig_dir.mkdir(parents=True, exist_ok=True)
    top = f"s_{round(max(ctx['levels']) * 100)}"
    kinds = list(dict.fromkeys(r["kind"] for r in price))
    tasks = list(dict.fromkeys(r["task"] for r in price))
    colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    marker = {t: MARKERS[i % len(MARKERS)] for i, t in enumerate(tasks)}
    label = {r["task"]: f"{r['task']} ({r['target']})" for r in price}
    title = ctx["name"]
    paths = []

    # s_top against s_min
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    xs = []
    for r in price:
        if not (_finite(r["s_min"]) and r[top] is not None):
            continue
        y = r[top] if _finite(r[top]) else max(r["s_min"], 1) * 64  # censored above: drawn high, open
        lo, hi = r[f"{top}_lo"], r[f"{top}_hi"] if _finite(r[f"{top}_hi"]) else y
        open_ = bool(r[f"{top}_censored"]) or bool(r["s_min_note"])
        ax.errorbar([r["s_min"]], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], marker=marker[r["task"]],
                    color=colour[r["kind"]], mfc="white" if open_ else colour[r["kind"]], capsize=3, ls="none")
        xs.append(r["s_min"])
    if xs:
        grid = [min(xs) / 1.5, max(xs) * 1.5]
        for m in (1, 2, 4, 8, 16):
            ax.plot(grid, [g * m for g in grid], ":", color="grey", lw=0.8)
            ax.annotate(f"x{m}", (grid[1], grid[1] * m), fontsize=7, color="grey")
    for k in kinds:
        ax.plot([], [], "o", color=colour[k], label=k)
    for t in tasks:
        ax.plot([], [], marker[t], color="k", mfc="white", label=label[t])
    ax.set(xscale="log", yscale="log", xlabel="s_min (smallest size any run reached the target)",
           ylabel=f"{top} (P(s) crosses {max(ctx['levels']):g})",
           title=f"{title}: {top} against s_min (bars: bootstrap {ctx['bootstrap']['confidence']:.0%})")
    for axis in (ax.xaxis, ax.yaxis):  # powers of 2, plain numbers
        axis.set_major_locator(LogLocator(base=2))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(plt, fig, fig_dir / "s90_vs_smin.png"))

    # the ratio against the degree
    degrees = sorted({float(r["degree"]) for r in price if r["degree"] != "full"})
    full_x = (max(degrees) * 2) if degrees else 1.0
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for t in tasks:
        rows = sorted((r for r in price if r["task"] == t),
                      key=lambda r: full_x if r["degree"] == "full" else float(r["degree"]))
        pts = [(full_x if r["degree"] == "full" else float(r["degree"]), r) for r in rows if _finite(r["ratio"])]
        if not pts:
            continue
        x = [p for p, _ in pts]
        y = [r["ratio"] for _, r in pts]
        err = [[max(r["ratio"] - r["ratio_lo"], 0) if _finite(r["ratio_lo"]) else 0 for _, r in pts],
               [max(r["ratio_hi"] - r["ratio"], 0) if _finite(r["ratio_hi"]) else 0 for _, r in pts]]
        ax.errorbar(x, y, yerr=err, marker=marker[t], capsize=3, label=label[t])
    ax.set_xscale("log", base=2)
    ax.set_xticks(degrees + [full_x], [f"{d:g}" for d in degrees] + ["full"])
    ax.set(yscale="log", xlabel="degree", ylabel=f"{top} / s_min",
           title=f"{title}: the price of randomness against the degree")
    ax.axhline(1, color="k", lw=0.8, ls=":")
    ax.yaxis.set_major_locator(LogLocator(base=2))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(plt, fig, fig_dir / "ratio_vs_degree.png"))

    # collapse: P against s / s_min
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for r in price:
        c = [x for x in curves if x["task"] == r["task"] and x["kind"] == r["kind"] and _finite(x["s_over_s_min"])]
        if not c:
            continue
        x = [v["s_over_s_min"] for v in c]
        ax.plot(x, [v["p_fit"] for v in c], "-", color=colour[r["kind"]], marker=marker[r["task"]], ms=3, alpha=0.8)
        ax.scatter(x, [v["p"] for v in c], s=8, color=colour[r["kind"]], alpha=0.35)
    for k in kinds:
        ax.plot([], [], "-", color=colour[k], label=k)
    for t in tasks:
        ax.plot([], [], marker[t], color="k", label=label[t])
    for q in ctx["levels"]:
        ax.axhline(q, color="grey", lw=0.8, ls=":")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="s / s_min", ylabel="P(target reached)", ylim=(-0.05, 1.05),
           title=f"{title}: P against s / s_min (lines: isotonic fit, dots: observed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, fig_dir / "p_collapse.png"))

    # P(s) per task
    cols = min(3, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for r in (r for r in price if r["task"] == t):
            c = [x for x in curves if x["task"] == t and x["kind"] == r["kind"]]
            ax.plot([v["size"] for v in c], [v["p_fit"] for v in c], "-", color=colour[r["kind"]], label=r["kind"])
            ax.scatter([v["size"] for v in c], [v["p"] for v in c], s=10, color=colour[r["kind"]], alpha=0.5)
            for q in ctx["levels"]:
                s_q = r[f"s_{round(q * 100)}"]
                if _finite(s_q) and not r[f"s_{round(q * 100)}_censored"]:
                    ax.plot([s_q], [q], "|", ms=12, color=colour[r["kind"]])
        ax.set_xscale("log", base=2)
        ax.set(title=label[t], xlabel="lift size s", ylabel="P", ylim=(-0.05, 1.05))
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    paths.append(_save(plt, fig, fig_dir / "p_curves.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
