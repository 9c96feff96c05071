"""The price of randomness, reported: tables and figures from the pairs' states (`report`), and the
brute-force comparison (`compare`).

Files under `out` (every figure is drawn from the rows written to the tables, in the same call):
- `price.csv` / `price.md`: one row per (task, kind): the target, `s_min` (and the bracket
  `(s_min_lo, s_min]` the search established), `s_min_task` (the smallest over the task's kinds),
  `s_50`, `s_90` with their bootstrap intervals, censoring and bracket (`s_q_bracket_lo/hi`: the
  measured sizes around the crossing; the bootstrap interval holds the seeds' noise, not the
  grid's resolution, and is a single point when every size is 0/n or n/n), the ratio
  `s_90 / s_min` with the interval `[s_90_lo, s_90_hi] / s_min` (s_min taken as fixed), and
  `s_90 / s_min_task`;
- `p_curve.csv`: per pair and size: seeds, successes, raw P, the isotonic fit, Wilson 95% bounds;
- `search.csv`: the s_min search's probes (size, outcome) in the order they were decided;
- `figures/s90_vs_smin.png` (log-log, one point per task x kind with the s_90 interval),
  `figures/ratio_vs_degree.png` (the ratio against the degree, the full lift at the right),
  `figures/p_collapse.png` (P against s / s_min: do the curves collapse?), `figures/p_curves.png`
  (P against s, one panel per task, s_50 and s_90 marked). Axes and legends name each task's target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .adaptive import bootstrap, estimate
from .convergence import kind_tag
from .figures import wilson, write_csv
from .price_figures import plot
from .price_plan import make_cell, outcome, parse_sizes, target_of

def price_columns(levels: list[float]) -> list[str]:
    per_level = [f"s_{round(q * 100)}{x}" for q in levels
                 for x in ("", "_lo", "_hi", "_censored", "_bracket_lo", "_bracket_hi")]
    return (["task", "kind", "degree", "metric", "target", "seeds", "sizes", "s_min", "s_min_lo", "s_min_note",
             "s_min_task"] + per_level + ["ratio", "ratio_lo", "ratio_hi", "ratio_task", "runs", "complete"])
CURVE_COLUMNS = ["task", "kind", "size", "n", "k", "p", "p_fit", "wilson_lo", "wilson_hi", "s_over_s_min"]
SEARCH_COLUMNS = ["task", "kind", "order", "size", "outcome"]


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b:
        return math.nan
    return a / b


def pair_row(ctx: dict[str, Any], state: dict[str, Any], target) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One pair's `price.csv` row (without `s_min_task`) and its `p_curve.csv` rows."""
    sizes, k, n = state["sizes"], state["k"], state["n"]
    b = ctx["bootstrap"]
    if sizes:
        est = estimate(sizes, k, n, ctx["levels"])
        ci = bootstrap(sizes, k, n, ctx["levels"], b["samples"], b["seed"], b["confidence"])
    else:  # nothing finished yet
        est = {"fit": [], **{q: {"s": None, "censored": None} for q in ctx["levels"]}}
        ci = {q: (None, None) for q in ctx["levels"]}
    search = state["search"]
    s_min = state["witnesses"][0] if state["witnesses"] else None
    note = ""
    if not state["done"]:
        note = "incomplete: the search has not finished"
    elif s_min is None:
        note = f"above: no run reached the target up to s = {max(state['grid'] + sizes)}"
    elif search["lo"] is None and s_min <= state["grid"][0]:
        note = f"below: reached at the smallest size {state['grid'][0]}"
    elif search["lo"] is not None and s_min <= search["lo"]:
        note = f"non-monotone: a run at s = {s_min} reached it below the search's failing size {search['lo']}"
    row = {"task": state["task"], "kind": state["kind"], "degree": state["degree"] if state["degree"] else "full",
           "metric": target.metric, "target": target.label, "seeds": max(n, default=0), "sizes": len(sizes),
           "s_min": s_min, "s_min_lo": search["lo"], "s_min_note": note, "runs": len(state["runs"]),
           "complete": state["done"]}
    for q in ctx["levels"]:
        tag = f"s_{round(q * 100)}"
        row[tag] = est[q]["s"]
        row[f"{tag}_lo"], row[f"{tag}_hi"] = ci[q]
        row[f"{tag}_censored"] = est[q]["censored"] or ""
        row[f"{tag}_bracket_lo"], row[f"{tag}_bracket_hi"] = est[q].get("lo"), est[q].get("hi")
    top = f"s_{round(max(ctx['levels']) * 100)}"
    row["ratio"] = _ratio(row[top], s_min)
    row["ratio_lo"], row["ratio_hi"] = _ratio(row[f"{top}_lo"], s_min), _ratio(row[f"{top}_hi"], s_min)
    curve = []
    for s, ki, ni, f in zip(sizes, k, n, est["fit"]):
        p, lo, hi = wilson(ki, ni)
        curve.append({"task": state["task"], "kind": state["kind"], "size": s, "n": ni, "k": ki, "p": p, "p_fit": f,
                      "wilson_lo": lo, "wilson_hi": hi, "s_over_s_min": _ratio(s, s_min)})
    return row, curve


