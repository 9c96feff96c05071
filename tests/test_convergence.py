"""The convergence experiment: a tiny grid through the real command (its regression results pinned
against the values the grid gave before targets existed), resume, a classification grid with an
accuracy target, Wilson intervals, the readout-only least-squares proxy, the distance travelled,
and config errors."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift
from randlift_dist.experiments import cell as cellmod
from randlift_dist.experiments.figures import wilson

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "experiment": {"name": "tiny", "sizes": [2, 4], "seeds": 2, "eps": 0.1, "workers": 2, "threads_per_worker": 1,
                   "kinds": [{"law": "bernoulli", "degree": 2}, {"law": "full"}]},
    "train": {"model": {"base": {"builder": "mlp", "in_dim": 3, "hidden_dims": [1], "out_dim": 1,
                                 "activation": "tanh"}},
              "data": {"n_train": 128, "n_test": 64, "teacher_size": 2, "teacher_degree": 1, "label_noise": 0.05},
              "train": {"steps": 20, "batch_size": 32, "lr": 0.05, "log_every": 5, "eval_every": 10},
              "wandb": {"mode": "disabled"}},
}


# The tiny grid's results as computed by the code before `experiment.target` existed (commit
# ec369a3, this machine, OMP_NUM_THREADS=1). The regression analysis must not change them: the
# same trainings, the same whole-set MSE, the same proxy and distance, the same success flags.
GOLDEN_FIELDS = ("params", "edges", "train_loss", "test_loss", "reached", "step_test_eps", "reached_train",
                 "step_train_eps", "distance", "proxy_train_loss", "proxy_test_loss")
GOLDEN = {
    "bernoulli-d2_s2_seed0": (12, 6, 0.1707571669152836, 0.3408680734906253, False, None, False, None,
                              0.6597089415188422, 0.4653000766817512, 0.625648666941445),
    "bernoulli-d2_s2_seed1": (12, 6, 0.08161764471860068, 0.08245081312517577, True, 20, True, 15,
                              0.6382073967721827, 0.2087843931422268, 0.2625487260184103),
    "bernoulli-d2_s4_seed0": (24, 12, 0.14223773617193206, 0.21442798240687824, False, None, False, None,
                              0.6168920219335606, 0.1952115747871555, 0.26714242880719824),
    "bernoulli-d2_s4_seed1": (27, 15, 0.10202493555802938, 0.10718216915209437, False, None, False, None,
                              0.623295485789557, 0.04202365544915091, 0.06162910372056103),
    "full_s2_seed0": (12, 6, 0.1707571669152836, 0.3408680734906253, False, None, False, None,
                      0.6597089415188422, 0.4653000766817512, 0.625648666941445),
    "full_s2_seed1": (12, 6, 0.08161764471860068, 0.08245081312517577, True, 20, True, 15,
                      0.6382073967721827, 0.2087843931422268, 0.2625487260184103),
    "full_s4_seed0": (32, 20, 0.17194291587659077, 0.18828231764070666, False, None, False, None,
                      0.6035793587787, 0.19521157586890975, 0.2671409493924193),
    "full_s4_seed1": (32, 20, 0.14124058779097814, 0.14355198603975672, False, None, False, 15,
                      0.7207564370564342, 0.04202366218672497, 0.061629176782416244),
}


def check_golden(out: Path) -> None:
    for cid, want in GOLDEN.items():
        r = json.loads((out / "cells" / cid / "result.json").read_text())
        for key, w in zip(GOLDEN_FIELDS, want):
            if isinstance(w, float):
                assert r[key] == pytest.approx(w, rel=1e-5, abs=1e-9), (cid, key, r[key], w)
            else:
                assert r[key] == w, (cid, key, r[key], w)


def run_cli(tmp_path: Path, cfg: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "randlift_dist.experiments.convergence", "--config", str(path),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def result_times(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "cells").glob("*/result.json"))}


@pytest.mark.timeout(400)
def test_tiny_grid_end_to_end_and_resume(tmp_path):
    out = tmp_path / "out"
    cfg = copy.deepcopy(TINY)
    cfg["experiment"]["out"] = str(out)
    proc = run_cli(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 8, lines
    ids = {line.split(",")[0] for line in lines[1:]}
    assert ids == {f"{k}_s{s}_seed{i}" for k in ("bernoulli-d2", "full") for s in (2, 4) for i in (0, 1)}
    check_golden(out)
    for name in ("p_reach", "final_loss", "distance"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4
    r = json.loads((out / "cells" / "full_s4_seed1" / "result.json").read_text())
    assert r["steps"] == r["step"] == 20 and r["size"] == 4 and r["seed"] == 1 and r["law"] == "full"
    assert r["reached"] == (r["test_loss"] <= 0.1) and r["metric"] == "test_loss" and r["target"] == "test_loss <= 0.1"
    assert r["value"] == r["test_loss"] and "test_accuracy" not in r
    if r["reached"]:  # the final evaluation (step 20) is logged, so a success has a first step
        assert r["step_test_eps"] is not None and r["step_test_eps"] <= 20
    assert r["distance"] > 0 and r["params"] > 0 and 0 <= r["proxy_train_loss"] < 2
    # the trainer's last logged test loss is the analysis's test loss (same weights, same data)
    last = [json.loads(x) for x in (out / "cells" / "full_s4_seed1" / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(last[-1]["test_loss"], r["test_loss"], rel_tol=1e-4)

    before = result_times(out)
    assert len(before) == 8
    proc = run_cli(tmp_path, cfg)  # everything done: no cell reruns
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 already done" in proc.stderr
    assert result_times(out) == before

    (out / "cells" / "bernoulli-d2_s4_seed0" / "result.json").unlink()
    (out / "cells" / "bernoulli-d2_s4_seed0" / "stale_marker").write_text("left by a crashed run")
    proc = run_cli(tmp_path, cfg)  # one cell lost its result: only it reruns
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = result_times(out)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {"bernoulli-d2_s4_seed0"}, changed
    assert len((out / "results.csv").read_text().splitlines()) == 9
    assert not (out / "cells" / "bernoulli-d2_s4_seed0" / "stale_marker").exists()  # rerun from scratch

    proc = run_cli(tmp_path, cfg, "--slurm", "train.steps=10")  # other settings: every cell is stale
    assert proc.returncode == 0 and "(0 already done)" in proc.stderr


@pytest.mark.parametrize("change, key", [
    ({"sizes": [0, 4]}, "experiment.sizes"),
    ({"kinds": [{"law": "dense"}]}, "experiment.kinds[0].law"),
    ({"kinds": [{"law": "bernoulli"}]}, "experiment.kinds[0].degree"),
    ({"eps": -1}, "experiment.eps"),
    ({"colour": "red"}, "experiment.colour"),
    ({"workers": 0}, "experiment.workers"),
    ({"target": {"metric": "test_loss", "max": 0.1}}, "experiment.eps and experiment.target"),
    ({"eps": None, "target": {"metric": "test_loss", "min": 0.1}}, "experiment.target"),
    ({"eps": None, "target": {"metric": "test_acc", "min": 0.9}}, "experiment.target.metric"),
    ({"eps": None, "target": {"metric": "test_accuracy", "min": 0.9}}, "train.loss=cross_entropy"),
    ({"eps": None}, "experiment.target is missing"),
])
def test_malformed_experiment_config_exits_2(tmp_path, change, key):
    cfg = copy.deepcopy(TINY)
    cfg["experiment"].update(out=str(tmp_path / "out"), **change)
    proc = run_cli(tmp_path, cfg, timeout=60)
    assert proc.returncode == 2, proc.stderr
    msg = proc.stderr.strip().splitlines()
    assert len(msg) == 1 and key in msg[0], msg
    assert not (tmp_path / "out").exists()


def test_malformed_training_section_and_slurm_plan(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["experiment"]["out"] = str(tmp_path / "out")
    proc = run_cli(tmp_path, cfg, "train.stepz=3", timeout=60)
    assert proc.returncode == 2 and "train.stepz" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(tmp_path, cfg, "--slurm", "experiment.seeds=[0,1,2]", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--array=0-11%2" in proc.stdout and "sweep.sbatch" in proc.stdout and "NCELLS=12" in proc.stdout
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert [c["id"] for c in plan["cells"]][:3] == ["bernoulli-d2_s2_seed0", "bernoulli-d2_s2_seed1",
                                                      "bernoulli-d2_s2_seed2"]
    assert not list((tmp_path / "out" / "cells").iterdir())  # --slurm runs nothing here


CLASSIFY = {
    "experiment": {"name": "classify", "sizes": [4], "seeds": 2, "workers": 2,
                   "target": {"metric": "test_accuracy", "min": 0.6}, "kinds": [{"law": "bernoulli", "degree": 2}]},
    "train": {"model": {"base": {"builder": "mlp", "in_dim": 3, "hidden_dims": [1], "out_dim": 3,
                                 "activation": "tanh"}},
              "data": {"n_train": 128, "n_test": 64, "teacher_size": 4, "teacher_degree": 2},
              "train": {"steps": 20, "batch_size": 32, "lr": 0.05, "loss": "cross_entropy", "eval_every": 10},
              "wandb": {"mode": "disabled"}},
}


@pytest.mark.timeout(300)
def test_classification_grid_with_an_accuracy_target(tmp_path):
    out = tmp_path / "out"
    cfg = copy.deepcopy(CLASSIFY)
    cfg["experiment"]["out"] = str(out)
    proc = run_cli(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        r = json.loads((out / "cells" / f"bernoulli-d2_s4_seed{seed}" / "result.json").read_text())
        last = [json.loads(x) for x in (out / "cells" / r["id"] / "metrics.jsonl").read_text().splitlines()][-1]
        # whole-set metrics of the final weights: the trainer's own final evaluation (128 <= eval_train_max rows)
        for key in ("test_accuracy", "train_accuracy", "test_loss", "train_loss"):
            assert r[key] == pytest.approx(last[key], rel=1e-5), key
        assert r["test_accuracy"] * 64 == pytest.approx(round(r["test_accuracy"] * 64))
        assert r["metric"] == "test_accuracy" and r["target"] == "test_accuracy >= 0.6"
        assert r["reached"] == (r["test_accuracy"] >= 0.6) and r["value"] == r["test_accuracy"]
        assert r["reached_train"] == (r["train_accuracy"] >= 0.6)
        assert "proxy_test_loss" not in r and "eps" not in r and r["distance"] > 0  # regression-only extras skipped
    summary = (out / "summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    row = dict(zip(header, summary[1].split(",")))
    assert row["target"] == "test_accuracy >= 0.6" and row["median_proxy_test_loss"] == ""
    assert float(row["median_test_accuracy"]) == pytest.approx(float(row["median_value"]))
    assert (out / "figures" / "final_accuracy.png").stat().st_size > 1000
    assert not (out / "figures" / "final_loss.png").exists()


def test_wilson_against_hand_computed_values():
    # 3 of 10, z = 1.96: centre (0.3 + 1.9208/10) / 1.38416 = 0.35551,
    # half-width 1.96 sqrt(0.021 + 0.0009604) / 1.38416 = 0.24772 -> [0.1078, 0.6032]
    p, lo, hi = wilson(3, 10)
    assert p == 0.3 and abs(lo - 0.1078) < 1e-4 and abs(hi - 0.6032) < 1e-4
    # 0 of 8: lo = 0, hi = z^2 / (n + z^2) = 3.8415 / 11.8415
    p, lo, hi = wilson(0, 8)
    assert p == 0 and lo == 0 and abs(hi - 3.8415 / 11.8415) < 1e-4
    p, lo, hi = wilson(8, 8)  # symmetric
    assert p == 1 and hi == 1 and abs(lo - 8 / 11.8415) < 1e-4
    with pytest.raises(ValueError, match="n=0"):
        wilson(0, 0)


def _net(readout_init: str = "zero", size: int = 16) -> LiftedNetwork:
    base = BaseGraph.mlp(3, [2], 1, "tanh")
    lift = random_sparse_lift(base, size=size, degree=3, seed=1)
    return LiftedNetwork(base, lift, readout_scale="sqrt", seed=2, readout_init=readout_init)


def test_readout_proxy_matches_numpy_lstsq_and_fits_a_realisable_target():
    torch.manual_seed(0)
    net = _net()
    x_train, x_test = torch.randn(200, 3), torch.randn(50, 3)
    y_train, y_test = torch.randn(200, 1), torch.randn(50, 1)
    ds = SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    c = cellmod.readout_constant(net, "sqrt")
    assert c == pytest.approx(1 / math.sqrt(16))
    got = cellmod.readout_proxy(net, ds, c)
    # independent features: the output fibre's activations, one column per lifted output vertex
    with torch.no_grad():
        f_train = net.activations(x_train)["y"][:, 0, :].T.double().numpy() * c  # [200, 16]
        f_test = net.activations(x_test)["y"][:, 0, :].T.double().numpy() * c
    w, *_ = np.linalg.lstsq(f_train, y_train.double().numpy(), rcond=None)
    want_train = float(((f_train @ w - y_train.numpy()) ** 2).mean())
    want_test = float(((f_test @ w - y_test.numpy()) ** 2).mean())
    assert got["proxy_train_loss"] == pytest.approx(want_train, rel=1e-5)
    assert got["proxy_test_loss"] == pytest.approx(want_test, rel=1e-4)
    assert 0.3 < got["proxy_train_loss"] < 1.0  # noise targets: a real residual, not zero

    teacher = _net("normal")  # same features, a random readout: its outputs are fitted exactly
    with torch.no_grad():
        ds.y_train, ds.y_test = teacher(x_train), teacher(x_test)
    got = cellmod.readout_proxy(net, ds, c)
    assert got["proxy_train_loss"] < 1e-9 and got["proxy_test_loss"] < 1e-9


def test_distance_counts_only_non_readout_weights():
    net0, net_t = _net(), _net()
    with torch.no_grad():
        for name, p in net_t.named_parameters():
            p.mul_(1.5) if not name.startswith("readouts.") else p.add_(100.0)
    d, norm = cellmod.distance(net0, net_t)
    assert d == pytest.approx(0.5, rel=1e-6)
    want = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for n, p in net0.named_parameters()
                         if not n.startswith("readouts.")))
    assert norm == pytest.approx(want, rel=1e-9)


def test_first_step_reaching_eps():
    records = [{"step": 0, "test_loss": 1.0}, {"step": 5, "loss": 0.2}, {"step": 10, "loss": 0.05, "test_loss": 0.3},
               {"step": 20, "loss": float("nan"), "test_loss": 0.04}]
    assert cellmod.first_step(records, "test_loss", 0.1) == 20
    assert cellmod.first_step(records, "loss", 0.1) == 10
    assert cellmod.first_step(records, "loss", 0.01) is None
