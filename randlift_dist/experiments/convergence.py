"""Does it converge? A grid of trainings over lift sizes x seeds x lift kinds, on any task.

    python -m randlift_dist.experiments.convergence --config configs/convergence_cpu.yaml [key=value ...]

The experiment file has two sections: `experiment:` (this module's schema, `EXPERIMENT_KEYS`) and
`train:`, an ordinary training config (a mapping, or the path of a training YAML relative to the
experiment file) used by every cell. Overrides `experiment.<key>=value` change the experiment;
any other `key=value` is a training override (`train.steps=50`, `data.label_noise=0.1`).

A cell is (lift kind, lift size, seed): the seed is both `model.lift.seed` and
`model.weight_seed`; a kind is `{law: bernoulli|fixed_degree, degree: D}` or `{law: full}`.
Every cell runs the real trainer entry point (`randlift_dist.train.main`) in its own process with
`run.dir=<out>/cells/<cell id>`, the torch engine at world size 1, no intermediate checkpoints,
then `cell.analyse` writes `result.json` (atomically) beside it. Any data kind and loss: success
is `experiment.target` (`{metric: test_loss, max: X}`, `{metric: test_accuracy, min: A}`, ...;
`experiment.eps: X` is `test_loss <= X`, `target.py`), and tables and figures name it.

Cells run through `runner.py` (the plan schema, one process per cell, local workers, the SLURM
array command), as the price-of-randomness experiment's (`threshold.py`) do.

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
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .runner import (EXIT_CONFIG, FORCED, REPO, ExperimentError, fingerprint, is_done,
                     run_cell_main, run_local, slurm_commands, submit, write_plan)
from .target import TargetError, check_task, from_experiment, parse_target

LAWS = ("bernoulli", "fixed_degree", "full")
EXPERIMENT_KEYS = {
    "name": "experiment name (wandb group, figure titles); default: the file's stem",
    "out": "output directory (plan, cells/, results.csv, figures/)",
    "sizes": "lift sizes: a list of positive integers",
    "seeds": "seeds (lift seed = weight seed): a list of integers, or a count n for 0..n-1",
    "kinds": "lift kinds: a list of {law: bernoulli|fixed_degree, degree: D} or {law: full}",
    "target": "success: {metric: test_loss|train_loss, max: X} or {metric: test_accuracy|train_accuracy, min: A}",
    "eps": "shorthand for target {metric: test_loss, max: eps} (give target or eps)",
    "workers": "cells run at once locally (default 1)",
    "threads_per_worker": "torch / OpenMP threads of each cell (default 1)",
}


# ---------------------------------------------------------------- config
def parse_kind(i: int, k: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A lift kind `{law, degree}` (degree None for `full`); `extra` keys are allowed and ignored."""
    key = f"experiment.kinds[{i}]"
    if not isinstance(k, dict) or "law" not in k:
        raise ExperimentError(f"{key}={k!r}: write {{law: bernoulli, degree: 4}} or {{law: full}}")
    unknown = sorted(set(k) - {"law", "degree", *extra})
    if unknown:
        raise ExperimentError(f"{key}: unknown key(s) {unknown}; a kind has {', '.join(['law', 'degree', *extra])}")
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


def int_list(key: str, v: Any, positive: bool) -> list[int]:
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise ExperimentError(f"experiment.{key}={v!r}: expected a non-empty list of integers")
    if positive and min(v) <= 0 or not positive and min(v) < 0:
        raise ExperimentError(f"experiment.{key}={v!r}: values must be {'> 0' if positive else '>= 0'}")
    if len(set(v)) != len(v):
        raise ExperimentError(f"experiment.{key}={v!r}: values must be distinct")
    return list(v)


def check_section(section: Any, keys: dict[str, str], required: tuple[str, ...]) -> None:
    """The `experiment:` section is a mapping of known `keys` (name -> doc) holding `required`."""
    if not isinstance(section, dict):
        raise ExperimentError(f"experiment={section!r}: expected a mapping with keys {', '.join(keys)}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ExperimentError(f"unknown key(s) {', '.join('experiment.' + k for k in unknown)}; "
                              f"known: {', '.join(keys)}")
    for key in required:
        if key not in section:
            raise ExperimentError(f"experiment.{key} is missing: {keys[key]}")


