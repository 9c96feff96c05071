"""The estimator on bases whose vertices carry positions (conv, pooling, flatten, mean and select
heads, attention, layer norms, token inputs) against the real objects.

- parameters: `estimate()["params"]` equals `sum(p.numel())` of the real `LiftedNetwork` exactly
  (fixed-degree law) for conv1d, conv2d, attention / transformer (token and float inputs), pooled
  and flattened bases, and each edge's reported weight shape is the real weight's; within a few %
  for the Bernoulli law;
- exchange with positions: per edge, the halo and the bytes sent (a halo row is one source
  member's mapped rows, all positions) against the plan statistics of the sampled lift;
- activations with positions: the backward's saved tensors grow as B * P (doubling a conv
  base's length doubles them) and the estimate's peak grows with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import test_positions_train as tp
from randlift_dist import LiftedNetwork
from randlift_dist.config import load_config
from randlift_dist.estimate import estimate
from randlift_dist.planstats import plan_statistics

ROOT = Path(__file__).resolve().parents[1]
CNN1D = {"builder": "cnn1d", "length": 40, "channels": 1, "dims": [4, 4, 4], "out_dim": 10, "kernel": [5, 3, 3],
         "stride": 2, "padding": 1, "activation": "relu", "head": "flatten"}
BASES = {
    "cnn1d_flatten": (CNN1D, {"size": {"c1": 24, "c2": 24, "c3": 24, "y": 12},
                              "degree": {"x->c1": 1, "c1->c2": 4, "c2->c3": 4, "c3->y": 6}}),
    "cnn2d_mean": ({"builder": "cnn2d", "shape": [9, 8], "channels": 2, "dims": [2, 3], "out_dim": 2, "kernel": 3,
                    "stride": [1, 2], "head": "mean"}, {"size": 20, "degree": 3}),
    "cnn2d_pool": ({"vertices": [{"name": "x", "dim": 1, "role": "input", "positions": [8, 8]},
                                 {"name": "c", "dim": 3, "activation": "relu", "bias": True},
                                 {"name": "p", "dim": 2, "activation": "tanh"}, {"name": "y", "dim": 3, "role": "output"}],
                    "edges": [{"src": "x", "dst": "c", "kind": "conv", "kernel": [3, 1], "padding": [1, 0]},
                              {"src": "c", "dst": "p", "kind": "pool", "pool": "avg", "kernel": 2},
                              {"src": "p", "dst": "y", "kind": "flatten"}]}, {"size": 18, "degree": 3}),
    "conv_attention_pool": (tp.BASE, {"size": 30, "degree": 3}),
    "transformer_tokens": ({"builder": "transformer", "seq_len": 33, "tokens": 64, "width": 8, "head_dim": 8,
                            "mlp_dim": 16, "out_dim": 32, "depth": 1, "mixer_kernel": 3, "readout": "select"},
                           {"size": 16, "degree": 4}),
    "transformer_float": ({"builder": "transformer", "seq_len": 12, "in_dim": 3, "width": 8, "head_dim": 4,
                           "out_dim": 3, "depth": 2, "mixer_kernel": 3, "readout": "mean"}, {"size": 14, "degree": 3}),
}


def _write(tmp_path: Path, base: dict, lift: dict, **sections) -> str:
    cfg = {"model": {"base": base, "lift": {"block_size": 8, "seed": 1, **lift}}, "train": {"batch_size": 8},
           "data": {"n_train": 64, "n_test": 16}, "parallel": {"engine": "torch"}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "pos.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _network(path: str) -> LiftedNetwork:
    cfg = load_config(path)
    base, lift = cfg.build_lift()
    return LiftedNetwork(base, lift, out_dim=cfg.out_dim(base))


@pytest.mark.parametrize("name", sorted(BASES))
def test_parameters_exact(tmp_path, name):
    base_d, lift_d = BASES[name]
    path = _write(tmp_path, base_d, {**lift_d, "law": "fixed_degree"})
    net = _network(path)
    est = estimate(load_config(path))
    real = sum(p.numel() for p in net.parameters())
    assert est["params"] == real and est["params_per_rank"] == real
    shapes = {str(e): tuple(layer.weight.shape[1:]) for e, layer in zip(net.base.edges, net.edges)}
    for e in est["edges"]:
        assert (e["d_dst"], e["features"]) == shapes[e["edge"]]


@pytest.mark.parametrize("name", ["cnn1d_flatten", "transformer_float"])
def test_parameters_bernoulli_close(tmp_path, name):
    base_d, lift_d = BASES[name]
    size = {k: 4 * v for k, v in lift_d["size"].items()} if isinstance(lift_d["size"], dict) else 4 * lift_d["size"]
    path = _write(tmp_path, base_d, {**lift_d, "size": size, "law": "bernoulli", "seed": 2})
    real = sum(p.numel() for p in _network(path).parameters())
    assert estimate(load_config(path))["params"] == pytest.approx(real, rel=0.05)


@pytest.mark.parametrize("name", ["cnn1d_flatten", "conv_attention_pool"])
def test_halo_bytes_with_positions_match_plan_statistics(tmp_path, name):
    """Two lift-parallel ranks: each exchanging edge's mode and halo, and the bytes sent per sample
    (rows x the member's mapped values x 4 B), as the plan statistics count them on the sampled lift."""
    base_d, lift_d = BASES[name]
    size = {k: 40 * v for k, v in lift_d["size"].items()} if isinstance(lift_d["size"], dict) else 40 * lift_d["size"]
    path = _write(tmp_path, base_d, {**lift_d, "size": size, "law": "fixed_degree"},
                  parallel={"lift_parallel": 2, "exchange": "alltoall"})
    cfg = load_config(path)
    base, lift = cfg.build_lift()
    stats = plan_statistics(lift, 2, "block", "alltoall")
    est = estimate(cfg)
    by_edge = {e["edge"]: e for e in est["edges"]}
    exchanging = [s for s in stats["edges"] if s["mode"] != "none"]
    assert exchanging
    for s in exchanging:
        e = by_edge[s["edge"]]
        assert e["mode"] == s["mode"] and s["row_bytes"] == 4 * e["row_values"]
        assert e["halo_rows"] == pytest.approx(s["halo_rows"], rel=0.05)
    kinds = {base.edge(s["edge"]).kind for s in exchanging}
    assert kinds - {"linear"}, "no edge with a per-member map or positions exchanged"
    per_sample = est["exchange_bytes_forward_per_step"] / est["batch_per_replica"]
    assert per_sample == pytest.approx(stats["total"]["bytes_per_sample"]["sum"] / 2, rel=0.05)


def test_activations_scale_with_positions(tmp_path):
    """Doubling a conv base's length doubles what its forward keeps (every vertex has positions
    but y): the backward's peak grows by about as much, the parameters do not change."""
    est = []
    for length in (40, 80):
        path = _write(tmp_path, {**CNN1D, "length": length, "head": "mean"},
                      {**BASES["cnn1d_flatten"][1], "law": "fixed_degree"}, train={"batch_size": 64})
        est.append(estimate(load_config(path)))
    assert est[0]["params"] == est[1]["params"]
    assert est[1]["phases"]["backward"] > 1.8 * est[0]["phases"]["backward"]
