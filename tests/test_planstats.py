"""Plan statistics: internal consistency, equality with a real gloo run, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from randlift_dist import BaseGraph, random_sparse_lift
from randlift_dist.partition import make_partition
from randlift_dist.planstats import (ConfigError, lift_from_config_file, main, plan_statistics,
                                     rank_sources)


@pytest.fixture(scope="module")
def lift():
    base = BaseGraph.residual_mlp(3, 4, 3, 2, "tanh")  # skip edges, input edges, d_u = 3 and 4
    return random_sparse_lift(base, {"h1": 301, "h2": 250, "h3": 199, "y": 97}, 5, seed=3, block_size=64)


def _exchanging(s):
    return [e for e in s["edges"] if e["mode"] != "none"]


@pytest.mark.parametrize("strategy", ["block", "random", "graph"])
def test_totals_consistent(lift, strategy):
    P = 3  # no fibre size is divisible by 3
    s = plan_statistics(lift, P, strategy, "alltoall")
    owners = make_partition(lift, P, strategy)
    assert s["total"]["edges"] == sum(lift.edges(e)[0].size for e in lift.base.edges)
    assert s["total"]["vertices"] == sum(o.n for o in owners.values())
    for e in s["edges"]:
        assert len(e["bytes_per_rank"]) == P
        assert e["edges_per_rank"]["mean"] * P == pytest.approx(e["edges"])
        assert e["edges_per_rank"]["max"] >= e["edges_per_rank"]["mean"]
        assert 0 <= e["cut_fraction"] <= 1
        if e["edge"].startswith("x->"):  # input fibres are replicated: nothing exchanged
            assert e["mode"] == "none" and e["remote_edges"] == 0 and e["bytes_per_sample"]["sum"] == 0
        else:
            assert e["mode"] == "alltoall"
            assert e["bytes_per_sample"]["sum"] == e["lower_bound_bytes"] == e["halo_rows"] * e["row_bytes"]
            assert e["lower_bound_bytes"] <= e["allgather_bytes"]
    t = s["total"]
    assert t["bytes_per_sample"]["sum"] == t["lower_bound_bytes"] == sum(t["bytes_per_rank"]) > 0
    assert t["bytes_per_sample"]["max_rank"] == max(t["bytes_per_rank"])
    assert t["remote_edges"] == sum(e["remote_edges"] for e in s["edges"])


def test_world_size_one_exchanges_nothing(lift):
    s = plan_statistics(lift, 1, "block")
    assert {e["mode"] for e in s["edges"]} == {"none"}
    t = s["total"]
    assert t["cut_fraction"] == 0 and t["halo_rows"] == 0
    assert t["bytes_per_sample"] == {"sum": 0, "max_rank": 0}
    assert t["lower_bound_bytes"] == t["allgather_bytes"] == 0
    assert t["edges_per_rank"]["max"] == t["edges"]


def test_modes_and_allgather_volume(lift):
    P = 4
    ag = plan_statistics(lift, P, "block", "allgather")
    a2a = plan_statistics(lift, P, "block", "alltoall")
    for g, a in zip(_exchanging(ag), _exchanging(a2a)):
        assert g["mode"] == "allgather"
        assert g["bytes_per_sample"]["sum"] == g["allgather_bytes"] == P * (P - 1) * g["max_own_src"] * g["row_bytes"]
        assert g["bytes_per_rank"] == [g["allgather_bytes"] // P] * P
        assert a["bytes_per_sample"]["sum"] <= g["bytes_per_sample"]["sum"]
    # auto with threshold 0 always gathers, with a threshold above 1 never does
    assert {e["mode"] for e in _exchanging(plan_statistics(lift, P, "block", "auto", 0.0))} == {"allgather"}
    assert {e["mode"] for e in _exchanging(plan_statistics(lift, P, "block", "auto", 1.01))} == {"alltoall"}


def test_cached_and_per_rank_sampling_agree(lift):
    P = 5
    for strategy in ("block", "random"):
        owners = make_partition(lift, P, strategy)
        for e in lift.base.edges:
            cached = dict(rank_sources(lift, e, owners[e.dst], P))
            direct = dict(rank_sources(lift, e, owners[e.dst], P, max_cached_edges=0))
            for r in range(P):
                assert np.array_equal(cached[r], direct[r])
                assert np.array_equal(direct[r], lift.edges(e, np.flatnonzero(owners[e.dst].owner_array() == r))[0])
        assert plan_statistics(lift, P, strategy) == plan_statistics(lift, P, strategy, max_cached_edges=0)


def test_graph_cuts_less_than_random_at_small_degree():
    base = BaseGraph.mlp(2, [1, 1, 1], 1)
    lift = random_sparse_lift(base, 1000, 2, seed=0)
    cut = {s: plan_statistics(lift, 4, s)["total"]["cut_fraction"] for s in ("graph", "random", "block")}
    assert cut["graph"] < 0.5 * cut["random"], cut
    assert cut["graph"] < cut["block"], cut


def test_graph_partition_balances_every_fibre():
    # pymetis balances only the whole graph; partition.graph_partition rebalances each fibre
    lift = random_sparse_lift(BaseGraph.mlp(2, [1, 1, 1], 1), 1000, 16, seed=0)
    s = plan_statistics(lift, 8, "graph")
    worst = max(e["vertices_per_rank"]["max"] / e["vertices_per_rank"]["mean"] for e in s["edges"])
    assert worst <= 1.25, worst


# ---------------------------------------------------------------- equality with a real run
def _real_plans(rank, world_size, lift, cases):
    import torch

    from randlift_dist import Layout, shard_network

    layout = Layout.from_initialized(world_size)
    out = []
    for strategy, exchange in cases:
        net = shard_network(lift.base, lift, layout, strategy, exchange, readout_init="normal")
        net(torch.randn(2, lift.base.in_dim))  # batch 2: bytes counted = 2 x per sample
        d = {f"{u}->{v}": lift.base.dim(u) for (u, v) in net.plan.edges}
        out.append({"bytes_forward": net.comm.stats.bytes_forward,
                    "plans": {f"{u}->{v}": (ep.exchange.mode, ep.exchange.rows_sent() * d[f"{u}->{v}"] * 4,
                                            ep.exchange.n_halo)
                              for (u, v), ep in net.plan.edges.items() if ep.exchange is not None},
                    "edges": {str(e): net.edge_layer(e).weight.shape[0] for e in lift.base.edges}})
    return out


def test_equals_real_run(lift):
    from distributed import run_world

    P, cases = 3, [("block", "auto"), ("random", "allgather"), ("graph", "alltoall")]
    real = run_world(_real_plans, P, lift, cases, timeout=120)
    for k, (strategy, exchange) in enumerate(cases):
        s = plan_statistics(lift, P, strategy, exchange)
        for r in range(P):
            got = real[r][k]
            total = 0
            for e in s["edges"]:
                assert got["edges"][e["edge"]] > 0
                if e["mode"] == "none":
                    assert e["edge"] not in got["plans"]
                    continue
                mode, bytes_, _ = got["plans"][e["edge"]]
                assert (mode, bytes_) == (e["mode"], e["bytes_per_rank"][r])
                total += bytes_
            assert got["bytes_forward"] == 2 * total == 2 * s["total"]["bytes_per_rank"][r]
        for e in s["edges"]:
            assert sum(real[r][k]["edges"][e["edge"]] for r in range(P)) == e["edges"]
            if e["mode"] != "none":
                assert sum(real[r][k]["plans"][e["edge"]][2] for r in range(P)) == e["halo_rows"]


# ---------------------------------------------------------------- config and CLI
def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


CONFIG = """
model:
  base: {builder: mlp, in_dim: 3, hidden_dims: [4, 4], out_dim: 2, activation: relu}
  lift: {size: 100, degree: 3, seed: 2, block_size: 32}
