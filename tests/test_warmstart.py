"""Warm start (`model.init_from`): a trained small network lifted into a larger lift of the same base.

- From the base network (the identity lift) into random sparse lifts where every target has an
  in-edge over every base edge (fixed degree), and from a smaller lift into fully-connected ones:
  the same outputs (plain MLPs, and a base with conv, attention, a layer norm, pooling); the report
  says exact.
- Where targets have no in-edge (bernoulli, low degree) it is not exact, and the report counts
  exactly those targets (checked against the lift's in-degrees).
- `init_noise` adds that multiple of the fresh initial weights; errors name the path and the fix.
- End to end (the real entry point): a run of the base network, then a lifted run on 2 lift-parallel
  ranks started from it: its step-0 test loss is the small run's final one, and it trains on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch import launch, metrics
from randlift_dist import BaseGraph, Layout, LiftedNetwork, fully_connected_lift, random_sparse_lift
from randlift_dist import checkpoint as ckpt
from randlift_dist.config import ConfigError, load_config
from randlift_dist.warmstart import WarmStartError, warm_start

HYBRID = {
    "vertices": [
        {"name": "x", "dim": 2, "role": "input", "positions": [8]},
        {"name": "c", "dim": 3, "activation": "tanh", "bias": True},
        {"name": "a", "dim": 2, "kind": "attention", "bias": True},
        {"name": "s", "dim": 3, "norm": "layer", "bias": True, "activation": "gelu"},
        {"name": "y", "dim": 2, "role": "output"},
    ],
    "edges": [{"src": "x", "dst": "c", "kind": "conv", "kernel": 3, "padding": 1},
              {"src": "c", "dst": "a", "slot": "q"}, {"src": "c", "dst": "a", "slot": "k"},
              {"src": "x", "dst": "a", "slot": "v", "kind": "conv", "kernel": 3, "padding": 1},
              ["c", "s"], ["a", "s"], {"src": "s", "dst": "y", "kind": "pool", "pool": "avg", "kernel": 8}],
}
BASES = {"resid": lambda: BaseGraph.residual_mlp(3, 4, 2, 2, "tanh", bias=True),
         "hybrid": lambda: BaseGraph.from_dict({**HYBRID, "edges": HYBRID["edges"][:-1] + [
             {"src": "s", "dst": "y", "kind": "mean"}]})}


class _Engine:
    """What `checkpoint.save` reads from an engine, for a bare network (no optimizer)."""

    name = "torch"

    def __init__(self, net):
        self.net = net

    def moments(self, p):
        return {}

    def master_weight(self, p):
        return p


def trained(base, lift, tmp_path, readout_scale="sqrt", seed=0):
    """A network with random (non-initial) values everywhere, saved as a checkpoint: `(net, dir)`."""
    net = LiftedNetwork(base, lift, readout_init="normal", readout_scale=readout_scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    cfg = load_config(None, ["checkpoint.deepspeed_files=false"])
    cfg.model.base, cfg.model.readout_scale = base.to_dict(), readout_scale
    path = ckpt.save(tmp_path / "run" / "checkpoints", 7, cfg, lift, _Engine(net), Layout(), keep=1)
    return net, path


def x_for(base, n=6):
    return torch.randn(n, base.in_dim, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", sorted(BASES))
def test_from_the_base_network_is_exact_where_every_target_has_in_edges(name, tmp_path):
    base = BASES[name]()
    small, path = trained(base, fully_connected_lift(base, 1), tmp_path)
    big = LiftedNetwork(base, random_sparse_lift(base, 9, 3, seed=2, law="fixed_degree", block_size=4),
                        readout_scale="mean", seed=4)
    report = warm_start(big, path.parent.parent)  # the run directory: its newest checkpoint
    assert report["path"] == str(path) and not any(report["inexact"].values()), report
    with torch.no_grad():
        torch.testing.assert_close(big(x_for(base)), small(x_for(base)), rtol=1e-5, atol=1e-6)


def test_from_a_smaller_lift_into_fully_connected_lifts(tmp_path):
    base = BASES["hybrid"]()
    small, path = trained(base, random_sparse_lift(base, 3, 2, seed=1), tmp_path)
    for sizes in ({"c": 5, "a": 4, "s": 7, "y": 3}, 6):
        big = LiftedNetwork(base, fully_connected_lift(base, sizes), readout_scale="sum")
        report = warm_start(big, path)
        assert not any(report["inexact"].values()), report
        with torch.no_grad():
            torch.testing.assert_close(big(x_for(base)), small(x_for(base)), rtol=1e-5, atol=1e-6)


def test_inexact_targets_are_counted(tmp_path):
    base = BASES["resid"]()
    small, path = trained(base, fully_connected_lift(base, 1), tmp_path)
    lift = random_sparse_lift(base, 40, 0.7, seed=3)  # bernoulli: many targets without an in-edge
    big = LiftedNetwork(base, lift)
    report = warm_start(big, path)
    for e in base.edges:
        assert report["inexact"][str(e)] == int((lift.in_degrees(e) == 0).sum()), e
        assert report["targets"][str(e)] == lift.n(e.dst)
    assert sum(report["inexact"].values()) > 0
    with torch.no_grad():
        assert not torch.allclose(big(x_for(base)), small(x_for(base)), rtol=1e-3)


def test_init_noise_adds_the_fresh_weights(tmp_path):
    base = BASES["resid"]()
    _, path = trained(base, fully_connected_lift(base, 1), tmp_path)
    lift = random_sparse_lift(base, 7, 2, seed=0, law="fixed_degree")
    fresh, exact, noisy = (LiftedNetwork(base, lift, seed=3) for _ in range(3))
    warm_start(exact, path)
    warm_start(noisy, path, init_noise=0.25)
    for e in base.edges:
        torch.testing.assert_close(noisy.edge_weight(e.key) - exact.edge_weight(e.key),
                                   0.25 * fresh.edge_weight(e.key), rtol=1e-6, atol=1e-7)
    for v in base.vertices:
        if exact.bias(v) is not None:
            assert torch.equal(noisy.bias(v), exact.bias(v))


def test_errors_name_the_path_and_the_fix(tmp_path):
    base = BASES["resid"]()
    _, path = trained(base, random_sparse_lift(base, 5, 2, seed=0), tmp_path)
    other = BaseGraph.residual_mlp(3, 4, 3, 2, "tanh", bias=True)
    with pytest.raises(WarmStartError, match="another base network"):
        warm_start(LiftedNetwork(other, random_sparse_lift(other, 8, 2)), path)
    with pytest.raises(WarmStartError, match=r"larger fibres than this lift at \['h1', 'h2', 'y'\]"):
        warm_start(LiftedNetwork(base, random_sparse_lift(base, 4, 2)), path)
    with pytest.raises(WarmStartError, match="no checkpoint there"):
        warm_start(LiftedNetwork(base, random_sparse_lift(base, 8, 2)), tmp_path / "empty")
    with pytest.raises(ConfigError, match="model.init_from='/nonexistent': no such directory"):
        load_config(None, ["model.init_from=/nonexistent"])
    with pytest.raises(ConfigError, match="model.init_noise=-1.0: must be >= 0"):
        load_config(None, ["model.init_noise=-1"])


@pytest.mark.timeout(400)
def test_end_to_end_from_the_base_network(tmp_path):
    common = ["train.log_every=10", "train.eval_every=10", "wandb.mode=disabled", "parallel.engine=torch",
              "model.base.hidden_dims=[4,4]", "model.base.activation=tanh", "train.lr=0.02"]
    launch(tmp_path / "small", 1, *common, "model.lift.law=full", "model.lift.size=1", "train.steps=60")
    small = [r["test_loss"] for r in metrics(tmp_path / "small") if "test_loss" in r]
    proc = launch(tmp_path / "big", 2, *common, "model.lift.law=fixed_degree", "model.lift.size=24",
                  "model.lift.degree=3", "parallel.lift_parallel=2", f"model.init_from={tmp_path / 'small'}",
                  "model.init_noise=0.05", "train.steps=60", "train.lr=0.01", timeout=400)
    said = proc.stdout + proc.stderr
    assert "warm start from" in said and "exact (the same function at step 0)" in said, said[-3000:]
    big = [r["test_loss"] for r in metrics(tmp_path / "big") if "test_loss" in r]
    assert abs(big[0] - small[-1]) <= 0.02 * small[-1], (big[0], small[-1])  # init_noise 0.05: nearly equal
    assert big[-1] < 0.9 * big[0], big
    exact = launch(tmp_path / "exact", 1, *common, "model.lift.law=fixed_degree", "model.lift.size=24",
                   "model.lift.degree=3", f"model.init_from={tmp_path / 'small'}", "train.steps=1")
    first = [r["test_loss"] for r in metrics(tmp_path / "exact") if "test_loss" in r][0]
    assert np.isclose(first, small[-1], rtol=1e-5), (first, small[-1])
    assert "exact (the same function at step 0)" in exact.stdout + exact.stderr
