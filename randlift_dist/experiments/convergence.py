"""Does it converge? A grid of teacher-student trainings over lift sizes x seeds x lift kinds.

    python -m randlift_dist.experiments.convergence --config configs/convergence_cpu.yaml [key=value ...]

The experiment file has two sections: `experiment:` (this module's schema, `EXPERIMENT_KEYS`) and
`train:`, an ordinary training config (a mapping, or the path of a training YAML relative to the
experiment file) used by every cell. Overrides `experiment.<key>=value` change the experiment;
any other `key=value` is a training override (`train.steps=50`, `data.label_noise=0.1`).

A cell is (lift kind, lift size, seed): the seed is both `model.lift.seed` and
`model.weight_seed`; a kind is `{law: bernoulli|fixed_degree, degree: D}` or `{law: full}`.
Every cell runs the real trainer entry point (`randlift_dist.train.main`) in its own process with
`run.dir=<out>/cells/<cell id>`, the torch engine at world size 1, no intermediate checkpoints,
then `cell.analyse` writes `result.json` (atomically) beside it.

Invariants:
- The resolved plan is `<out>/plan.json` (+ the resolved training config `<out>/train.yaml`);
  cells and SLURM array tasks read only it, so every cell of a run uses the same settings.
- Resumable: a cell whose `result.json` exists with the plan's fingerprint for that cell is not
  rerun; any other cell (never run, crashed, partial, or run with other settings) is wiped and
  rerun from scratch.
- Local runs use `experiment.workers` processes of `experiment.threads_per_worker` threads each;
  `--slurm` prints (and with `--submit` submits) a `slurm/sweep.sbatch` job array over the plan.
- Afterwards the results are aggregated (`figures.py`): `results.csv`, `summary.csv`, PNG figures,
  and wandb runs when the training config's `wandb.mode` is not `disabled`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

EXIT_CONFIG = 2
LAWS = ("bernoulli", "fixed_degree", "full")
EXPERIMENT_KEYS = {
    "name": "experiment name (wandb group, figure titles); default: the file's stem",
    "out": "output directory (plan, cells/, results.csv, figures/)",
    "sizes": "lift sizes: a list of positive integers",
    "seeds": "seeds (lift seed = weight seed): a list of integers, or a count n for 0..n-1",
    "kinds": "lift kinds: a list of {law: bernoulli|fixed_degree, degree: D} or {law: full}",
    "eps": "target loss: a cell succeeds when its final test loss is <= eps",
    "workers": "cells run at once locally (default 1)",
    "threads_per_worker": "torch / OpenMP threads of each cell (default 1)",
}
# Keys every cell sets last on its trainer command line (the experiment owns them).
FORCED = ["parallel.engine=torch", "parallel.lift_parallel=1", "run.progress=false", "checkpoint.every=0",
          "checkpoint.keep=1", "train.resume=none", "train.stop_at=null"]


class ExperimentError(ValueError):
    """A bad experiment config; the message names the key and the fix."""


# ---------------------------------------------------------------- config
def _kind(i: int, k: Any) -> dict[str, Any]:
    key = f"experiment.kinds[{i}]"
    if not isinstance(k, dict) or "law" not in k:
        raise ExperimentError(f"{key}={k!r}: write {{law: bernoulli, degree: 4}} or {{law: full}}")
    unknown = sorted(set(k) - {"law", "degree"})
    if unknown:
        raise ExperimentError(f"{key}: unknown key(s) {unknown}; a kind has only law and degree")
    law = k["law"]
    if law not in LAWS:
        raise ExperimentError(f"{key}.law={law!r}: choose one of {', '.join(LAWS)}")
    if law == "full":
        if k.get("degree") is not None:
            raise ExperimentError(f"{key}: law full has no degree (remove degree={k['degree']!r})")
        return {"law": "full", "degree": None}
    d = k.get("degree")
    if isinstance(d, bool) or not isinstance(d, (int, float)) or d <= 0:
        raise ExperimentError(f"{key}.degree={d!r}: law {law} needs a degree > 0")
    return {"law": law, "degree": d}


def kind_tag(kind: dict[str, Any]) -> str:
    """`bernoulli-d4`, `full`: the kind's part of a cell id (and its label in tables)."""
    return "full" if kind["law"] == "full" else f"{kind['law']}-d{kind['degree']:g}"