def tables(ctx: dict[str, Any], states: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    price, curves, probes = [], [], []
    for st in states:
        row, curve = pair_row(ctx, st, target_of(ctx, st["task"]))
        price.append(row)
        curves += curve
        probes += [{"task": st["task"], "kind": st["kind"], "order": i, "size": s, "outcome": o}
                   for i, (s, o) in enumerate(st["search"]["probes"])]
    top = f"s_{round(max(ctx['levels']) * 100)}"
    for row in price:
        mins = [r["s_min"] for r in price if r["task"] == row["task"] and r["s_min"] is not None]
        row["s_min_task"] = min(mins) if mins else None
        row["ratio_task"] = _ratio(row[top], row["s_min_task"])
    return {"price": price, "curves": curves, "probes": probes}


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.3g}"
    return str(x)


def markdown(ctx: dict[str, Any], price: list[dict[str, Any]]) -> str:
    """`price.md`: the README's table (every level's s_q with its bootstrap interval, and its
    censoring or, in parentheses, the measured sizes around the crossing)."""
    qs = [round(q * 100) for q in ctx["levels"]]
    top = max(qs)
    lines = ["| task | target | kind | s_min | " + " | ".join(f"s_{q} [CI]" for q in qs)
             + f" | s_{top} / s_min [CI] | s_{top} / s_min_task |",
             "|---|---|---|---:|" + "---|" * len(qs) + "---|---:|"]
    for r in price:
        note = f" ({r['s_min_note'].split(':')[0]})" if r["s_min_note"] else ""
        cells = [f"{_fmt(r[f's_{q}'])} [{_fmt(r[f's_{q}_lo'])}, {_fmt(r[f's_{q}_hi'])}]"
                 + (f" ({r[f's_{q}_censored']})" if r[f"s_{q}_censored"] else
                    f" ({r[f's_{q}_bracket_lo']}-{r[f's_{q}_bracket_hi']})" if r[f"s_{q}_bracket_lo"] else "")
                 for q in qs]
        lines.append(f"| {r['task']} | `{r['target']}` | {r['kind']} | {_fmt(r['s_min'])}{note} | " + " | ".join(cells)
                     + f" | {_fmt(r['ratio'])} [{_fmt(r['ratio_lo'])}, {_fmt(r['ratio_hi'])}] | "
                       f"{_fmt(r['ratio_task'])} |")
    return "\n".join(lines) + "\n"


