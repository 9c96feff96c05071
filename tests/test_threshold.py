"""The price-of-randomness experiment: the pure estimates and searches against known answers, the
planner's rounds on synthetic outcomes (no training), the cost model, the SLURM round commands,
and one tiny experiment through the real command (trainings, resume, tables, brute force)."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from randlift_dist.config import load_config
from randlift_dist.experiments import adaptive as ad
from randlift_dist.experiments import cost, price_plan, price_report
from randlift_dist.experiments.convergence import read_experiment
from randlift_dist.model import LiftedNetwork
from test_slurm import cluster  # noqa: F401  (the one-node SLURM cluster fixture)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pure functions
def test_geometric_sizes_and_midpoints():
    assert ad.geometric_sizes(2, 128, 4) == [2, 8, 32, 128]
    assert ad.geometric_sizes(1, 10, 2) == [1, 2, 4, 8]
    assert ad.geometric_sizes(2, 10, 1.5) == [2, 3, 4, 7, 10]  # 2, 3, 4.5, 6.75, 10.125 rounded (half to even)
    assert ad.geometric_mid(4, 16) == 8 and ad.geometric_mid(8, 16) == 11 and ad.geometric_mid(4, 6) == 5
    assert ad.geometric_mid(4, 5) is None and ad.geometric_mid(1, 100) == 10
    assert ad.refinable(8, 11, 1.25) == 9 and ad.refinable(8, 9, 1.25) is None and ad.refinable(10, 12, 1.25) is None
    with pytest.raises(ValueError):
        ad.geometric_sizes(0, 8, 2)


def test_isotonic_pools_adjacent_violators():
    assert ad.isotonic([0, 0.5, 0.25, 1], [1, 1, 1, 1]) == [0, 0.375, 0.375, 1]
    assert ad.isotonic([1, 0], [3, 1]) == [0.75, 0.75]
    assert ad.isotonic([0.2, 0.1, 0.0, 0.9], [1, 1, 2, 1]) == pytest.approx([0.075] * 3 + [0.9])
    assert ad.isotonic([0, 0.1, 0.1, 1], [2, 2, 2, 2]) == [0, 0.1, 0.1, 1]


def test_crossing_interpolates_on_log_s_and_censors():
    c = ad.crossing([4, 8, 16], [0, 0.5, 1], 0.9)  # between 8 and 16: t = 0.8
    assert c["s"] == pytest.approx(8 * 2 ** 0.8) and (c["lo"], c["hi"], c["censored"]) == (8, 16, None)
    c = ad.crossing([4, 8, 16], [0, 0.5, 1], 0.5)  # reached exactly at 8
    assert c["s"] == pytest.approx(8) and (c["lo"], c["hi"]) == (4, 8)
    c = ad.crossing([4, 8], [0.95, 1], 0.9)
    assert c["s"] == 4 and c["censored"] == "below"
    c = ad.crossing([4, 8], [0, 0.2], 0.5)
    assert c["s"] == math.inf and c["censored"] == "above" and c["lo"] == 8


def test_bootstrap_against_the_exact_resampling_distribution():
    # sizes 1, 2; 0/1 and 1/2 successes. Resampled: k1* = 0; k2* ~ Bin(2, 1/2) in {0, 1, 2} w.p. 1/4, 1/2, 1/4,
    # so s_50* = inf, 2, sqrt 2 and s_90* = inf, inf, 2^0.9: the 95% interval is [min, max] of the support
    ci = ad.bootstrap([1, 2], [0, 1], [1, 2], [0.5, 0.9], samples=4000, seed=3, confidence=0.95)
    assert ci[0.5] == (pytest.approx(math.sqrt(2)), math.inf)
    assert ci[0.9] == (pytest.approx(2 ** 0.9), math.inf)
    # all-or-nothing sizes carry no seed noise: the interval is the point
    ci = ad.bootstrap([4, 8, 16], [0, 8, 8], [8, 8, 8], [0.5, 0.9], samples=500, seed=0, confidence=0.95)
    est = ad.estimate([4, 8, 16], [0, 8, 8], [8, 8, 8], [0.5, 0.9])
    assert ci[0.5] == (est[0.5]["s"], est[0.5]["s"]) and est[0.5]["s"] == pytest.approx(math.sqrt(32))
    args = ([1, 2], [0, 1], [1, 2], [0.5], 300, 7, 0.9)
    assert ad.bootstrap(*args) == ad.bootstrap(*args)  # seeded


def _simulate_p(grid, rule, seeds, rounds, resolution, levels=(0.5, 0.9)):
    """Run p_phase round by round, finishing what it asks for with `rule(size, seed)`."""
    done: dict[tuple[int, int], bool] = {}
    history = []
    while True:
        sizes, missing = ad.p_phase(grid, lambda s: [done.get((s, i)) for i in range(seeds)], levels, rounds,
                                    resolution)
        if not missing:
            return sizes, history
        history.append(missing)
        for s in missing:
            for i in range(seeds):
                done[(s, i)] = rule(s, i)


def test_p_phase_bisects_around_the_crossings():
    sizes, history = _simulate_p([2, 8, 32, 128], lambda s, i: s >= 11, 4, rounds=3, resolution=1.1)
    assert history == [[2, 8, 32, 128], [16], [11], [9]]
    assert sizes == [2, 8, 9, 11, 16, 32, 128]
    # two crossings in two brackets: seed i succeeds from size 4 (i even) or 40 (i odd): P = 0.5 from 4 to 39
    sizes, history = _simulate_p([2, 8, 32, 128], lambda s, i: s >= (4 if i % 2 == 0 else 40), 4, 1, 1.1)
    assert history == [[2, 8, 32, 128], [4, 64]] and sizes == [2, 4, 8, 32, 64, 128]
    # resolution reached at once: nothing to refine
    assert _simulate_p([8, 9], lambda s, i: s >= 9, 2, 3, 1.25)[1] == [[8, 9]]


def test_probe_stops_at_the_first_success_chunk_by_chunk():
    assert ad.probe([None] * 4, [], 2) == (ad.PENDING, [0, 1])
    assert ad.probe([False, False, None, None], [], 2) == (ad.PENDING, [2, 3])
    assert ad.probe([False, None, True, None], [], 2) == (ad.SUCCESS, [])
    assert ad.probe([False] * 4, [False], 2) == (ad.FAILURE, [])
    assert ad.probe([None] * 4, [True], 2) == (ad.SUCCESS, [])  # a P seed is a witness too


def _simulate_search(grid, p_rule, s_rule, runs, chunk, resolution):
    done: dict[tuple[int, int], bool] = {}
    while True:
        res = ad.search_phase(grid, lambda s: any(p_rule(s) for _ in range(2)),
                              lambda s: ad.probe([done.get((s, i)) for i in range(runs)], [], chunk), resolution)
        if res["status"] != ad.PENDING:
            return res, done
        status, idx = ad.probe([done.get((res["need"], i)) for i in range(runs)], [], chunk)
        for i in idx:
            done[(res["need"], i)] = s_rule(res["need"], i)


def test_search_walks_down_then_bisects():
    # P seeds succeed from 16 (first on the grid: 32); search runs from 11 (only the last of 4 runs)
    res, done = _simulate_search([2, 8, 32, 128], lambda s: s >= 16, lambda s, i: s >= 11 and i == 3, 4, 2, 1.05)
    assert res["probes"] == [(8, "failure"), (16, "success"), (11, "success"), (9, "failure"), (10, "failure")]
    assert (res["lo"], res["hi"]) == (10, 11)
    assert sorted(i for (s, i) in done if s == 16) == [0, 1, 2, 3]  # the success is in the second chunk
    # every run succeeds everywhere: at or below the smallest size
    res, _ = _simulate_search([2, 8, 32], lambda s: True, lambda s, i: True, 2, 2, 1.25)
    assert (res["lo"], res["hi"], res["probes"]) == (None, 2, [])
    # nothing ever succeeds: the largest size is probed, s_min is above the grid
    res, done = _simulate_search([2, 8, 32], lambda s: False, lambda s, i: False, 3, 1, 1.25)
    assert (res["lo"], res["hi"], res["probes"]) == (32, None, [(32, "failure")]) and len(done) == 3
    # the walk down continues while the search succeeds below the P seeds' first success
    res, _ = _simulate_search([2, 4, 8, 16], lambda s: s >= 16, lambda s, i: s >= 4, 1, 1, 1.25)
    assert res["probes"] == [(8, "success"), (4, "success"), (2, "failure"), (3, "failure")]
    assert (res["lo"], res["hi"]) == (3, 4)


# ---------------------------------------------------------------- the planner on synthetic outcomes
TINY = {
    "experiment": {"name": "tiny_price", "sizes": {"min": 1, "max": 8, "factor": 2}, "seeds": 2, "refine_rounds": 1,
                   "resolution": 1.2, "search": {"seeds": 1, "lrs": [0.05, 0.1], "steps": 40, "chunk": 1},
                   "bootstrap": {"samples": 200}, "workers": 2, "slurm_args": ["--time=00:10:00"],
                   "tasks": [{"name": "t3", "target": {"metric": "test_loss", "max": 0.12}},
                             {"name": "t3-loose", "target": {"metric": "test_loss", "max": 0.3}}],
                   "kinds": [{"law": "bernoulli", "degree": 2}, {"law": "full"}]},
    "train": {"model": {"base": {"builder": "mlp", "in_dim": 3, "hidden_dims": [1], "out_dim": 1,
                                 "activation": "tanh"}},
              "data": {"n_train": 128, "n_test": 64, "teacher_size": 3, "teacher_degree": 2, "label_noise": 0.05},
              "train": {"steps": 20, "batch_size": 32, "lr": 0.05, "log_every": 5, "eval_every": 10},
              "wandb": {"mode": "disabled"}},
}


def rule(cell: dict) -> float:
    """A synthetic test loss: P seeds succeed from size 5 (full) / 7 (sparse); the longer search runs
    from 3 (full) / 4 (sparse); success is 0.1 (<= 0.12), failure 0.2 (<= 0.3 for the loose task)."""
    full = cell["law"] == "full"
    start = (5 if full else 7) if cell["steps"] == 20 else (3 if full else 4)
    return 0.1 if cell["size"] >= start else 0.2


def fake_result(cell: dict) -> dict:
    keep = {k: v for k, v in cell.items() if k not in ("argv", "target", "extras")}
    return {**keep, "test_loss": rule(cell), "train_loss": 0.0, "wall_s": 1.0}


def make_ctx(tmp_path: Path, cfg: dict | None = None) -> dict:
    cfg = copy.deepcopy(cfg or TINY)
    cfg["experiment"]["out"] = str(tmp_path / "out")
    path = tmp_path / "price.yaml"
    path.write_text(yaml.safe_dump(cfg))
    section, train, overrides, stem = read_experiment(path, [])
    return price_plan.parse(section, stem, train, overrides)


def simulate(ctx: dict) -> tuple[list, dict, list[list[str]]]:
    results: dict[str, dict] = {}
    rounds = []
    while True:
        states, need = price_plan.plan_pairs(ctx, results)
        if not need:
            return states, results, rounds
        rounds.append([c["id"] for c in need])
        for c in need:
            assert c["id"] not in results  # never asked twice
            results[c["id"]] = fake_result(c)


def test_planner_rounds_on_synthetic_outcomes(tmp_path):
    ctx = make_ctx(tmp_path)
    states, results, rounds = simulate(ctx)
    assert simulate(ctx)[2] == rounds  # deterministic replay
    assert len(rounds) == 6  # grid; refinement + walk down (one run per chunk); the probes' second runs; ...
    setups = {cid.split("/")[0] for cid in results}
    assert len(setups) == 1  # the two targets share every training
    assert not any(cid.split("/")[1].startswith("bernoulli-d2_s1_") or cid.split("/")[1].startswith("bernoulli-d2_s2_")
                   for cid in results)  # degree 2 at s <= 2 keeps every pair: the full lift's cells
    rows = {(r["task"], r["kind"]): r for r in price_report.tables(ctx, states)["price"]}
    full, d2 = rows[("t3", "full")], rows[("t3", "bernoulli-d2")]
    # full: P 0 at 1, 2, 4; 1 at 8; one refinement adds 6 (1): s_q between 4 and 6; the search walks down
    # from 8: 4 succeeds, 2 fails, 3 succeeds
    assert full["sizes"] == 5 and (full["s_min"], full["s_min_lo"]) == (3, 2)
    assert full["s_50"] == pytest.approx(math.sqrt(24)) and full["s_90"] == pytest.approx(4 * 1.5 ** 0.9)
    assert (full["s_90_bracket_lo"], full["s_90_bracket_hi"]) == (4, 6)
    assert full["ratio"] == pytest.approx(4 * 1.5 ** 0.9 / 3)
    # degree 2: sparse from size 3 on; refinement adds 6 (0): s_q between 6 and 8; s_min 4 (3 is sparse and fails)
    assert (d2["s_min"], d2["s_min_lo"], d2["s_min_task"]) == (4, 3, 3)
    assert d2["s_90"] == pytest.approx(6 * (8 / 6) ** 0.9) and d2["ratio_task"] == pytest.approx(d2["s_90"] / 3)
    loose = rows[("t3-loose", "bernoulli-d2")]
    assert loose["s_min"] == 1 and loose["s_min_note"].startswith("below") and loose["s_90_censored"] == "below"
    assert all(r["complete"] for r in rows.values())
    # a result with another fingerprint does not count: that cell is needed again
    cid = rounds[0][0]
    results[cid] = {**results[cid], "fingerprint": "stale"}
    assert [c["id"] for c in price_plan.plan_pairs(ctx, results)[1]] == [cid]


def test_report_and_brute_force_comparison_on_synthetic_outcomes(tmp_path):
    ctx = make_ctx(tmp_path)
    states, results, _ = simulate(ctx)
    t = price_report.report(ctx, states)
    with open(Path(ctx["out"]) / "price.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["kind"]) for r in table] == [(r["task"], r["kind"]) for r in t["price"]]
    assert float(table[1]["s_90"]) == pytest.approx(t["price"][1]["s_90"])  # figures and csv: the same rows
    for name in ("s90_vs_smin", "ratio_vs_degree", "p_collapse", "p_curves"):
        assert (Path(ctx["out"]) / "figures" / f"{name}.png").stat().st_size > 1000
    assert "test_loss <= 0.12" in (Path(ctx["out"]) / "price.md").read_text()
    task = ctx["tasks"][0]
    cells = price_report.brute_cells(ctx, task)
    assert {c["size"] for c in cells} == set(range(1, 9))
    for c in cells:
        results.setdefault(c["id"], fake_result(c))
    rows = {r["kind"]: r for r in price_report.compare(ctx, task, states, results)}
    assert rows["full"]["brute_s_min"] == 3 and rows["bernoulli-d2"]["brute_s_min"] == 4
    assert all(r["agree_s_min"] and r["s_50_in_ci"] and r["s_90_in_ci"] for r in rows.values())
    assert rows["full"]["brute_s_50"] == pytest.approx(math.sqrt(20))  # dense: P jumps between 4 and 5


def test_sparse_kind_at_full_density_is_the_full_lift():
    cfg = load_config(None, ["model.base.in_dim=3", "model.base.hidden_dims=[1,1]", "model.lift.size=4",
                             "model.lift.degree=4", "model.lift.seed=5", "model.weight_seed=7"])
    base, sparse = cfg.build_lift()
    cfg_full = load_config(None, ["model.base.in_dim=3", "model.base.hidden_dims=[1,1]", "model.lift.size=4",
                                  "model.lift.law=full", "model.weight_seed=7"])
    _, full = cfg_full.build_lift()
    a = LiftedNetwork(base, sparse, seed=7)
    b = LiftedNetwork(base, full, seed=7)
    for e in base.edges:
        assert all(torch.equal(x, y) for x, y in zip(a.edge_index(e.key), b.edge_index(e.key)))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    task = {"setup": "x", "cfg": cfg}
    assert price_plan.is_full_at(task, {"law": "bernoulli", "degree": 4}, 4)
    assert not price_plan.is_full_at(task, {"law": "bernoulli", "degree": 4}, 5)
    assert price_plan.is_full_at(task, {"law": "fixed_degree", "degree": 6}, 6)


def test_cost_model_counts_the_lift_parameters(tmp_path):
    ctx = make_ctx(tmp_path)
    task = ctx["tasks"][0]
    assert cost.expected_params(task, "full", None, 4) == 32  # 4 x 3 inputs + 4 x 4 edges + 4 readout
    assert cost.expected_params(task, "bernoulli", 2, 4) == 24  # 12 + 4 x 2 + 4
    cell = price_plan.make_cell(ctx, task, ctx["kinds"][1], 4, 0)
    c = ctx["cost"]
    want = c["startup_s"] + 20 * (c["step_s"] + 32 * 32 / c["param_samples_per_s"])  # 20 steps, batch 32
    assert cost.predict(ctx, cell) == pytest.approx(want)
    line = cost.describe(ctx, [cell], {})
    assert "core-hours" in line and "whole experiment at most" in line and "model:" in line
    assert len(cost.bound(ctx)) >= len(simulate(ctx)[1])  # the bound covers what the experiment ran


@pytest.mark.parametrize("change, key", [
    ({"tasks": [{"name": "a b", "target": {"metric": "test_loss", "max": 0.1}}]}, "experiment.tasks[0].name"),
    ({"tasks": [{"name": "a", "target": {"metric": "test_accuracy", "min": 0.9}}]}, "train.loss=cross_entropy"),
    ({"tasks": [{"name": "a", "target": {"metric": "test_loss", "max": 0.1}, "train": {"train": {"stepz": 1}}}]},
     "experiment.tasks[0].train"),
    ({"sizes": {"min": 8, "max": 2}}, "experiment.sizes"),
    ({"levels": [0.5, 1.5]}, "experiment.levels"),
    ({"search": {"lrs": []}}, "experiment.search.lrs"),
    ({"kinds": [{"law": "full", "max_size": 0}]}, "experiment.kinds[0].max_size"),
    ({"resolution": 1}, "experiment.resolution"),
])
def test_bad_price_config_is_one_line(tmp_path, change, key, capsys):
    from randlift_dist.experiments import threshold

    cfg = copy.deepcopy(TINY)
    cfg["experiment"].update(out=str(tmp_path / "out"), **change)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert threshold.main(["--config", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "out").exists()


def test_slurm_rounds_resume_and_aggregate(tmp_path, capsys):
    from randlift_dist.experiments import threshold

    ctx = make_ctx(tmp_path)
    cfgfile = str(tmp_path / "price.yaml")
    out = Path(ctx["out"])

    def slurm() -> tuple[str, dict]:
        assert threshold.main(["--config", cfgfile, "--slurm"]) == 0
        cmd = capsys.readouterr().out.strip().splitlines()[-1]
        pdir = cmd.split("EXPERIMENT_DIR=")[1].split()[0]
        return cmd, json.loads((Path(pdir) / "plan.json").read_text())

    def finish(cells):
        for c in cells:
            path = out / "cells" / c["id"] / "result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fake_result(c)))

    seen, expected = [], simulate(ctx)[2]
    for r in range(len(expected)):
        cmd, plan = slurm()
        n = len(plan["cells"])
        assert (f"EXPERIMENT_DIR={out}/rounds/{r:03d} NCELLS={n} CELL_OFFSET=0 OMP_NUM_THREADS=1 "
                f"sbatch --array=0-{n - 1}%2") in cmd
        assert "--time=00:10:00" in cmd and cmd.endswith("slurm/sweep.sbatch")
        if r == 1 and n > 1:  # an interrupted round: all but one cell finished; the same round is reused
            finish(plan["cells"][1:])
            cmd2, plan2 = slurm()
            assert f"rounds/{r:03d} NCELLS={n}" in cmd2 and plan2["cells"] == plan["cells"]
        finish(plan["cells"])
        seen.append([c["id"] for c in plan["cells"]])
    assert seen == expected  # the same rounds as the planner's replay
    assert threshold.main(["--config", cfgfile, "--slurm"]) == 0  # complete: nothing to submit
    captured = capsys.readouterr()
    assert "sbatch" not in captured.out and "4 of 4 (task, kind) pairs complete" in captured.err
    assert (out / "price.csv").is_file() and (out / "figures" / "p_collapse.png").is_file()


def test_big_rounds_are_chained_arrays(tmp_path, monkeypatch):
    from randlift_dist.experiments import runner

    plan = {"experiment": {"name": "x", "workers": 3, "threads_per_worker": 2}, "out": "/o",
            "plan_dir": "/o/rounds/004",
            "cells": [{"id": str(i)} for i in range(5)]}
    cmds = runner.slurm_commands(plan, Path("/repo"), ["--gres=gpu:1"], max_array=2)
    assert [c[3] for c in cmds] == ["CELL_OFFSET=0", "CELL_OFFSET=2", "CELL_OFFSET=4"]
    assert [c[6] for c in cmds] == ["--array=0-1%3", "--array=0-1%3", "--array=0-0%3"]
    assert all(c[1:3] == ["EXPERIMENT_DIR=/o/rounds/004", "NCELLS=5"] and c[-2:] == ["--gres=gpu:1",
               "/repo/slurm/sweep.sbatch"] for c in cmds)
    # submission: each array depends on the previous one; --wait on the last (a fake sbatch records its arguments)
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\necho $(( $(wc -l < {tmp_path}/calls) + 100 ))\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert runner.submit(cmds, wait=True) == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("--parsable --array=0-1%3") and "--dependency" not in calls[0]
    assert calls[1].startswith("--parsable --dependency=afterany:101 --array=0-1%3")
    assert calls[2].startswith("--parsable --dependency=afterany:102 --wait --array=0-0%3")


# ---------------------------------------------------------------- the real command, tiny
REAL = copy.deepcopy(TINY)
REAL["experiment"].update({"sizes": [1, 2, 4], "seeds": 1, "kinds": [{"law": "full"}],
                           "brute_force": {"sizes": [1, 2, 3, 4]},
                           "search": {"seeds": 1, "lrs": [0.1], "steps": 40, "chunk": 1}})
REAL["experiment"]["tasks"][0]["target"]["max"] = 0.15


@pytest.mark.timeout(600)
def test_tiny_experiment_through_the_command(tmp_path):
    cfg = copy.deepcopy(REAL)
    out = tmp_path / "out"
    cfg["experiment"]["out"] = str(out)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "randlift_dist.experiments.threshold", "--config",
                               str(tmp_path / "p.yaml"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    proc = run()
    assert "round 000:" in proc.stderr and "| t3 |" in proc.stdout
    results = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
               for p in out.glob("cells/*/*/result.json")}
    # P(s) in the table = the cells' own test losses against each target
    with open(out / "p_curve.csv") as f:
        curve = list(csv.DictReader(f))
    for row in curve:
        eps = {"t3": 0.15, "t3-loose": 0.3}[row["task"]]
        runs = [r for r in results.values() if r["size"] == int(row["size"]) and r["steps"] == 20]
        assert int(row["n"]) == len(runs) == 1
        assert int(row["k"]) == sum(r["test_loss"] <= eps for r in runs)
        assert all(r["law"] == "full" and "distance" not in r and r["step"] == r["steps"] for r in runs)
    price = (out / "price.csv").read_text()
    mtimes = {k: (out / "cells" / k / "result.json").stat().st_mtime_ns for k in results}
    victim = sorted(results)[0]
    (out / "cells" / victim / "result.json").unlink()
    run()  # only the lost cell reruns, to the same numbers (the trainings are deterministic)
    after = {k: (out / "cells" / k / "result.json").stat().st_mtime_ns for k in results}
    assert {k for k in results if after[k] != mtimes[k]} == {victim}
    assert (out / "price.csv").read_text() == price
    proc = run("--brute-force", "t3")
    with open(out / "brute_force_t3.csv") as f:
        row = next(csv.DictReader(f))
    results = [json.loads(p.read_text()) for p in out.glob("cells/*/*/result.json")]
    dense = sorted({r["size"] for r in results if r["test_loss"] <= 0.15 and r["size"] <= 4})
    assert row["brute_s_min"] == (str(dense[0]) if dense else "")
    assert int(row["brute_sizes"]) == 4 and "brute force t3 full" in proc.stdout


# ---------------------------------------------------------------- one round per job array, on real SLURM
@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_rounds_as_chained_job_arrays_on_slurm(cluster, tmp_path):
    cfg = copy.deepcopy(REAL)
    out = tmp_path / "out"
    cfg["experiment"].update(out=str(out), sizes=[1, 2], seeds=1, max_array=1, tasks=cfg["experiment"]["tasks"][:1])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    proc = cluster.run(sys.executable, "-m", "randlift_dist.experiments.threshold", "--config",
                       str(tmp_path / "p.yaml"), "--slurm", "--submit", "--drive", timeout=360,
                       env={"SBATCH_OUTPUT": f"{cluster.root}/out/price-%A_%a.out", "SBATCH_TIMELIMIT": "10"})
    assert "1 of 1 (task, kind) pairs complete" in proc.stderr, proc.stderr[-3000:] + cluster.job_logs()
    # round 0 holds the two P cells: two arrays of one cell (max_array=1), the second after the first
    plan = json.loads((out / "rounds" / "000" / "plan.json").read_text())
    assert len(plan["cells"]) == 2 and "CELL_OFFSET=1" in proc.stdout and "--dependency=afterany:" in proc.stderr
    logs = cluster.job_logs()
    assert all(f"cell {i} of 2" in logs for i in (0, 1))
    results = [json.loads(p.read_text()) for p in out.glob("cells/*/*/result.json")]
    assert {(r["size"], r["steps"]) for r in results} >= {(1, 20), (2, 20)}
    with open(out / "price.csv") as f:
        row = next(csv.DictReader(f))
    assert row["complete"] == "True" and int(row["runs"]) <= len(results)
