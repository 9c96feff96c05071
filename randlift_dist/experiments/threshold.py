"""The price of randomness: how much bigger than the smallest witness a random sparse lift must be.

    python -m randlift_dist.experiments.threshold --config configs/price_cpu.yaml [key=value ...]
        [--slurm [--submit [--drive]]] [--aggregate] [--brute-force TASK]

For every task (a training setup and a target, `price_plan.py`) and lift kind: `P(s)` on a
geometric grid of sizes refined by bisection on log s around the 0.5 and 0.9 crossings, `s_50`,
`s_90` with bootstrap intervals over seeds, the empirical witness size `s_min` (a search with more
seeds, a learning-rate grid and a longer budget), and the ratio `s_90 / s_min` (`adaptive.py` has
the definitions). Tables and figures: `price_report.py`, `price_figures.py`.

Rounds. The experiment is adaptive: which cells run next depends on the finished ones. Every
call replays every pair's searches from the finished cells (`price_plan.plan_pairs`) and runs
the cells they need now as one round, `<out>/rounds/<r>/plan.json`, through the convergence
machinery (`runner.py`: one trainer process per cell, world size 1, torch engine, `result.json`
per cell, `workers` processes at once). Locally, rounds follow one another until no pair needs a
cell (or `max_rounds`). Resumable: a finished cell is never rerun, and a round interrupted half
way is completed by the next call before any new round is planned, so the sequence of rounds does
not depend on when a run stopped (a round planned with other settings is not resumed: the replay
plans afresh). SLURM: one job array per round (`--slurm` prints the round's `slurm/sweep.sbatch`
command, `--submit` submits it; run the command again when it is done for the next round, or
`--drive` waits for each array with `sbatch --wait` and submits the next until the experiment is
complete). Before each round the command prints its estimated cost (`cost.py`) and a bound for
the whole experiment.

`--brute-force TASK` runs, after the adaptive experiment, a dense grid for one task (every size
of `experiment.brute_force.sizes`, default every integer of the grid's range; all P seeds and all
search runs at every size) and writes `brute_force_<TASK>.csv`: its s_min and s_q against the
adaptive ones (`price_report.compare`). `--aggregate` writes the tables and figures of what has
finished and runs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .convergence import read_experiment
from .cost import describe as describe_cost
from .price_plan import parse, plan_pairs
from .figures import write_csv
from .price_report import brute_cells, compare, report
from .runner import (EXIT_CONFIG, REPO, ExperimentError, atomic_write, is_done, run_local, slurm_commands, submit,
                     write_plan)

PROG = "python -m randlift_dist.experiments.threshold"
# The settings that decide which cells the rounds run (a round planned with others is not resumed).
PLANNING = ("out", "tasks", "kinds", "sizes", "seeds", "levels", "refine_rounds", "resolution", "search")


def load_results(out: Path) -> dict[str, dict]:
    """Every finished cell's result under `out/cells`, by id (fingerprints are checked by the planner)."""
    results = {}
    for path in sorted((out / "cells").glob("*/*/result.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        results[r.get("id", f"{path.parent.parent.name}/{path.parent.name}")] = r
    return results


def write_setups(ctx: dict[str, Any]) -> str:
    """Write the setups' training configs and `experiment.json`; returns the hash of the settings
    that plan rounds (`PLANNING`)."""
    out = Path(ctx["out"])
    (out / "setups").mkdir(parents=True, exist_ok=True)
    for t in ctx["tasks"]:
        atomic_write(out / "setups" / f"{t['setup']}.yaml", t["train_yaml"])
    summary = {k: v for k, v in ctx.items() if k != "tasks"}
    summary["tasks"] = [{"name": t["name"], "target": t["target"].to_dict(), "setup": t["setup"], "grid": t["grid"],
                         "search_lrs": t["search_lrs"], "search_steps": t["search_steps"]} for t in ctx["tasks"]]
    atomic_write(out / "experiment.json", json.dumps(summary, indent=1))
    planning = {k: summary[k] for k in PLANNING}  # not workers, cost, bootstrap...: they plan nothing
    return hashlib.sha256(json.dumps(planning, sort_keys=True).encode()).hexdigest()[:16]


def unfinished_round(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The last numbered round, if it was planned by this experiment (same settings) and some of
    its cells are not done: it is completed before any new round is planned, so the sequence of
    rounds does not depend on when a run was interrupted."""
    rounds = sorted(p for p in (Path(ctx["out"]) / "rounds").glob("[0-9]*") if (p / "plan.json").is_file())
    if not rounds:
        return None
    plan = json.loads((rounds[-1] / "plan.json").read_text())
    if plan.get("experiment_hash") != ctx["hash"] or all(is_done(plan, c) for c in plan["cells"]):
        return None
    return plan


def round_plan(ctx: dict[str, Any], cells: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """Write the plan of a new round running `cells` (`rounds/<next number>`, or `rounds/<name>`:
    kept when it already holds these cells with the same settings)."""
    rounds = Path(ctx["out"]) / "rounds"
    rounds.mkdir(parents=True, exist_ok=True)
    if name is None:
        name = f"{len([p for p in rounds.glob('[0-9]*') if (p / 'plan.json').is_file()]):03d}"
    pdir = rounds / name
    if (pdir / "plan.json").is_file():
        old = json.loads((pdir / "plan.json").read_text())
        if old.get("experiment_hash") == ctx["hash"] and old["cells"] == cells:
            return old
    plan = {"experiment": {k: ctx[k] for k in ("name", "workers", "threads_per_worker")}, "out": ctx["out"],
            "plan_dir": str(pdir), "round": name, "experiment_hash": ctx["hash"], "cells": cells}
    write_plan(plan)
    return plan


def _slurm(ctx: dict[str, Any], plan: dict[str, Any], submit_it: bool, wait: bool) -> int:
    cmds = slurm_commands(plan, REPO, ctx["slurm_args"], ctx["max_array"])
    print("\n".join(" ".join(cmd) for cmd in cmds))
    if len(cmds) > 1:
        print(f"threshold: {len(cmds)} arrays of at most {ctx['max_array']} cells (experiment.max_array); "
              "--submit chains them (--dependency=afterany)", file=sys.stderr)
    return submit(cmds, wait) if submit_it else 0


def run(ctx: dict[str, Any], args: argparse.Namespace) -> int:
    out = Path(ctx["out"])
    ctx["hash"] = write_setups(ctx)
    results = load_results(out)
    while True:
        states, need = plan_pairs(ctx, results)
        plan = unfinished_round(ctx)
        if (plan is None and not need) or args.aggregate:
            break
        if plan is None:
            if len(list((out / "rounds").glob("[0-9]*"))) >= ctx["max_rounds"]:
                print(f"threshold: stopped at experiment.max_rounds={ctx['max_rounds']} rounds; {len(need)} cells "
                      "still needed (raise max_rounds and run again)", file=sys.stderr)
                report(ctx, states)
                return 1
            plan = round_plan(ctx, need)
        done = sum(is_done(plan, c) for c in plan["cells"])
        pending = sum(not s["done"] for s in states)
        print(f"threshold: round {plan['round']}: {len(plan['cells'])} cells ({done} already done) for {pending} "
              f"unfinished (task, kind) pairs; "
              f"{describe_cost(ctx, [c for c in plan['cells'] if not is_done(plan, c)], results)}",
              file=sys.stderr)
        if args.slurm:
            rc = _slurm(ctx, plan, args.submit, args.drive)
            if not args.drive or rc != 0:
                return rc
        elif run_local(plan):
            print(f"threshold: some cells of round {plan['round']} failed (see {out / 'logs'}); run again to retry",
                  file=sys.stderr)
            report(ctx, plan_pairs(ctx, load_results(out))[0])
            return 1
        results = load_results(out)
    states, need = plan_pairs(ctx, results)
    report(ctx, states)
    print(f"threshold: {sum(s['done'] for s in states)} of {len(states)} (task, kind) pairs complete; tables in "
          f"{out} (price.csv, price.md), figures in {out / 'figures'}", file=sys.stderr)
    sys.stdout.write((out / "price.md").read_text())
    if args.brute_force is None:
        return 0 if not need else 1
    if need:
        print("threshold: --brute-force compares with the adaptive result: finish the adaptive experiment first",
              file=sys.stderr)
        return 1
    task = next((t for t in ctx["tasks"] if t["name"] == args.brute_force), None)
    if task is None:
        print(f"threshold: --brute-force {args.brute_force!r}: no such task (tasks: "
              f"{', '.join(t['name'] for t in ctx['tasks'])})", file=sys.stderr)
        return EXIT_CONFIG
    cells = brute_cells(ctx, task)
    plan = round_plan(ctx, cells, f"brute_{task['name']}")
    todo = [c for c in plan["cells"] if not is_done(plan, c)]
    print(f"threshold: brute force for {task['name']}: {len(plan['cells'])} cells ({len(todo)} to run); "
          f"{describe_cost(ctx, todo, results)}", file=sys.stderr)
    if todo and args.slurm:
        return _slurm(ctx, plan, args.submit, False)
    if todo and run_local(plan):
        print("threshold: some brute-force cells failed; run again to retry", file=sys.stderr)
        return 1
    rows = compare(ctx, task, states, load_results(out))
    write_csv(out / f"brute_force_{task['name']}.csv", rows, list(rows[0]))
    for r in rows:
        print(f"brute force {r['task']} {r['kind']}: s_min adaptive {r['s_min']} (bracket ({r['s_min_lo']}, "
              f"{r['s_min']}]) vs dense {r['brute_s_min']}: {'agree' if r['agree_s_min'] else 'DIFFER'}; "
              + "; ".join(f"{k} adaptive {r[k]:.4g} [{r[k + '_lo']:.4g}, {r[k + '_hi']:.4g}] vs dense "
                          f"{r['brute_' + k]:.4g}{'' if r[k + '_in_ci'] else ' (outside)'}"
                          for k in r if k.startswith("s_") and k[2:].isdigit()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="The price of randomness: s_90 / s_min per task and lift kind.")
    ap.add_argument("--config", help="experiment YAML (sections experiment: and train:)")
    ap.add_argument("overrides", nargs="*", help="experiment.<key>=value, or training key.path=value (all tasks)")
    ap.add_argument("--aggregate", action="store_true", help="run nothing: tables and figures of the finished cells")
    ap.add_argument("--slurm", action="store_true", help="plan the next round and print its sbatch job-array command")
    ap.add_argument("--submit", action="store_true", help="with --slurm: submit it")
    ap.add_argument("--drive", action="store_true", help="with --slurm --submit: wait for each round (sbatch --wait) "
                                                         "and submit the next until the experiment is complete")
    ap.add_argument("--brute-force", metavar="TASK", help="afterwards, run a dense grid for TASK and compare")
    args = ap.parse_args(argv)
    try:
        if not args.config:
            raise ExperimentError("--config FILE is required (an experiment YAML, e.g. configs/price_cpu.yaml)")
        if (args.submit and not args.slurm) or (args.drive and not args.submit):
            raise ExperimentError("--submit needs --slurm, and --drive needs --slurm --submit")
        section, train, overrides, stem = read_experiment(args.config, args.overrides)
        ctx = parse(section, stem, train, overrides)
    except ExperimentError as err:
        print(f"threshold: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return run(ctx, args)


if __name__ == "__main__":
    sys.exit(main())