def report(ctx: dict[str, Any], states: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the tables and figures of the pairs' current states; returns the tables and figure paths."""
    out = Path(ctx["out"])
    out.mkdir(parents=True, exist_ok=True)
    t = tables(ctx, states)
    write_csv(out / "price.csv", t["price"], price_columns(ctx["levels"]))
    write_csv(out / "p_curve.csv", t["curves"], CURVE_COLUMNS)
    write_csv(out / "search.csv", t["probes"], SEARCH_COLUMNS)
    (out / "price.md").write_text(markdown(ctx, t["price"]))
    t["figures"] = plot(ctx, t["price"], t["curves"], out / "figures")
    return t


# ---------------------------------------------------------------- brute force
def brute_sizes(ctx: dict[str, Any], task: dict[str, Any]) -> list[int]:
    spec = ctx["brute_force"].get("sizes")
    if spec is None:
        return list(range(min(task["grid"]), max(task["grid"]) + 1))
    return parse_sizes("experiment.brute_force.sizes", spec)


def brute_cells(ctx: dict[str, Any], task: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of the dense grid: at every size, the P seeds and every search run."""
    cells, seen = [], set()
    for kind in ctx["kinds"]:
        for s in brute_sizes(ctx, task):
            if s > kind["max_size"]:
                continue
            runs = [make_cell(ctx, task, kind, s, seed) for seed in ctx["seeds"]]
            runs += [make_cell(ctx, task, kind, s, seed, lr, task["search_steps"])
                     for seed in ctx["search"]["seeds"] for lr in task["search_lrs"]]
            for c in runs:
                if c["id"] not in seen:
                    seen.add(c["id"])
                    cells.append(c)
    return cells


def compare(ctx: dict[str, Any], task: dict[str, Any], states: list[dict[str, Any]],
            results: dict[str, dict]) -> list[dict[str, Any]]:
    """Per kind: the adaptive s_min, s_q (with intervals) against the dense grid's: its s_min is the
    smallest size where any run succeeded (no monotonicity assumed), its s_q the crossings of the
    dense P(s). `agree_s_min`: equal, or the brute one inside the adaptive bracket `(s_min_lo,
    s_min]` when the adaptive search stopped at its resolution; `s_q_in_ci`: the dense estimate lies
    in the adaptive bootstrap interval widened to the adaptive bracket of the crossing (the sizes
    measured on either side of it: the grid's resolution, which the seeds' bootstrap does not see)."""
    rows = []
    sizes = brute_sizes(ctx, task)
    for kind in ctx["kinds"]:
        st = next(s for s in states if s["task"] == task["name"] and s["kind"] == kind_tag(kind))
        adaptive, _ = pair_row(ctx, st, task["target"])
        ks = [s for s in sizes if s <= kind["max_size"]]
        p_outs = {s: [outcome(task, results, make_cell(ctx, task, kind, s, seed)) for seed in ctx["seeds"]] for s in ks}
        any_ok = [s for s in ks if any(p_outs[s]) or any(
            outcome(task, results, make_cell(ctx, task, kind, s, seed, lr, task["search_steps"]))
            for seed in ctx["search"]["seeds"] for lr in task["search_lrs"])]
        est = estimate(ks, [sum(bool(v) for v in p_outs[s]) for s in ks], [len(p_outs[s]) for s in ks], ctx["levels"])
        lo = adaptive["s_min_lo"]
        b_min = any_ok[0] if any_ok else None
        row = {"task": task["name"], "kind": kind_tag(kind), "target": task["target"].label, "brute_sizes": len(ks),
               "s_min": adaptive["s_min"], "s_min_lo": lo, "brute_s_min": b_min,
               "agree_s_min": b_min == adaptive["s_min"] or (b_min is not None and adaptive["s_min"] is not None
                                                              and (lo or 0) < b_min <= adaptive["s_min"])}
        for q in ctx["levels"]:
            tag = f"s_{round(q * 100)}"
            row.update({tag: adaptive[tag], f"{tag}_lo": adaptive[f"{tag}_lo"], f"{tag}_hi": adaptive[f"{tag}_hi"],
                        f"brute_{tag}": est[q]["s"],
                        f"{tag}_in_ci": _lo(adaptive, tag) <= est[q]["s"] <= _hi(adaptive, tag)})
        rows.append(row)
    return rows


def _lo(row: dict[str, Any], tag: str) -> float:
    """Lower end of the CI widened to the bracket (0 when the crossing is below the smallest size)."""
    if row[f"{tag}_censored"] == "below":
        return 0.0
    b = row[f"{tag}_bracket_lo"]
    return row[f"{tag}_lo"] if b is None else min(row[f"{tag}_lo"], b)


def _hi(row: dict[str, Any], tag: str) -> float:
    """Upper end of the CI widened to the bracket (inf when the crossing is above the largest size)."""
    if row[f"{tag}_censored"] == "above":
        return math.inf
    b = row[f"{tag}_bracket_hi"]
    return row[f"{tag}_hi"] if b is None else max(row[f"{tag}_hi"], b)