def parse_experiment(section: Any, default_name: str) -> dict[str, Any]:
    """Validate the `experiment:` mapping; returns it with defaults filled in."""
    check_section(section, EXPERIMENT_KEYS, ("out", "sizes", "seeds", "kinds"))
    seeds = section["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds <= 0:
            raise ExperimentError(f"experiment.seeds={seeds}: a count must be > 0 (or give a list of seeds)")
        seeds = list(range(seeds))
    kinds = section["kinds"]
    if not isinstance(kinds, list) or not kinds:
        raise ExperimentError(f"experiment.kinds={kinds!r}: expected a non-empty list of {{law, degree}}")
    kinds = [parse_kind(i, k) for i, k in enumerate(kinds)]
    if len({kind_tag(k) for k in kinds}) != len(kinds):
        raise ExperimentError(f"experiment.kinds: {[kind_tag(k) for k in kinds]} has duplicates")
    try:
        target = from_experiment(section)
    except TargetError as err:
        raise ExperimentError(str(err)) from None
    out: dict[str, Any] = {"name": section.get("name") or default_name, "out": section["out"],
                           "sizes": int_list("sizes", section["sizes"], True),
                           "seeds": int_list("seeds", seeds, False), "kinds": kinds,
                           "target": target.to_dict(), "label": target.label}
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


def read_experiment(path: str | Path, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str], str]:
    """`(experiment section with its overrides, training mapping, training overrides, file stem)`.

    `experiment.<key>=value` sets a key of the section (`experiment.a.b=v` a key of the mapping
    `a`); any other override is the training config's."""
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
            if len(keys) < 2:
                raise ExperimentError(f"override {text!r}: write experiment.<key>=value")
            node = section
            for k in keys[1:-1]:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node[k] = dict(node[k])
                node = node[k]
            node[keys[-1]] = value
        else:
            train_overrides.append(text)
    train = data.get("train")
    if isinstance(train, str):
        tpath = (src.parent / train) if not Path(train).is_absolute() else Path(train)
        if not tpath.is_file():
            raise ExperimentError(f"train={train!r}: no such training config (relative to {src.parent})")
        train = yaml.safe_load(tpath.read_text()) or {}
    if not isinstance(train, dict):
        raise ExperimentError(f"train={train!r}: expected a training config mapping or the path of one")
    return section, train, train_overrides, src.stem


def load_experiment(path: str | Path, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """`(experiment, training mapping, training overrides)` from the file and the overrides."""
    section, train, train_overrides, stem = read_experiment(path, overrides)
    return parse_experiment(section, stem), train, train_overrides


def resolve_training(train: dict, overrides: list[str], target: dict | None = None, key: str = "train"):
    """The validated training `Config` every cell starts from (cell keys are set per cell); with a
    `target`, checks that the task measures its metric."""
    from ..config import ConfigError, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(train, f)
    try:
        cfg = load_config(f.name, overrides + FORCED)
    except ConfigError as err:
        raise ExperimentError(f"{key}: {err}") from None
    finally:
        os.unlink(f.name)
    if target is not None:
        try:
            check_task(parse_target(target), cfg.train.loss)
        except TargetError as err:
            raise ExperimentError(str(err)) from None
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
                fp = fingerprint(train_yaml, argv, exp["target"])
                cells.append({"id": cid, "kind": kind_tag(kind), "law": kind["law"], "degree": kind["degree"],
                              "size": size, "seed": seed, "argv": argv, "fingerprint": fp,
                              "target": exp["target"], "extras": True})
    return {"experiment": exp, "out": str(out), "wandb_mode": cfg.wandb.mode, "wandb_project": cfg.wandb.project,
            "wandb_entity": cfg.wandb.entity, "train_yaml": train_yaml, "cells": cells}


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m randlift_dist.experiments.convergence",
                                 description="Convergence grid: lift sizes x seeds x lift kinds on any task.")
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
        if args.run_cell:  # kept for plans and job scripts that call this module
            return run_cell_main(args.run_cell, args.cell, args.index)
        if not args.config:
            raise ExperimentError("--config FILE is required (an experiment YAML, e.g. configs/convergence_cpu.yaml)")
        exp, train, train_overrides = load_experiment(args.config, args.overrides)
        plan = make_plan(exp, resolve_training(train, train_overrides, exp["target"]))
    except ExperimentError as err:
        print(f"convergence: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    write_plan(plan)
    n_done = sum(is_done(plan, c) for c in plan["cells"])
    print(f"convergence: {len(plan['cells'])} cells ({n_done} already done) in {plan['out']}", file=sys.stderr)
    if args.slurm:
        cmds = slurm_commands(plan, REPO)
        print("\n".join(" ".join(cmd) for cmd in cmds))
        return submit(cmds) if args.submit else 0
    failed = [] if args.aggregate else run_local(plan)
    from .figures import aggregate

    aggregate(plan)
    if failed:
        print(f"convergence: {len(failed)} cell(s) failed: {', '.join(failed)} (rerun to retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
