"""Cost of experiment cells before they run: `describe(ctx, cells, results)` is the line the
price-of-randomness command prints before each round (and before it submits one).

The model (`experiment.cost`, stated in the printed line): a cell costs
`startup_s + steps x (step_s + params x batch / param_samples_per_s)` seconds of one worker
(`threads_per_worker` cores, or one GPU with `cost.device: gpu`), where `params` is the lift's
expected parameter count (edges x d_v x d_u + biases + readout, from the lift law, nothing sampled:
the estimator's count). `startup_s` is the process (imports, the CUDA context), trainer set-up and
analysis; `step_s` a step's fixed cost (kernel launches, Python), the last term the arithmetic.
The defaults are assumptions. CPU (2 s, 1.5 ms, 2e8): the model gives 1089 worker-seconds for
the convergence grid's 288 cells (sizes 2 to 64, 1000 steps), which took 1358 on the idle 2-core
machine (11 min 19 s with 2 workers) with the distance / proxy analysis and offline wandb that
the price-of-randomness cells skip. GPU (20 s, 4 ms, 3e11): never measured.
Calibration: with at least `MIN_MEASURED` finished cells of this experiment, the model's times
are also scaled by the median of (startup_s + measured wall_s) / predicted over them, and both
numbers are printed (measured on the machine that ran them, at its load).

`bound(ctx)` is the cost of the most cells the experiment can ask for: every grid size, every
refinement round of every level, and every search probe running all its runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

MIN_MEASURED = 8


def expected_params(task: dict[str, Any], law: str, degree: float | None, size: int) -> float:
    """The lift's expected parameter count (as `estimate.estimate` counts it)."""
    from ..graph import BaseGraph
    from ..lift import fully_connected_lift, random_sparse_lift

    cfg = task["cfg"]
    base = BaseGraph.from_dict(cfg.model.base)
    bs = cfg.model.lift.block_size
    lift = fully_connected_lift(base, size, bs) if law == "full" else random_sparse_lift(base, size, degree, 0, law, bs)
    out_dim = cfg.out_dim(base)
    params = sum(lift.expected_edges(e) * base.dim(e.dst) * base.dim(e.src) for e in base.edges)
    params += sum(lift.n(v) * base.dim(v) for v in base.vertices if base.vertices[v].bias)
    return params + sum(lift.n(t) * out_dim * base.dim(t) for t in base.outputs)


def _task(ctx: dict[str, Any], setup: str) -> dict[str, Any]:
    return next(t for t in ctx["tasks"] if t["setup"] == setup)


def predict(ctx: dict[str, Any], cell: dict[str, Any]) -> float:
    """Seconds of one worker for `cell`, by the model."""
    c = ctx["cost"]
    params = expected_params(_task(ctx, cell["setup"]), cell["law"], cell["degree"], cell["size"])
    return c["startup_s"] + cell["steps"] * (c["step_s"] + params * cell["batch"] / c["param_samples_per_s"])


def calibration(ctx: dict[str, Any], results: dict[str, dict]) -> tuple[float, int]:
    """`(median measured / predicted, number of cells)` over this experiment's finished cells."""
    setups = {t["setup"] for t in ctx["tasks"]}
    ratios = []
    for r in results.values():
        if r.get("setup") in setups and isinstance(r.get("wall_s"), (int, float)) and "batch" in r:
            ratios.append((ctx["cost"]["startup_s"] + r["wall_s"]) / predict(ctx, r))
    return (statistics.median(ratios), len(ratios)) if len(ratios) >= MIN_MEASURED else (math.nan, len(ratios))


def bound(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Pseudo-cells (setup, law, degree, size, steps, batch) of the most the experiment can run."""
    from .price_plan import is_full_at

    cells, seen = [], set()
    for task in ctx["tasks"]:
        for kind in ctx["kinds"]:
            grid = [s for s in task["grid"] if s <= kind["max_size"]]
            widest = max([b / a for a, b in zip(grid, grid[1:])], default=1.0)
            halvings = math.ceil(math.log2(math.log(widest) / math.log(ctx["resolution"]))) \
                if widest > ctx["resolution"] else 0
            refine = min(ctx["refine_rounds"], halvings) * len(ctx["levels"])
            probes = len(grid) + halvings
            runs = len(ctx["search"]["seeds"]) * len(task["search_lrs"])
            # P seeds on the grid and the refinements (at the largest grid size: an upper bound)
            plan = [(s, len(ctx["seeds"]), task["steps"]) for s in grid] + [(grid[-1], len(ctx["seeds"]) * refine,
                                                                              task["steps"])]
            plan += [(s, runs, task["search_steps"]) for s in grid]
            plan += [(grid[-1], runs * (probes - len(grid)), task["search_steps"])]  # bisection sizes are smaller
            for size, count, steps in plan:
                k = {"law": "full", "degree": None} if is_full_at(task, kind, size) else kind
                key = (task["setup"], k["law"], k["degree"], size, steps, count)
                if count and key not in seen:
                    seen.add(key)
                    cells += [{"setup": task["setup"], "law": k["law"], "degree": k["degree"], "size": size,
                               "steps": steps, "batch": task["batch"]}] * count
    return cells


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g}"


def largest(ctx: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """The largest cell's parameters and its memory by the estimator (`estimate.estimate`)."""
    from ..config import ConfigError, load_config
    from ..estimate import EstimateError, estimate

    big = max(cells, key=lambda c: expected_params(_task(ctx, c["setup"]), c["law"], c["degree"], c["size"]))
    n = expected_params(_task(ctx, big["setup"]), big["law"], big["degree"], big["size"])
    device = "cuda" if ctx["cost"]["device"] == "gpu" else "cpu"
    try:
        cfg = load_config(big["argv"][1], [a for a in big["argv"][2:] if not a.startswith("run.")])
        gib = estimate(cfg, 1, device)["peak_bytes_per_rank"] / 2 ** 30
    except (ConfigError, EstimateError, OSError) as err:
        return f"largest cell {big['id']} ({n:.3g} parameters; no memory estimate: {err})"
    return f"largest cell {big['id']} ({n:.3g} parameters, {gib:.2f} GiB per {device} process by the estimator)"


def describe(ctx: dict[str, Any], cells: list[dict[str, Any]], results: dict[str, dict]) -> str:
    """One line: the cells' estimated cost (and wall time with the configured workers), the
    calibrated figure when measured cells exist, the bound of the whole experiment, the largest
    cell's memory, the model."""
    c = ctx["cost"]
    unit = "GPU-hours" if c["device"] == "gpu" else "core-hours"
    per_worker = 1 if c["device"] == "gpu" else ctx["threads_per_worker"]
    total = sum(predict(ctx, cell) for cell in cells)
    most = sum(predict(ctx, cell) for cell in bound(ctx))
    scale, n = calibration(ctx, results)
    parts = [f"estimated {_hours(total * per_worker)} {unit} ({_hours(total / ctx['workers'])} h with "
             f"{ctx['workers']} workers)"]
    if math.isfinite(scale):
        parts.append(f"{_hours(total * per_worker * scale)} {unit} scaled by the {n} measured cells "
                     f"(median measured / model {scale:.2f})")
    parts.append(f"whole experiment at most {_hours(most * per_worker)} {unit} by the model")
    if cells:
        parts.append(largest(ctx, cells))
    parts.append(f"model: {c['startup_s']:g} s + steps x ({c['step_s']:g} s + params x batch / "
                 f"{c['param_samples_per_s']:.3g}) per cell on one {'GPU' if c['device'] == 'gpu' else 'worker'}")
    return "; ".join(parts)
