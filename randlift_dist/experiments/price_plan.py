"""The price-of-randomness experiment's configuration and planner: tasks, kinds, cells, and which
cells each (task, kind) pair needs next, from the finished ones (`plan_pairs`).

Schema (`experiment:` section; `EXPERIMENT_KEYS`): `tasks` is a list of `{name, target, train,
sizes}`: `train` is a mapping merged (recursively) into the shared `train:` config (another
teacher, another base network, another data kind...), `target` the success criterion
(`target.py`), `sizes` the task's geometric grid (default `experiment.sizes`). `kinds` as in the
convergence grid, plus an optional `max_size` per kind (the fully-connected lift's parameters grow
as s^2). Cells are shared: tasks with the same resolved training config (a *setup*, named by a
hash of it) share their runs, whatever their targets (two eps levels cost one set of trainings);
a sparse kind whose every base edge keeps all pairs at a size (degree >= the source fibre size)
IS the fully-connected lift there, with the same edges and initial weights, and uses its cells.

A cell: (setup, kind, size, seed, lr, steps); lr and steps are the setup's own for the P(s) seeds
and the search's (`search.lrs`, `search.steps`) for the s_min search. Its id is
`<setup>/<kind>_s<size>_seed<seed>[_lr<lr>][_T<steps>]`; its run directory `<out>/cells/<id>`.
Results carry metrics only; success is decided here, per task, from the result's metric.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from pathlib import Path
from typing import Any

from .adaptive import PENDING, geometric_sizes, p_phase, probe, search_phase
from .convergence import check_section, int_list, kind_tag, parse_kind, resolve_training
from .runner import FORCED, MAX_ARRAY, ExperimentError, fingerprint
from .target import Target, TargetError, check_task, parse_target

EXPERIMENT_KEYS = {
    "name": "experiment name (figure titles, job names); default: the file's stem",
    "out": "output directory (plan, rounds/, cells/, tables, figures/)",
    "tasks": "list of {name, target: {metric, max|min}, train: {overrides of train:}, sizes (optional)}",
    "kinds": "lift kinds: {law: bernoulli|fixed_degree, degree: D, max_size (optional)} or {law: full, max_size}",
    "sizes": "round-0 grid: {min, max, factor} (geometric) or a list of sizes",
    "seeds": "P(s) seeds (lift seed = weight seed): a count n (0..n-1) or a list",
    "levels": "the P levels whose crossings s_q are estimated and refined (default [0.5, 0.9])",
    "refine_rounds": "bisection rounds of the P(s) grid around each level's crossing (default 3)",
    "resolution": "stop bisecting a bracket (lo, hi) once hi / lo <= this (both searches; default 1.25)",
    "search": "s_min search: {seeds: count or list, lrs: [..] (default: train.lr), steps (default 2 x "
              "train.steps), chunk: runs per step of a probe (default: all)}",
    "bootstrap": "intervals of s_q: {samples: 2000, seed: 0, confidence: 0.95}",
    "workers": "cells run at once locally (default 1)",
    "threads_per_worker": "torch / OpenMP threads of each cell (default 1)",
    "max_rounds": "stop after this many rounds (default 40)",
    "cost": "the cost model's assumption: {device: cpu|gpu, startup_s, step_s, param_samples_per_s}",
    "slurm_args": "extra sbatch arguments of every round's array (e.g. ['--gres=gpu:1', '--time=02:00:00'])",
    "max_array": "cells per SLURM job array (a bigger round is several arrays, chained; default 1000)",
    "brute_force": "--brute-force grid: {sizes: list or {min, max, factor}} (default: every integer of the "
                   "grid's range)",
}
COST_DEFAULTS = {"cpu": {"startup_s": 2.0, "step_s": 1.2e-3, "param_samples_per_s": 2e8},
                 "gpu": {"startup_s": 20.0, "step_s": 4e-3, "param_samples_per_s": 3e11}}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _num(key: str, v: Any, lo: float | None = None, integer: bool = False, strict: bool = True) -> Any:
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float)) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if strict else v >= lo
    if not ok:
        what = "an integer" if integer else "a number"
        bound = "" if lo is None else f" {'>' if strict else '>='} {lo}"
        raise ExperimentError(f"{key}={v!r}: expected {what}{bound}")
    return v


def parse_sizes(key: str, v: Any) -> list[int]:
    if isinstance(v, dict):
        unknown = sorted(set(v) - {"min", "max", "factor"})
        if unknown or not {"min", "max"} <= set(v):
            raise ExperimentError(f"{key}={v!r}: write {{min: 2, max: 256, factor: 2}} or a list of sizes")
        lo, hi = _num(f"{key}.min", v["min"], 0, True), _num(f"{key}.max", v["max"], 0, True)
        factor = _num(f"{key}.factor", v.get("factor", 2), 1)
        if hi < lo:
            raise ExperimentError(f"{key}: max {hi} < min {lo}")
        return geometric_sizes(lo, hi, float(factor))
    return sorted(int_list(key.split(".", 1)[1], v, True))


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _sub(section: dict, key: str, allowed: set[str]) -> dict:
    v = section.get(key) or {}
    if not isinstance(v, dict) or set(v) - allowed:
        raise ExperimentError(f"experiment.{key}={v!r}: a mapping with keys {', '.join(sorted(allowed))}")
    return v


def _seeds(key: str, v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        if v <= 0:
            raise ExperimentError(f"{key}={v}: a count must be > 0 (or give a list of seeds)")
        return list(range(v))
    return int_list(key.split(".", 1)[1], v, False)


def parse(section: Any, default_name: str, train: dict, overrides: list[str]) -> dict[str, Any]:
    """The validated experiment (`ctx`): settings, and per task its target and resolved `Config`."""
    check_section(section, EXPERIMENT_KEYS, ("out", "tasks", "kinds", "sizes", "seeds"))
    kinds = section["kinds"]
    if not isinstance(kinds, list) or not kinds:
        raise ExperimentError(f"experiment.kinds={kinds!r}: expected a non-empty list of {{law, degree}}")
    kinds = [{**parse_kind(i, k, ("max_size",)), "max_size": _num(
        f"experiment.kinds[{i}].max_size", 2 ** 62 if k.get("max_size") is None else k["max_size"], 0, True)}
        for i, k in enumerate(kinds)]
    if len({kind_tag(k) for k in kinds}) != len(kinds):
        raise ExperimentError(f"experiment.kinds: {[kind_tag(k) for k in kinds]} has duplicates")
    levels = section.get("levels", [0.5, 0.9])
    if not isinstance(levels, list) or not levels or any(
            isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1 for q in levels):
        raise ExperimentError(f"experiment.levels={levels!r}: a list of numbers strictly between 0 and 1")
    search = _sub(section, "search", {"seeds", "lrs", "steps", "chunk"})
    boot = _sub(section, "bootstrap", {"samples", "seed", "confidence"})
    cost = _sub(section, "cost", {"device", "startup_s", "step_s", "param_samples_per_s"})
    device = cost.get("device", "cpu")
    if device not in COST_DEFAULTS:
        raise ExperimentError(f"experiment.cost.device={device!r}: choose cpu or gpu")
    cost = {"device": device, **{k: float(_num(f"experiment.cost.{k}", cost.get(k, d), 0, strict=k != "startup_s"))
                                  for k, d in COST_DEFAULTS[device].items()}}
    slurm_args = section.get("slurm_args") or []
    if not isinstance(slurm_args, list) or not all(isinstance(a, str) for a in slurm_args):
        raise ExperimentError(f"experiment.slurm_args={slurm_args!r}: a list of strings")
    ctx: dict[str, Any] = {
        "name": section.get("name") or default_name, "out": str(Path(section["out"]).resolve()), "kinds": kinds,
        "sizes": parse_sizes("experiment.sizes", section["sizes"]),
        "seeds": _seeds("experiment.seeds", section["seeds"]),
        "levels": sorted(float(q) for q in levels),
        "refine_rounds": _num("experiment.refine_rounds", section.get("refine_rounds", 3), 0, True, strict=False),
        "resolution": float(_num("experiment.resolution", section.get("resolution", 1.25), 1)),
        "search": {"seeds": _seeds("experiment.search.seeds", search.get("seeds", 8)), "lrs": search.get("lrs"),
                   "steps": search.get("steps"), "chunk": search.get("chunk")},
        "bootstrap": {"samples": _num("experiment.bootstrap.samples", boot.get("samples", 2000), 0, True),
                      "seed": _num("experiment.bootstrap.seed", boot.get("seed", 0), 0, True, strict=False),
                      "confidence": float(_num("experiment.bootstrap.confidence", boot.get("confidence", 0.95), 0))},
        "workers": _num("experiment.workers", section.get("workers", 1), 0, True),
        "threads_per_worker": _num("experiment.threads_per_worker", section.get("threads_per_worker", 1), 0, True),
        "max_rounds": _num("experiment.max_rounds", section.get("max_rounds", 40), 0, True),
        "cost": cost, "slurm_args": slurm_args,
        "max_array": _num("experiment.max_array", section.get("max_array", MAX_ARRAY), 0, True), "brute_force": _sub(section, "brute_force", {"sizes"})}
    if not ctx["bootstrap"]["confidence"] < 1:
        raise ExperimentError(f"experiment.bootstrap.confidence={ctx['bootstrap']['confidence']}: must be in (0, 1)")
    chunk = ctx["search"]["chunk"]
    if chunk is not None:
        _num("experiment.search.chunk", chunk, 0, True)
    ctx["tasks"] = _tasks(section["tasks"], ctx, train, overrides)
    return ctx


def _tasks(tasks: Any, ctx: dict[str, Any], train: dict, overrides: list[str]) -> list[dict[str, Any]]:
    from ..config import dump_config

    if not isinstance(tasks, list) or not tasks:
        raise ExperimentError(f"experiment.tasks={tasks!r}: a non-empty list of {{name, target, train}}")
    out, names = [], set()
    for i, t in enumerate(tasks):
        key = f"experiment.tasks[{i}]"
        if not isinstance(t, dict) or set(t) - {"name", "target", "train", "sizes"} or "name" not in t:
            raise ExperimentError(f"{key}={t!r}: a mapping {{name, target, train, sizes}} (name and target required)")
        name = t["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in names:
            raise ExperimentError(f"{key}.name={name!r}: a unique name of letters, digits, '.', '_', '-'")
        names.add(name)
        try:
            target = parse_target(t.get("target"), f"{key}.target")
        except TargetError as err:
            raise ExperimentError(str(err)) from None
        extra = t.get("train") or {}
        if not isinstance(extra, dict):
            raise ExperimentError(f"{key}.train={extra!r}: a mapping of training settings (merged into train:)")
        cfg = resolve_training(_merge(train, extra), overrides, None, f"{key}.train")
        _packages(cfg, f"{key}.train")
        try:
            check_task(target, cfg.train.loss, f"{key}.target")
        except TargetError as err:
            raise ExperimentError(str(err)) from None
        train_yaml = dump_config(cfg)
        search = ctx["search"]
        lrs = search["lrs"] if search["lrs"] is not None else [cfg.train.lr]
        if not isinstance(lrs, list) or not lrs or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                       or not x > 0 for x in lrs):
            raise ExperimentError(f"experiment.search.lrs={lrs!r}: a non-empty list of learning rates > 0")
        steps = search["steps"] if search["steps"] is not None else 2 * cfg.train.steps
        _num("experiment.search.steps", steps, 0, True)
        out.append({"name": name, "target": target, "cfg": cfg, "train_yaml": train_yaml,
                    "setup": hashlib.sha256(train_yaml.encode()).hexdigest()[:10],
                    "grid": parse_sizes(f"{key}.sizes", t["sizes"]) if "sizes" in t else ctx["sizes"],
                    "lr": cfg.train.lr, "steps": cfg.train.steps, "batch": cfg.train.batch_size,
                    "search_lrs": [float(x) for x in lrs], "search_steps": int(steps)})
    return out


def _packages(cfg, key: str) -> None:
    """Data kinds that ship with packages: refuse now, not in every cell, when one is missing."""
    import importlib.util

    package = {"digits": "sklearn", "mnist1d": "mnist1d"}.get(cfg.data.kind)
    if package and importlib.util.find_spec(package) is None:
        name = "scikit-learn" if package == "sklearn" else package
        raise ExperimentError(f"{key}: data.kind={cfg.data.kind} needs the {name} package: "
                              f"pip install -e '.[data]' (or pip install {name})")


# ---------------------------------------------------------------- cells
_FULL_AT: dict[tuple, bool] = {}


def is_full_at(task: dict[str, Any], kind: dict[str, Any], size: int) -> bool:
    """Whether the sparse `kind` keeps every pair of adjacent fibres at `size` (then it is the
    fully-connected lift: same edges, same expected fan-in, so the same initial weights)."""
    if kind["law"] == "full":
        return True
    key = (task["setup"], kind_tag(kind), size)
    if key not in _FULL_AT:
        from ..graph import BaseGraph
        from ..lift import random_sparse_lift

        base = BaseGraph.from_dict(task["cfg"].model.base)
        lift = random_sparse_lift(base, size, kind["degree"], 0, kind["law"], task["cfg"].model.lift.block_size)
        _FULL_AT[key] = all(lift.in_degree_of(e) == lift.n(e.src) and lift.prob(e) >= 1.0 for e in base.edges)
    return _FULL_AT[key]


def make_cell(ctx: dict[str, Any], task: dict[str, Any], kind: dict[str, Any], size: int, seed: int,
              lr: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """The cell of one run (`lr` / `steps` None or equal to the setup's: the setup's own)."""
    if is_full_at(task, kind, size):
        kind = {"law": "full", "degree": None}
    lr = None if lr is None or lr == task["lr"] else float(lr)
    steps = None if steps is None or steps == task["steps"] else int(steps)
    cid = (f"{task['setup']}/{kind_tag(kind)}_s{size}_seed{seed}" + ("" if lr is None else f"_lr{lr:g}")
           + ("" if steps is None else f"_T{steps}"))
    out = Path(ctx["out"])
    argv = ["--config", str(out / "setups" / f"{task['setup']}.yaml"), f"model.lift.law={kind['law']}",
            f"model.lift.size={size}", f"model.lift.seed={seed}", f"model.weight_seed={seed}"]
    if kind["degree"] is not None:
        argv.append(f"model.lift.degree={kind['degree']}")
    if lr is not None:
        argv.append(f"train.lr={lr!r}")
    if steps is not None:
        argv.append(f"train.steps={steps}")
    argv += FORCED + [f"run.dir={out / 'cells' / cid}", f"run.name={ctx['name']}-{cid.replace('/', '-')}"]
    return {"id": cid, "setup": task["setup"], "kind": kind_tag(kind), "law": kind["law"], "degree": kind["degree"],
            "size": size, "seed": seed, "lr": lr if lr is not None else task["lr"],
            "steps": steps if steps is not None else task["steps"], "batch": task["batch"], "argv": argv,
            "fingerprint": fingerprint(task["train_yaml"], argv, None), "target": None, "extras": False}


# ---------------------------------------------------------------- the planner
def finished(results: dict[str, dict], cell: dict[str, Any]) -> dict | None:
    """The cell's result, if it finished with the cell's current fingerprint."""
    r = results.get(cell["id"])
    return r if r is not None and r.get("fingerprint") == cell["fingerprint"] else None


def outcome(task: dict[str, Any], results: dict[str, dict], cell: dict[str, Any]) -> bool | None:
    """Whether the cell's run reached the task's target (None: not finished)."""
    r = finished(results, cell)
    return None if r is None else task["target"].met(r.get(task["target"].metric))


def plan_pair(ctx: dict[str, Any], task: dict[str, Any], kind: dict[str, Any],
              results: dict[str, dict]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`(state, cells needed next)` of one (task, kind): the replayed P(s) refinement and s_min search."""
    grid = [s for s in task["grid"] if s <= kind["max_size"]]
    if not grid:
        raise ExperimentError(f"task {task['name']}, kind {kind_tag(kind)}: no size of the grid is <= its "
                              f"max_size {kind['max_size']}")
    p_cells = {}

    def pc(s):
        if s not in p_cells:
            p_cells[s] = [make_cell(ctx, task, kind, s, seed) for seed in ctx["seeds"]]
        return p_cells[s]

    def outs(cells):
        return [outcome(task, results, c) for c in cells]

    sizes, missing = p_phase(grid, lambda s: outs(pc(s)), ctx["levels"], ctx["refine_rounds"], ctx["resolution"])
    need = [c for s in missing for c in pc(s) if finished(results, c) is None]
    s_cells = {}

    def sc(s):
        if s not in s_cells:
            s_cells[s] = [make_cell(ctx, task, kind, s, seed, lr, task["search_steps"])
                          for seed in ctx["search"]["seeds"] for lr in task["search_lrs"]]
        return s_cells[s]

    chunk = ctx["search"]["chunk"] or len(ctx["search"]["seeds"]) * len(task["search_lrs"])

    def grid_any(s):
        o = outs(pc(s))
        return None if any(v is None for v in o) else any(o)

    def probe_at(s):
        return probe(outs(sc(s)), outs(pc(s)) if s in grid else [], chunk)

    search = search_phase(grid, grid_any, probe_at, ctx["resolution"])
    if search["status"] == PENDING and search["need"] is not None:
        _, idx = probe_at(search["need"])
        need += [sc(search["need"])[i] for i in idx]
    counts = {s: [v for v in outs(pc(s)) if v is not None] for s in sizes}
    curve = [s for s in sizes if counts[s]]  # sizes with finished P seeds
    witnesses = sorted({s for s in curve if any(counts[s])}
                       | {s for s, status in search["probes"] if status == "success"})
    runs = {c["id"] for s in sizes for c in pc(s) if finished(results, c)}
    runs |= {c["id"] for s, _ in search["probes"] for c in sc(s) if finished(results, c)}
    state = {"task": task["name"], "kind": kind_tag(kind), "degree": kind["degree"], "grid": grid, "sizes": curve,
             "k": [sum(counts[s]) for s in curve], "n": [len(counts[s]) for s in curve],
             "done": not need and search["status"] != PENDING, "search": search, "witnesses": witnesses,
             "runs": sorted(runs)}
    return state, need


def plan_pairs(ctx: dict[str, Any], results: dict[str, dict]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every pair's state and the union of the cells they need next (each once, in plan order)."""
    states, need, seen = [], [], set()
    for task in ctx["tasks"]:
        for kind in ctx["kinds"]:
            state, cells = plan_pair(ctx, task, kind, results)
            states.append(state)
            for c in cells:
                if c["id"] not in seen:
                    seen.add(c["id"])
                    need.append(c)
    return states, need


def target_of(ctx: dict[str, Any], name: str) -> Target:
    return next(t["target"] for t in ctx["tasks"] if t["name"] == name)
