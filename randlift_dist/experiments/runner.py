"""Running experiment cells: the plan schema, one cell through the trainer, local workers, SLURM.

A plan directory `D` holds `plan.json`: `out` (where `cells/<id>/` and `logs/` live; `D` itself,
or a round directory below it), `plan_dir` (`D`), `experiment` (`name`, `workers`,
`threads_per_worker`), and `cells`, each with an `id` (a path below `cells/`, may contain `/`),
its identity fields (copied into its result), the trainer `argv`, a `fingerprint`, a `target`
(`target.py`; null: metrics only) and `extras` (distance, readout proxy).

Invariants:
- A cell is done when `<out>/cells/<id>/result.json` exists with the cell's fingerprint; a done
  cell is never rerun. Any other cell (never run, crashed, partial, or run with other settings)
  is wiped and rerun from scratch, so a result always comes from one uninterrupted training.
- `result.json` is written atomically, after the trainer finished all `train.steps`.
- Every cell runs `randlift_dist.train.main` in its own process (`python -m
  randlift_dist.experiments.runner --run-cell D --cell ID`, or `--index I` for a SLURM array
  task), torch engine, world size 1, `threads_per_worker` threads (`FORCED` comes last on its
  command line); local runs keep `workers` such processes busy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .target import parse_target

EXIT_CONFIG = 2
ANALYSIS = 2  # bump when cell.analyse changes what it measures: every cell is then redone
# Keys every cell sets last on its trainer command line (the experiment owns them).
FORCED = ["parallel.engine=torch", "parallel.lift_parallel=1", "run.progress=false", "checkpoint.every=0",
          "checkpoint.keep=1", "train.resume=none", "train.stop_at=null"]
REPO = Path(__file__).resolve().parents[2]


class ExperimentError(ValueError):
    """A bad experiment config or plan; the message names the key and the fix."""


def fingerprint(train_yaml: str, argv: list[str], target: dict | None) -> str:
    """What a cell's result depends on: the training config, the cell's trainer arguments, its target
    and the version of the analysis (`ANALYSIS`); a result with another fingerprint is stale."""
    return hashlib.sha256(json.dumps([train_yaml, argv, target, ANALYSIS]).encode()).hexdigest()[:16]


def write_plan(plan: dict[str, Any]) -> Path:
    """Write `plan.json` (and `train.yaml`, when the plan has one) into the plan's directory."""
    pdir = Path(plan.get("plan_dir", plan["out"]))
    (Path(plan["out"]) / "cells").mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    if "train_yaml" in plan:
        atomic_write(pdir / "train.yaml", plan["train_yaml"])
    atomic_write(pdir / "plan.json", json.dumps(plan, indent=1))
    return pdir / "plan.json"


def read_plan(out: str | Path) -> dict[str, Any]:
    path = Path(out) / "plan.json"
    if not path.is_file():
        raise ExperimentError(f"{path}: no plan (run the experiment with --config first)")
    return json.loads(path.read_text())


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def result_path(plan: dict[str, Any], cell: dict[str, Any]) -> Path:
    return Path(plan["out"]) / "cells" / cell["id"] / "result.json"


