"""Regenerated topology (`model.topology=regenerate`): no stored edge indices, the edges drawn
again from the lift's seed chunk by chunk. One process here (the sharded invariants are in
`test_sharded.py`): same parameters, edges, outputs and gradients as the stored topology, on
chunks as small as one sampling block, with empty rows, vector and scalar vertices; the plan holds
no per-edge array; the trainer resumes across topologies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch import assert_curves_match, launch, losses
from randlift_dist import BaseGraph, LiftedNetwork, build_plan, random_sparse_lift
from randlift_dist.ops import workspace as ws
from randlift_dist.ops.regen import regenerated_aggregate

BASES = {
    "scalar": lambda: BaseGraph.mlp(3, [1, 1, 1], 1, "tanh"),
    "resid": lambda: BaseGraph.residual_mlp(4, 4, 2, 2, "gelu"),
    "mixed": lambda: BaseGraph.mlp(3, [5, 1, 3], 2, "relu"),
}


def pair(name: str, dtype=torch.float64, degree=5.0, size=700):
    base = BASES[name]()
    lift = random_sparse_lift(base, size, degree, seed=3, block_size=64)
    kw = dict(readout_init="normal", dtype=dtype)
    return base, lift, LiftedNetwork(base, lift, **kw), LiftedNetwork(base, lift, build_plan(lift, topology="regenerate"), **kw)


def run(net, x):
    x = x.clone().requires_grad_()
    out = net(x)
    (out.pow(2).sum() + out.sum()).backward()
    return out.detach(), x.grad, {k: p.grad for k, p in net.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 1 << 23], ids=["one-block-chunks", "default-chunks"])
@pytest.mark.parametrize("name", sorted(BASES))
def test_regenerated_equals_stored(name, chunk, monkeypatch):
    monkeypatch.setattr(ws, "REGEN_CHUNK_ELEMS", chunk)
    monkeypatch.setattr(ws, "REGEN_CHUNK_EDGES", 1 if chunk == 1 else ws.REGEN_CHUNK_EDGES)
    base, lift, a, b = pair(name)
    for (k, p), (k2, q) in zip(a.named_parameters(), b.named_parameters()):
        assert k == k2 and torch.equal(p, q), f"initial {k} differs"
    for e in base.edges:
        for s, t in zip(a.edge_index(e.key), b.edge_index(e.key)):
            assert torch.equal(s, t), f"edges of {e} differ"
    x = torch.randn(7, base.in_dim, dtype=torch.float64)
    oa, ga, pa = run(a, x)
    ob, gb, pb = run(b, x)
    torch.testing.assert_close(ob, oa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-10)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {k}: {m}")


POSITIONS = {  # conv (scalar and vector members), pooling, flatten; attention with a token input
    "conv": lambda: BaseGraph.cnn1d(11, 2, [1, 3], 2, kernel=[3, 2], stride=[1, 2], head="flatten"),
    "attention": lambda: BaseGraph.transformer(6, 4, 3, 2, tokens=7, mixer_kernel=3, readout="mean"),
}


@pytest.mark.parametrize("chunk", [1, 1 << 23], ids=["one-block-chunks", "default-chunks"])
@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_regenerated_equals_stored_with_positions(name, chunk, monkeypatch):
    """Conv, pooling and attention edges (and edges out of token ids) on the regenerated topology:
    the same parameters, outputs and gradients as the stored topology."""
    monkeypatch.setattr(ws, "REGEN_CHUNK_ELEMS", chunk)
    monkeypatch.setattr(ws, "REGEN_CHUNK_EDGES", 1 if chunk == 1 else ws.REGEN_CHUNK_EDGES)
    base = POSITIONS[name]()
    lift = random_sparse_lift(base, 13, 3, seed=3, block_size=4)
    kw = dict(readout_init="normal", dtype=torch.float64)
    a, b = LiftedNetwork(base, lift, **kw), LiftedNetwork(base, lift, build_plan(lift, topology="regenerate"), **kw)
    for (k, p), (k2, q) in zip(a.named_parameters(), b.named_parameters()):
        assert k == k2 and torch.equal(p, q), f"initial {k} differs"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, base.in_dim, generator=g, dtype=torch.float64)
    if base.vertices["x"].tokens is not None:
        x = torch.randint(0, base.vertices["x"].tokens, x.shape, generator=g).double()
    oa, ga, pa = run(a, x)
    ob, gb, pb = run(b, x)
    torch.testing.assert_close(ob, oa, rtol=1e-12, atol=1e-12)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {k}: {m}")


def test_float32_scalar_spmm_path_and_empty_rows():
    """Degree 0.5 (bernoulli): many targets without in-edges; float32 takes the MKL SpMM path."""
    base, lift, a, b = pair("scalar", torch.float32, degree=0.5)
    deg = b.plan.in_degrees(("h1", "h2"))
    assert (deg == 0).sum() > 100 and (deg > 0).sum() > 100
    x = torch.randn(16, base.in_dim)
    oa, ga, pa = run(a, x)
    ob, gb, pb = run(b, x)
    torch.testing.assert_close(ob, oa, rtol=1e-5, atol=1e-6)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mixed", "scalar"])
def test_single_gradients_and_reruns_bitwise(name):
    """Only the weight gradient, only the input gradient (vector and scalar paths); two runs
    give the same bits."""
    base, lift, _, b = pair(name)
    layer = b.edge_layer(("h1", "h2"))
    y = torch.randn(lift.n("h1"), base.dim("h1"), 5, dtype=torch.float64)
    w = layer.weight.detach().clone().requires_grad_()
    z = regenerated_aggregate(y, w, layer.blocks)
    gw, = torch.autograd.grad(z.sum(), w)
    yy = y.clone().requires_grad_()
    gy, = torch.autograd.grad(regenerated_aggregate(yy, w.detach(), layer.blocks).sum(), yy)
    ref_w, ref_y = w.detach().clone().requires_grad_(), y.clone().requires_grad_()
    src, dst = b.edge_index(("h1", "h2"))
    zr = torch.zeros_like(z).index_add(0, dst, torch.matmul(ref_w, ref_y[src]))
    gwr, gyr = torch.autograd.grad(zr.sum(), (ref_w, ref_y))
    torch.testing.assert_close(z, zr)
    torch.testing.assert_close(gw, gwr)
    torch.testing.assert_close(gy, gyr)
    z2 = regenerated_aggregate(y, w, layer.blocks)
    assert torch.equal(z, z2)


def test_plan_holds_no_edge_arrays():
    """Per base edge: block offsets only (O(blocks)), however many edges."""
    base = BASES["scalar"]()
    lift = random_sparse_lift(base, 20000, 16, seed=0, block_size=512)
    plan = build_plan(lift, topology="regenerate")
    for key, ep in plan.edges.items():
        assert ep.regenerated and ep.row_local is None and ep.col_local is None
        assert ep.blocks.blocks.size == lift.num_blocks(key[1])
        assert ep.n_edges == int(lift.in_degrees(key).sum())
    net = LiftedNetwork(base, lift, plan)
    assert all(layer.csr_local is None for layer in net.edges)


def test_unknown_topology_refused():
    base = BASES["scalar"]()
    lift = random_sparse_lift(base, 50, 2)
    with pytest.raises(ValueError, match="topology 'compressed'"):
        build_plan(lift, topology="compressed")


@pytest.mark.timeout(400)
def test_trainer_resumes_across_topologies_and_ranks(tmp_path):
    """A stored-topology run stopped at step 20 on one rank, finished regenerated on two
    lift-parallel ranks (torchrun): the curve of one uninterrupted stored run (the topology is
    not part of what a checkpoint must match; the rows are keyed by edge)."""
    common = ["train.steps=40", "checkpoint.every=20", "wandb.mode=disabled", "parallel.engine=torch",
              "train.eval_every=0", "train.log_every=1"]
    launch(tmp_path / "a", 1, *common, "train.stop_at=20")
    launch(tmp_path / "a", 2, *common, "model.topology=regenerate", "parallel.lift_parallel=2", timeout=300)
    launch(tmp_path / "b", 1, *common)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert max(a) == 40
    assert_curves_match(a, b, rtol=1e-5)


def test_estimator_models_regenerated_topology():
    """No index bytes, keys in order at checkpoints, and a smaller peak than the stored topology
    (whose indices outweigh the parameters at d = 1)."""
    from randlift_dist.config import load_config
    from randlift_dist.estimate import estimate

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_d1_regen.yaml")
    stored = estimate(load_config(cfg, ["model.topology=stored"]))
    regen = estimate(load_config(cfg))
    assert stored["indices_bytes"] > 40 * stored["params"]
    assert regen["indices_bytes"] < 0.01 * regen["params"]
    assert regen["peak_bytes_per_rank"] < 0.5 * stored["peak_bytes_per_rank"]
    assert 16 < regen["bytes_per_param"] < 26
