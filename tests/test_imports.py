"""The package's structure: imports point only down the stage order, and every module imports alone.

The stage order is the data flow: kernels, then graph -> lift -> layout -> partition -> plan ->
comm -> model -> config -> data -> engine -> checkpoint -> metrics -> trainer -> entry points and
tools. A module may import only modules placed before it (function-local imports included, so none
can hide a circle); a new module must be placed in `ORDER` to pass. Each module is then imported on
its own in a fresh interpreter.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import randlift_dist

PKG = Path(randlift_dist.__file__).parent
ORDER = [
    # sizes shared by the runtime and the memory model; local kernels: depend on nothing else of the project
    "limits", "ops.csr", "ops.workspace", "ops.blocked", "ops.triton_jit", "ops.triton_kernels", "ops.kernels", "ops.regen",
    "ops.window", "ops.embed", "ops",
    # the stages
    "geometry", "graph_schema", "graph_builders", "graph", "lift", "launch_env", "setup_watch", "layout", "partition",
    "exchange", "plan", "comm", "model_vertices", "model_edges", "model", "parallelize", "activation_memory", "rows",
    "config_parse", "config", "tasks", "planstats",
    "data.sources", "data.shards", "data.files", "data.packaged", "data.teacher", "data.recall", "data", "data.__main__",
    "estimate.terms", "estimate.phases", "estimate.rank", "estimate.cli", "estimate", "estimate.__main__",
    "engine_deepspeed", "engine", "checkpoint", "warmstart", "runs", "export", "predict", "evaluate", "metrics",
    "trainer", "train", "job_store", "outcome", "launcher",
    # tools built on the trainer
    "experiments", "experiments.collect", "experiments.target", "experiments.figures", "experiments.cell",
    "experiments.runner", "experiments.convergence", "experiments.adaptive", "experiments.price_plan",
    "experiments.cost", "experiments.price_figures", "experiments.price_report", "experiments.threshold",
    "experiments.seeds",
    "",  # the package itself: re-exports the public API
]


def modules() -> list[str]:
    names = [""]
    for info in pkgutil.walk_packages([str(PKG)]):
        names.append(info.name)
    return sorted(names)


def source(name: str) -> Path:
    p = PKG.joinpath(*name.split(".")) if name else PKG
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def imported(name: str) -> set[str]:
    """Project modules that module `name` imports anywhere in its body (relative or absolute)."""
    tree = ast.parse(source(name).read_text())
    is_pkg = source(name).name == "__init__.py"
    here = name.split(".") if name else []
    pkg = here if is_pkg else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "randlift_dist":
                mod = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(mod)
            for alias in node.names:  # `from . import checkpoint` imports a submodule
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if source_exists(sub) else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "randlift_dist":
                    found.add(".".join(parts[1:]))
    found.discard(name)
    return {m for m in found if source_exists(m)}


def source_exists(name: str) -> bool:
    return source(name).is_file()


def test_every_module_has_a_place_in_the_order():
    missing = [m for m in modules() if m not in ORDER]
    assert not missing, f"place these modules in ORDER (tests/test_imports.py): {missing}"


def test_imports_point_only_down_the_stage_order():
    rank = {m: i for i, m in enumerate(ORDER)}
    bad = []
    for m in modules():
        for dep in imported(m):
            if dep in rank and m in rank and rank[dep] >= rank[m]:
                bad.append(f"{m or 'randlift_dist'} imports {dep} (placed after it)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: imported(m) for m in modules()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.timeout(300)
def test_each_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter per module, in dependency order; and none imports deepspeed, wandb or triton
    (except `ops.triton_jit`, the Triton kernels themselves, which only `impl="triton"` loads)."""
    mods = [m for m in ORDER if m and source_exists(m)]
    script = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); "
              "heavy = sorted(k for k in ('deepspeed', 'wandb', 'triton') if k in sys.modules); "
              "print(','.join(heavy))")
    failures = []
    for i in range(0, len(mods), 3):  # three interpreters at a time: each holds torch (~300 MB)
        batch = {m: subprocess.Popen([sys.executable, "-c", script, f"randlift_dist.{m}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for m in mods[i:i + 3]}
        failures += _collect(batch)
    assert not failures, "\n".join(failures)


def _collect(procs: dict) -> list[str]:
    failures = []
    for m, p in procs.items():
        out, err = p.communicate(timeout=240)
        if p.returncode != 0:
            failures.append(f"{m}: exit {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        elif out.strip() and not (m == "ops.triton_jit" and out.strip() == "triton"):
            failures.append(f"{m}: imports {out.strip()} at import time")
    return failures