def is_done(plan: dict[str, Any], cell: dict[str, Any]) -> bool:
    try:
        path = result_path(plan, cell)
        return json.loads(path.read_text()).get("fingerprint") == cell["fingerprint"]
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- one cell
def run_cell(plan: dict[str, Any], cell: dict[str, Any], threads: int) -> int:
    """Train one cell from scratch through the trainer's entry point, then write its result.json."""
    import torch

    from .. import train
    from .cell import analyse

    if is_done(plan, cell):
        return 0
    torch.set_num_threads(threads)
    run_dir = Path(plan["out"]) / "cells" / cell["id"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a crashed or stale cell restarts from scratch
    run_dir.mkdir(parents=True)
    t0 = time.time()
    rc = train.main(list(cell["argv"]))
    if rc != 0:
        print(f"cell {cell['id']}: the trainer exited with status {rc}", file=sys.stderr)
        return rc
    result = {k: v for k, v in cell.items() if k not in ("argv", "fingerprint", "target", "extras")}
    result["train_s"] = round(time.time() - t0, 3)
    target = parse_target(cell["target"]) if cell.get("target") else None
    result.update(analyse(run_dir, target, extras=cell.get("extras", True)))
    if result["step"] != result["steps"]:  # stopped early (a signal): not a finished cell
        print(f"cell {cell['id']}: the trainer stopped at step {result['step']} of {result['steps']}; "
              "rerun the experiment to redo this cell", file=sys.stderr)
        return 3
    result["wall_s"] = round(time.time() - t0, 3)
    result["fingerprint"] = cell["fingerprint"]
    atomic_write(run_dir / "result.json", json.dumps(result, indent=1))
    return 0


def run_local(plan: dict[str, Any]) -> list[str]:
    """Run the cells not yet done, `workers` at a time; returns the ids of failed cells."""
    from tqdm import tqdm

    exp, out = plan["experiment"], Path(plan["out"])
    todo = [c for c in plan["cells"] if not is_done(plan, c)]
    threads = exp["threads_per_worker"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_RUN_GROUP=exp["name"],
               PYTHONPATH=os.pathsep.join([str(REPO)]
                                          + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    (out / "logs").mkdir(exist_ok=True)
    bar = tqdm(total=len(plan["cells"]), initial=len(plan["cells"]) - len(todo), desc=exp["name"], unit="cell",
               file=sys.stderr, dynamic_ncols=True)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    failed = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < exp["workers"]:
            cell = queue.pop(0)
            log = open(log_path(out, cell["id"]), "w")
            cmd = [sys.executable, "-m", "randlift_dist.experiments.runner", "--run-cell",
                   plan.get("plan_dir", str(out)), "--cell", cell["id"]]
            running[cell["id"]] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.2)
        for cid, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[cid]
            if proc.returncode != 0:
                failed.append(cid)
                bar.write(f"cell {cid} failed (status {proc.returncode}): see {log_path(out, cid)}")
            bar.update(1)
    bar.close()
    return failed


def log_path(out: Path, cell_id: str) -> Path:
    return Path(out) / "logs" / (cell_id.replace("/", "__") + ".log")


MAX_ARRAY = 1000  # array tasks per job (SLURM's MaxArraySize is 1001 by default)


def slurm_commands(plan: dict[str, Any], repo: Path, extra: list[str] | tuple = (),
                   max_array: int = MAX_ARRAY) -> list[list[str]]:
    """The sbatch commands of job arrays with one task per cell of the plan (done cells exit at
    once), `max_array` cells per array: array task i of the array starting at cell `a` runs cell
    `a + i` (`CELL_OFFSET=a`); `extra`: more sbatch arguments (`--gres=gpu:1`, `--time=...`)."""
    exp, n = plan["experiment"], len(plan["cells"])
    cmds = []
    for a in range(0, n, max_array):
        b = min(n, a + max_array)
        cmds.append(["env", f"EXPERIMENT_DIR={plan.get('plan_dir', plan['out'])}", f"NCELLS={n}", f"CELL_OFFSET={a}",
                     f"OMP_NUM_THREADS={exp['threads_per_worker']}", "sbatch", f"--array=0-{b - a - 1}%{exp['workers']}",
                     f"--cpus-per-task={exp['threads_per_worker']}", f"--job-name={exp['name']}", *extra,
                     str(repo / "slurm" / "sweep.sbatch")])
    return cmds


def submit(cmds: list[list[str]], wait: bool = False) -> int:
    """Submit the arrays one after another (each after the previous one ended: `--dependency=
    afterany`, so at most `workers` cells run at once); with `wait`, return when the last ended."""
    previous = None
    for i, cmd in enumerate(cmds):
        cmd = list(cmd)
        at = cmd.index("sbatch") + 1
        cmd[at:at] = ["--parsable"] + ([f"--dependency=afterany:{previous}"] if previous else []) + \
            (["--wait"] if wait and i == len(cmds) - 1 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr)
        job = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0:
            what = "ended with a failed task" if job else "failed"
            print(f"sbatch {what} (status {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
            return proc.returncode
        print(f"submitted job array {job}: {' '.join(cmd)}", file=sys.stderr)
        previous = job
    return 0


def run_cell_main(plan_dir: str, cell_id: str | None, index: int | None) -> int:
    """`--run-cell`: run one cell of the plan in `plan_dir`, named by id or by index."""
    plan = read_plan(plan_dir)
    cells = plan["cells"]
    match = [c for c in cells if c["id"] == cell_id] if cell_id else \
        cells[index:index + 1] if index is not None and 0 <= index < len(cells) else []
    if not match:
        raise ExperimentError(f"--cell {cell_id!r} / --index {index!r}: not a cell of the plan in "
                              f"{plan_dir} ({len(cells)} cells, indices 0..{len(cells) - 1})")
    threads = int(os.environ.get("OMP_NUM_THREADS") or plan["experiment"]["threads_per_worker"])
    return run_cell(plan, match[0], threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m randlift_dist.experiments.runner",
                                 description="Run one cell of an experiment plan (local workers, SLURM array tasks).")
    ap.add_argument("--run-cell", metavar="DIR", required=True, help="the plan directory (holds plan.json)")
    ap.add_argument("--cell", help="the cell id")
    ap.add_argument("--index", type=int, help="the cell's index in the plan (SLURM array task)")
    args = ap.parse_args(argv)
    try:
        return run_cell_main(args.run_cell, args.cell, args.index)
    except ExperimentError as err:
        print(f"runner: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