def _int_list(key: str, v: Any, positive: bool) -> list[int]:
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise ExperimentError(f"experiment.{key}={v!r}: expected a non-empty list of integers")
    if positive and min(v) <= 0 or not positive and min(v) < 0:
        raise ExperimentError(f"experiment.{key}={v!r}: values must be {'> 0' if positive else '>= 0'}")
    if len(set(v)) != len(v):
        raise ExperimentError(f"experiment.{key}={v!r}: values must be distinct")
    return list(v)


def parse_experiment(section: Any, default_name: str) -> dict[str, Any]:
    """Validate the `experiment:` mapping; returns it with defaults filled in."""
    if not isinstance(section, dict):
        raise ExperimentError(f"experiment={section!r}: expected a mapping with keys {', '.join(EXPERIMENT_KEYS)}")
    unknown = sorted(set(section) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ExperimentError(f"unknown key(s) {', '.join('experiment.' + k for k in unknown)}; "
                              f"known: {', '.join(EXPERIMENT_KEYS)}")
    for key in ("out", "sizes", "seeds", "kinds", "eps"):
        if key not in section:
            raise ExperimentError(f"experiment.{key} is missing: {EXPERIMENT_KEYS[key]}")
    seeds = section["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds <= 0:
            raise ExperimentError(f"experiment.seeds={seeds}: a count must be > 0 (or give a list of seeds)")
        seeds = list(range(seeds))
    kinds = section["kinds"]
    if not isinstance(kinds, list) or not kinds:
        raise ExperimentError(f"experiment.kinds={kinds!r}: expected a non-empty list of {{law, degree}}")
    kinds = [_kind(i, k) for i, k in enumerate(kinds)]
    if len({kind_tag(k) for k in kinds}) != len(kinds):
        raise ExperimentError(f"experiment.kinds: {[kind_tag(k) for k in kinds]} has duplicates")
    eps = section["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ExperimentError(f"experiment.eps={eps!r}: expected a number > 0")
    out: dict[str, Any] = {"name": section.get("name") or default_name, "out": section["out"],
                           "sizes": _int_list("sizes", section["sizes"], True),
                           "seeds": _int_list("seeds", seeds, False), "kinds": kinds, "eps": float(eps)}
    if not isinstance(out["out"], str) or not out["out"]:
        raise ExperimentError(f"experiment.out={out['out']!r}: expected a directory path")
    if not isinstance(out["name"], str):
        raise ExperimentError(f"experiment.name={out['name']!r}: expected a string")
    for key in ("workers", "threads_per_worker"):
        v = section.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ExperimentError(f"experiment.{key}={v!r}: expected an integer > 0")
        out[key] = v
    return out


def load_experiment(path: str | Path, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """`(experiment, training mapping, training overrides)` from the file and the overrides."""
    from ..config_parse import parse_override

    src = Path(path)
    if not src.is_file():
        raise ExperimentError(f"--config {str(src)!r}: no such file")
    try:
        data = yaml.safe_load(src.read_text()) or {}
    except yaml.YAMLError as err:
        raise ExperimentError(f"{src}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"experiment", "train"}:
        extra = sorted(set(data) - {"experiment", "train"}) if isinstance(data, dict) else data
        raise ExperimentError(f"{src}: top-level key(s) {extra!r}: an experiment file has only "
                              "'experiment:' and 'train:' (the training config)")
    section = dict(data.get("experiment") or {})
    train_overrides = []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "experiment":
            if len(keys) != 2:
                raise ExperimentError(f"override {text!r}: write experiment.<key>=value")
            section[keys[1]] = value
        else:
            train_overrides.append(text)
    exp = parse_experiment(section, src.stem)
    train = data.get("train")
    if isinstance(train, str):
        tpath = (src.parent / train) if not Path(train).is_absolute() else Path(train)
        if not tpath.is_file():
            raise ExperimentError(f"train={train!r}: no such training config (relative to {src.parent})")
        train = yaml.safe_load(tpath.read_text()) or {}
    if not isinstance(train, dict):
        raise ExperimentError(f"train={train!r}: expected a training config mapping or the path of one")
    return exp, train, train_overrides


def resolve_training(train: dict, overrides: list[str]):
    """The validated training `Config` every cell starts from (cell keys are set per cell)."""
    from ..config import ConfigError, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(train, f)
    try:
        cfg = load_config(f.name, overrides + FORCED)
    except ConfigError as err:
        raise ExperimentError(f"train: {err}") from None
    finally:
        os.unlink(f.name)
    if cfg.data.kind != "teacher":
        raise ExperimentError(f"train: data.kind={cfg.data.kind!r}: the convergence experiment needs "
                              "data.kind=teacher (the teacher is the witness network)")
    return cfg


# ---------------------------------------------------------------- plan
def cell_id(kind: dict[str, Any], size: int, seed: int) -> str:
    return f"{kind_tag(kind)}_s{size}_seed{seed}"


def make_plan(exp: dict[str, Any], cfg) -> dict[str, Any]:
    """Every cell's id, identity and trainer argv; written to `<out>/plan.json`."""
    from ..config import dump_config

    out = Path(exp["out"]).resolve()
    train_yaml = dump_config(cfg)
    cells = []
    for kind in exp["kinds"]:
        for size in exp["sizes"]:
            for seed in exp["seeds"]:
                cid = cell_id(kind, size, seed)
                argv = ["--config", str(out / "train.yaml"), f"model.lift.law={kind['law']}",
                        f"model.lift.size={size}", f"model.lift.seed={seed}", f"model.weight_seed={seed}"]
                if kind["degree"] is not None:
                    argv.append(f"model.lift.degree={kind['degree']}")
                argv += FORCED + [f"run.dir={out / 'cells' / cid}", f"run.name={exp['name']}-{cid}"]
                fp = hashlib.sha256(json.dumps([train_yaml, argv, exp["eps"]]).encode()).hexdigest()[:16]
                cells.append({"id": cid, "kind": kind_tag(kind), "law": kind["law"], "degree": kind["degree"],
                              "size": size, "seed": seed, "argv": argv, "fingerprint": fp})
    return {"experiment": exp, "out": str(out), "wandb_mode": cfg.wandb.mode, "wandb_project": cfg.wandb.project,
            "wandb_entity": cfg.wandb.entity, "train_yaml": train_yaml, "cells": cells}


def write_plan(plan: dict[str, Any]) -> Path:
    out = Path(plan["out"])
    (out / "cells").mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "train.yaml", plan["train_yaml"])
    _atomic_write(out / "plan.json", json.dumps(plan, indent=1))
    return out / "plan.json"


def read_plan(out: str | Path) -> dict[str, Any]:
    path = Path(out) / "plan.json"
    if not path.is_file():
        raise ExperimentError(f"{path}: no plan (run the experiment with --config first)")
    return json.loads(path.read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_done(plan: dict[str, Any], cell: dict[str, Any]) -> bool:
    path = Path(plan["out"]) / "cells" / cell["id"] / "result.json"
    try:
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
    result = {"id": cell["id"], "kind": cell["kind"], "law": cell["law"], "degree": cell["degree"],
              "size": cell["size"], "seed": cell["seed"], "train_s": round(time.time() - t0, 3)}
    result.update(analyse(run_dir, plan["experiment"]["eps"]))
    if result["step"] != result["steps"]:  # stopped early (a signal): not a finished cell
        print(f"cell {cell['id']}: the trainer stopped at step {result['step']} of {result['steps']}; "
              "rerun the experiment to redo this cell", file=sys.stderr)
        return 3
    result["wall_s"] = round(time.time() - t0, 3)
    result["fingerprint"] = cell["fingerprint"]
    _atomic_write(run_dir / "result.json", json.dumps(result, indent=1))
    return 0


def run_local(plan: dict[str, Any]) -> list[str]:
    """Run the cells not yet done, `workers` at a time; returns the ids of failed cells."""
    from tqdm import tqdm

    exp, out = plan["experiment"], Path(plan["out"])
    todo = [c for c in plan["cells"] if not is_done(plan, c)]
    threads = exp["threads_per_worker"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_RUN_GROUP=exp["name"],
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])]
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
            log = open(out / "logs" / f"{cell['id']}.log", "w")
            cmd = [sys.executable, "-m", "randlift_dist.experiments.convergence", "--run-cell", str(out),
                   "--cell", cell["id"]]
            running[cell["id"]] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.2)
        for cid, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[cid]
            if proc.returncode != 0:
                failed.append(cid)
                bar.write(f"cell {cid} failed (status {proc.returncode}): see {out / 'logs' / (cid + '.log')}")
            bar.update(1)
    bar.close()
    return failed


def slurm_command(plan: dict[str, Any], repo: Path) -> list[str]:
    """The sbatch command of a job array with one task per cell (done cells exit at once)."""
    exp, n = plan["experiment"], len(plan["cells"])
    return ["env", f"EXPERIMENT_DIR={plan['out']}", f"NCELLS={n}", f"OMP_NUM_THREADS={exp['threads_per_worker']}",
            "sbatch", f"--array=0-{n - 1}%{exp['workers']}", f"--cpus-per-task={exp['threads_per_worker']}",
            f"--job-name={exp['name']}", str(repo / "slurm" / "sweep.sbatch")]


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m randlift_dist.experiments.convergence",
                                 description="Convergence grid: lift sizes x seeds x lift kinds on the teacher task.")
    ap.add_argument("--config", help="experiment YAML (sections experiment: and train:)")
    ap.add_argument("overrides", nargs="*", help="experiment.<key>=value, or training key.path=value")
    ap.add_argument("--aggregate", action="store_true", help="run nothing: aggregate the finished cells")
    ap.add_argument("--slurm", action="store_true", help="write the plan and print the sbatch job-array command")
    ap.add_argument("--submit", action="store_true", help="with --slurm: also submit it")
    ap.add_argument("--run-cell", metavar="OUT", help="(workers, array tasks) run one cell of the plan in OUT")
    ap.add_argument("--cell", help="with --run-cell: the cell id")
    ap.add_argument("--index", type=int, help="with --run-cell: the cell's index in the plan (SLURM array task)")
    args = ap.parse_args(argv)
    try:
        if args.run_cell:
            plan = read_plan(args.run_cell)
            cells = plan["cells"]
            match = [c for c in cells if c["id"] == args.cell] if args.cell else \
                cells[args.index:args.index + 1] if args.index is not None and 0 <= args.index < len(cells) else []
            if not match:
                raise ExperimentError(f"--cell {args.cell!r} / --index {args.index!r}: not a cell of the plan in "
                                      f"{args.run_cell} ({len(cells)} cells, indices 0..{len(cells) - 1})")
            threads = int(os.environ.get("OMP_NUM_THREADS") or plan["experiment"]["threads_per_worker"])
            return run_cell(plan, match[0], threads)
        if not args.config:
            raise ExperimentError("--config FILE is required (an experiment YAML, e.g. configs/convergence_cpu.yaml)")
        exp, train, train_overrides = load_experiment(args.config, args.overrides)
        plan = make_plan(exp, resolve_training(train, train_overrides))
    except ExperimentError as err:
        print(f"convergence: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    write_plan(plan)
    n_done = sum(is_done(plan, c) for c in plan["cells"])
    print(f"convergence: {len(plan['cells'])} cells ({n_done} already done) in {plan['out']}", file=sys.stderr)
    if args.slurm:
        cmd = slurm_command(plan, Path(__file__).resolve().parents[2])
        print(" ".join(cmd))
        if args.submit:
            return subprocess.call(cmd)
        return 0
    failed = [] if args.aggregate else run_local(plan)
    from .figures import aggregate

    aggregate(plan)
    if failed:
        print(f"convergence: {len(failed)} cell(s) failed: {', '.join(failed)} (rerun to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