"""


def test_lift_from_config_file(tmp_path):
    lift = lift_from_config_file(_write(tmp_path, CONFIG))
    assert lift.law == "bernoulli" and lift.seed == 2 and lift.block_size == 32 and lift.n("h1") == 100
    explicit = """
    model:
      base:
        vertices: [{name: x, dim: 2, role: input}, {name: h, dim: 3}, {name: y, dim: 1, role: output}]
        edges: [[x, h], [h, y]]
      lift: {size: {h: 50, y: 20}, degree: 4, law: fixed_degree}
    """
    lift = lift_from_config_file(_write(tmp_path, explicit))
    assert lift.law == "fixed_degree" and lift.n("y") == 20 and lift.seed == 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "randlift_dist.planstats", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_json_and_table(tmp_path):
    cfg = _write(tmp_path, CONFIG)
    r = _cli("--config", cfg, "--world-size", "3", "--strategy", "random", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == plan_statistics(lift_from_config_file(cfg), 3, "random")
    r = _cli("--config", cfg, "--world-size", "4", "--exchange", "alltoall")
    assert r.returncode == 0, r.stderr
    assert "h1->h2" in r.stdout and "total" in r.stdout and "lower bound" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("body, args, expect", [
    (None, ["--world-size", "2"], "no such file"),
    ("model:\n  base: {builder: mlp, in_dim: 1, hidden_dims: [2], out_dim: 1}\n"
     "  lift: {size: 10, degree: 2, sise: 3}\n", ["--world-size", "2"], "model.lift.sise"),
    ("model:\n  base: {builder: mlp, in_dim: 1, hidden_dims: [2], out_dim: 1}\n  lift: {size: -1, degree: 2}\n",
     ["--world-size", "2"], "model.lift.size=-1"),
    ("model:\n  base: {builder: mlp, in_dim: 1, hidden_dims: [2], out_dim: 1}\n  lift: {size: 10, degree: 0}\n",
     ["--world-size", "2"], "degree 0"),
    ("model: [1, 2\n", ["--world-size", "2"], "not valid YAML"),
    (CONFIG, ["--world-size", "0"], "--world-size 0"),
    (CONFIG, ["--world-size", "two"], "--world-size"),
    (CONFIG, ["--world-size", "2", "--strategy", "metis"], "--strategy"),
])
def test_cli_errors(tmp_path, capsys, body, args, expect):
    cfg = str(tmp_path / "missing.yaml") if body is None else _write(tmp_path, body)
    with pytest.raises(SystemExit) as exc:
        main(["--config", cfg, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_error_type(tmp_path):
    with pytest.raises(ConfigError, match="modle"):
        lift_from_config_file(_write(tmp_path, "modle: {}\n"))


def test_same_lift_as_the_trainer(tmp_path):
    """A training config (defaults included) gives the trainer's lift: the same fingerprint."""
    from randlift_dist.config import load_config

    path = _write(tmp_path, "train: {steps: 3}\n")
    assert lift_from_config_file(path).fingerprint() == load_config(path).build_lift()[1].fingerprint()
    full = _write(tmp_path, CONFIG.replace("seed: 2", "law: full"), "full.yaml")
    assert lift_from_config_file(full).law == "full"


def test_partition_module_names_the_planstats_command():
    """`python -m randlift_dist.partition` is not a command: one line saying which one is, exit 2."""
    r = subprocess.run([sys.executable, "-m", "randlift_dist.partition"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "python -m randlift_dist.planstats --config" in lines[0], r.stderr
