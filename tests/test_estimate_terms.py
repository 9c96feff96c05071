"""Each term of the memory model (`randlift_dist/estimate/terms.py`) against an independent count:
the bytes of the real objects the runtime builds, never the closed form the term uses.

- kernel choice: the kernel `aggregate(..., "auto")` really runs (spied) is `choose_impl`'s, and
  the scalar CSR backward really takes the fused path where `csr_fused_backward` says so;
- index structures: the distinct tensor storages a real `CSR` holds (and the Triton index cache,
  under the interpreter in a subprocess) after the kernels ran a training step and evaluations;
- rows per rank: the real `block` partition; ownership arrays: the real `Ownership`; regenerated
  topology: the real `BlockTopology`;
- weights, gradients, optimizer state: a real `TorchEngine` after a step;
- data: the arrays `data.build_dataset` and `Batches` hold (teacher task and a .npz file);
- saved activations (`activation_memory.vertex_saved`) and the loss's saved tensor: autograd's saved tensors of a
  real forward (`saved_tensors_hooks`).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from randlift_dist import BaseGraph, LiftedNetwork, build_plan, make_partition, random_sparse_lift
from randlift_dist import activation_memory as am
from randlift_dist.config import load_config
from randlift_dist.estimate import estimate
from randlift_dist.estimate import terms as tm
from randlift_dist.estimate.shapes import fibre_bounds
from randlift_dist.ops import CSR, aggregate
from randlift_dist.ops import kernels as K

ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(obj, seen: set) -> int:
    """Bytes of the distinct tensor storages reachable from obj not in `seen` (which it extends)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if obj.numel() == 0 or key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return storage_bytes(torch.from_numpy(obj), seen) if obj.size else 0
    if isinstance(obj, dict):
        return sum(storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(storage_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(storage_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


def csr_structures(csr: CSR, seen: set | None = None) -> dict[str, int]:
    """The bytes of each index structure a real CSR holds (`terms.STRUCTURES`), counted once."""
    from randlift_dist.ops import triton_kernels

    seen = set() if seen is None else seen
    parts = {"csr": (csr.row, csr.col, csr.indptr), "transposed": csr._t, "groups": csr._groups.get(False),
             "t_groups": csr._groups.get(True), "expansion": list(csr._expansions.values()),
             "triton": triton_kernels._INDEX_CACHE.get(csr)}
    out = {k: storage_bytes(v, seen) for k, v in parts.items()}
    return {k: v for k, v in out.items() if v or k == "csr"}


def _csr(n_rows: int, n_cols: int, m: int, seed: int) -> CSR:
    g = np.random.default_rng(seed)
    row = np.sort(g.integers(0, n_rows, m))
    return CSR(torch.from_numpy(row), torch.from_numpy(g.integers(0, n_cols, m)), n_rows, n_cols)


# ---------------------------------------------------------------- kernel choice
def test_auto_runs_the_kernel_choose_impl_names(monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(K._ScalarCSR, "apply", lambda *a: ran.append("csr") or torch.zeros(()))
    monkeypatch.setattr(K._Blocked, "apply", lambda *a: ran.append("blocked") or torch.zeros(()))
    csr = _csr(6, 5, 12, 0)
    for d_v, d_u, B, dtype in [(1, 1, 4, torch.float32), (1, 1, 300, torch.float64), (1, 4, 127, torch.float32),
                               (1, 4, 128, torch.float32), (4, 1, 8, torch.float32), (1, 1, 8, torch.bfloat16),
                               (3, 5, 2, torch.float32)]:
        ran.clear()
        aggregate(torch.zeros(5, d_u, B, dtype=dtype), torch.zeros(12, d_v, d_u, dtype=dtype), csr, "auto")
        assert ran == [K.choose_impl("auto", d_v, d_u, B, dtype, "cpu", False)], (d_v, d_u, B, dtype)
    # on CUDA tensors of its dtypes triton is taken when it is available, and only then
    assert K.choose_impl("auto", 1, 1, 8, torch.bfloat16, "cuda", True) == "triton"
    assert K.choose_impl("auto", 1, 1, 8, torch.float64, "cuda", True) == "blocked"
    assert K.choose_impl("auto", 1, 1, 8, torch.float32, "cuda", False) == "blocked"


@pytest.mark.parametrize("d_u,n_src,B,both", [(1, 5, 32, True), (4, 5, 16, True), (4, 5, 15, True),
                                              (4, 5, 32, False), (1, 1 << 17, 64, True)])
def test_csr_backward_path_is_the_one_csr_fused_backward_names(monkeypatch, d_u, n_src, B, both):
    fused: list[bool] = []
    real = K._blocked_backward
    monkeypatch.setattr(K, "_blocked_backward", lambda *a: fused.append(True) or real(*a))
    csr = _csr(7, n_src, 20, 1)
    y = torch.randn(n_src, d_u, B, requires_grad=both)
    w = torch.randn(20, 1, d_u, requires_grad=True)
    aggregate(y, w, csr, "csr").sum().backward()
    assert bool(fused) == K.csr_fused_backward(d_u, n_src, B, both)


# ---------------------------------------------------------------- index structures
# (impl, d_v, d_u, training batch, sources need a gradient, evaluation batches, dtype)
CASES = [
    ("auto", 1, 1, 8, True, (8, 300), torch.float32),       # csr, unfused backward
    ("auto", 1, 4, 32, True, (200,), torch.float32),        # csr fused backward; evaluation at 200: blocked
    ("auto", 4, 4, 2, True, (64,), torch.float32),          # blocked, small batch (no target groups) then groups
    ("auto", 4, 3, 16, False, (), torch.float32),           # blocked, weight gradient only (input sources)
    ("auto", 1, 1, 16, True, (16,), torch.bfloat16),        # bf16 on CPU: blocked
    ("reference", 2, 2, 4, True, (4,), torch.float32),      # the reference kernel caches nothing
    ("auto", 1, 1, 4, False, (4,), torch.float64),          # csr, input sources: no input gradient
]


@pytest.mark.parametrize("impl,d_v,d_u,B,src_grad,evals,dtype", CASES)
def test_index_structures_equal_the_csr_tensors(impl, d_v, d_u, B, src_grad, evals, dtype):
    n_rows, n_cols, m = 37, 23, 150
    csr = _csr(n_rows, n_cols, m, 2)
    y = torch.randn(n_cols, d_u, B, dtype=dtype, requires_grad=src_grad)
    w = torch.randn(m, d_v, d_u, dtype=dtype, requires_grad=True)
    aggregate(y, w, csr, impl).sum().backward()
    with torch.no_grad():
        for b in evals:
            aggregate(torch.randn(n_cols, d_u, b, dtype=dtype), w, csr, impl)
    runs = [(K.choose_impl(impl, d_v, d_u, B, dtype, "cpu", False), B, "both" if src_grad else "weight")]
    runs += [(K.choose_impl(impl, d_v, d_u, b, dtype, "cpu", False), b, "none") for b in evals]
    assert tm.index_structures(m, n_rows, n_cols, d_v, d_u, runs) == csr_structures(csr)


def test_index_structures_of_a_csr_without_edges():
    csr = CSR(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 9, 4)
    y, w = torch.randn(4, 1, 8, requires_grad=True), torch.randn(0, 1, 1, requires_grad=True)
    aggregate(y, w, csr).sum().backward()
    assert tm.index_structures(0, 9, 4, 1, 1, [("csr", 8, "both")]) == csr_structures(csr) == {"csr": 80}


def test_fused_csr_backward_builds_the_source_groups(monkeypatch):
    """At d = 1 the fused backward needs a big source buffer: forced here at any size."""
    monkeypatch.setattr(K, "_FUSED_MIN_SCALAR_ELEMS", 0)
    csr = _csr(40, 30, 120, 3)
    y, w = torch.randn(30, 1, 16, requires_grad=True), torch.randn(120, 1, 1, requires_grad=True)
    aggregate(y, w, csr).sum().backward()
    held = csr_structures(csr)
    assert "t_groups" in held
    assert tm.index_structures(120, 40, 30, 1, 1, [("csr", 16, "both")]) == held


TRITON_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from test_estimate_terms import _csr, csr_structures
    from randlift_dist import LiftedNetwork
    from randlift_dist.config import load_config
    from randlift_dist.ops import CSR, aggregate
    out = {"csr": [], "net": 0}
    for d_v, d_u in ((1, 1), (2, 3)):
        csr = _csr(11, 7, 30, 4)
        y = torch.randn(7, d_u, 4, requires_grad=True)
        w = torch.randn(30, d_v, d_u, requires_grad=True)
        aggregate(y, w, csr, "triton").sum().backward()
        out["csr"].append(csr_structures(csr))
    cfg = load_config(sys.argv[2])
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=cfg.out_dim(base), impl="triton")
    net(torch.randn(cfg.train.batch_size, base.in_dim)).sum().backward()
    with torch.no_grad():
        net(torch.randn(cfg.data.n_test, base.in_dim))
    seen = set()
    csrs = [c for mod in net.modules() for c in vars(mod).values() if isinstance(c, CSR)]
    out["net"] = sum(sum(csr_structures(c, seen).values()) for c in csrs)
    print(json.dumps(out))
""")


@pytest.mark.timeout(300)
def test_triton_index_structures_and_the_cuda_estimate(tmp_path):
    """`--device cuda` (pure arithmetic, run on CPU): triton's structures per CSR, and the indices
    of a whole network, against the kernels run under the Triton interpreter."""
    pytest.importorskip("triton")
    cfg = {"model": {"base": {"builder": "residual_mlp", "in_dim": 3, "width": 2, "depth": 2, "out_dim": 1,
                              "activation": "tanh"},
                     "lift": {"size": 24, "degree": 3, "law": "fixed_degree", "block_size": 8}, "impl": "triton"},
           "data": {"n_test": 6}, "train": {"batch_size": 4}, "parallel": {"engine": "torch"}}
    path = tmp_path / "tri.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent), str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (d_v, d_u), held in zip(((1, 1), (2, 3)), got["csr"]):
        assert tm.index_structures(30, 11, 7, d_v, d_u, [("triton", 4, "both")]) == held
    est = estimate(load_config(str(path)), device="cuda")
    assert {e["kernel"] for e in est["edges"]} == {"triton"}
    assert est["indices_bytes"] == got["net"]


@pytest.mark.parametrize("n,k,d_v,d_u,B", [(2000, 8, 16, 16, 64), (4000, 8, 16, 16, 4), (10000, 4, 1, 16, 64)])
def test_workspaces_bound_the_real_cache(n, k, d_v, d_u, B):
    """The blocked kernels' cached scratch after a training step (forward, fused backward) stays
    under `workspace_bytes`, which takes every slot at a full chunk: an upper bound, measured at
    0.3 to 0.6 of it here (the model overestimates this term by tens of MB at most)."""
    from randlift_dist.ops import workspace as ws

    ws.release_workspaces()
    csr = _csr(n, n, n * k, 0)
    y = torch.randn(n, d_u, B, requires_grad=True)
    w = torch.randn(n * k, d_v, d_u, requires_grad=True)
    aggregate(y, w, csr, "blocked").sum().backward()
    real = storage_bytes(list(ws._tls.ws.values()), set())
    ws.release_workspaces()
    model = tm.workspace_bytes(n * k * max(d_u * B, d_v * B, d_u * d_v), max(n * d_v * B, n * d_u * B), 4, "cpu")
    assert 0.2 * model < real <= model


# ---------------------------------------------------------------- rows, ownership, regenerated topology
@pytest.fixture(scope="module")
def fixed_lift():
    base = BaseGraph.residual_mlp(3, 4, 3, 1, "tanh")
    return random_sparse_lift(base, {"h1": 1000, "h2": 1000, "h3": 1000, "y": 97}, 4, seed=5, law="fixed_degree",
                              block_size=16)


@pytest.mark.parametrize("P", [1, 2, 3, 7])
def test_rows_per_rank_equal_the_block_partition(fixed_lift, P):
    """Fixed degree: every vertex carries the same load, so the estimate's rows are the partition's
    exactly (h*: 1000 >= 8 x 16 x P, snapped to blocks up to P = 7; y: unsnapped)."""
    owners = make_partition(fixed_lift, P, "block")
    bounds = fibre_bounds(fixed_lift.base, fixed_lift, P)
    for v, own in owners.items():
        assert [lo for lo, _ in bounds[v]] + [bounds[v][-1][1]] == own.bounds.tolist(), v


def test_ownership_arrays_equal_the_partition_arrays(fixed_lift):
    owners = make_partition(fixed_lift, 3, "random")
    seen: set = set()
    held = 0
    for o in owners.values():
        o.position(np.arange(3))  # builds the position array, as the network's construction does
        held += storage_bytes(o.owner, seen) + storage_bytes(o._cache["pos"], seen)
    assert tm.shard_array_bytes("random", 3, (o.n for o in owners.values())) == held
    assert tm.shard_array_bytes("block", 3, (o.n for o in owners.values())) == 0


def test_regenerated_index_bytes_equal_the_block_topology(fixed_lift):
    plan = build_plan(fixed_lift, topology="regenerate")
    for key, ep in plan.edges.items():
        bt = ep.blocks
        held = storage_bytes([bt.blocks, bt.edge_ptr, bt.row_ptr], set())
        assert tm.regenerated_index_bytes(fixed_lift.num_blocks(key[1])) == held


# ---------------------------------------------------------------- engine state, data, saved tensors
def _config(tmp_path: Path, **sections) -> str:
    cfg = {"model": {"base": {"builder": "residual_mlp", "in_dim": 3, "width": 3, "depth": 2, "out_dim": 2,
                              "activation": "gelu", "bias": True},
                     "lift": {"size": 60, "degree": 4, "law": "fixed_degree", "block_size": 16}},
           "data": {"n_train": 96, "n_test": 40}, "train": {"batch_size": 8}, "parallel": {"engine": "torch"}}
    for k, v in sections.items():
        cfg[k].update(v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("train", [{"optimizer": "adam"}, {"optimizer": "sgd", "momentum": 0.9, "dtype": "float64"},
                                   {"optimizer": "sgd"}])
def test_engine_state_equals_a_real_torch_engine(tmp_path, train):
    from randlift_dist.engine import TorchEngine
    from randlift_dist.layout import Layout

    cfg = load_config(_config(tmp_path, train=train))
    base, lift = cfg.build_lift()
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    net = LiftedNetwork(base, lift, out_dim=cfg.out_dim(base), dtype=dtype, readout_init="normal")
    eng = TorchEngine(net, cfg, Layout())
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    eng.train_step(x, y)
    est = estimate(cfg)
    params = list(net.parameters())
    assert est["weights_bytes"] == storage_bytes(params, set())
    state = [t for p in params for t in eng.optimizer.state.get(p, {}).values() if t.dim() > 0]
    assert est["optimizer_state_bytes"] == storage_bytes(state, set())
    eng._loss(x, y).backward()  # the gradients of a step, as the optimizer sees them
    assert est["gradients_bytes"] == storage_bytes([p.grad for p in params], set())


@pytest.mark.parametrize("kind", ["teacher", "file"])
def test_data_bytes_equal_the_loaded_arrays(tmp_path, kind):
    from randlift_dist.data import Batches, build_dataset

    data = {"kind": kind}
    if kind == "file":
        f = tmp_path / "d.npz"
        np.savez(f, x=np.random.default_rng(0).normal(size=(136, 3)), y=np.random.default_rng(1).normal(size=(136, 2)))
        data["path"] = str(f)
    cfg = load_config(_config(tmp_path, data=data))
    base, _ = cfg.build_lift()
    ds = build_dataset(cfg, base, 2)
    batches = Batches(ds.train, 8, 0, 1, 0)
    xb, yb = batches(0)
    held = storage_bytes([ds.x_train, ds.y_train, ds.x_test, ds.y_test, batches._perm], set())
    label = tm.label_bytes("mse", 2)
    assert tm.data_bytes(96, 40, 3, label, lazy=False) == held
    assert tm.batch_bytes(8, 3, label) == storage_bytes([xb, yb], set())
    assert estimate(cfg)["data_bytes"] == held


GRAPHS = [
    {"vertices": [
        {"name": "x", "dim": 2, "role": "input"}, {"name": "a", "dim": 3, "activation": "gelu", "bias": True},
        {"name": "b", "dim": 1, "activation": "tanh"}, {"name": "c", "dim": 4, "activation": "relu"},
        {"name": "d", "dim": 2, "activation": "sigmoid"}, {"name": "e", "dim": 3, "activation": "identity"},
        {"name": "y", "dim": 2, "role": "output", "activation": "gelu"}],
     "edges": [["x", "a"], ["a", "b"], ["a", "c"], ["b", "c"], ["c", "d"], ["d", "e"], ["c", "e"], ["e", "y"]]},
    {"vertices": [  # two outputs (tanh: its output saved twice, by tanh and the readout; identity)
        {"name": "x", "dim": 2, "role": "input"}, {"name": "h", "dim": 3, "activation": "relu"},
        {"name": "y1", "dim": 2, "role": "output", "activation": "tanh"},
        {"name": "y2", "dim": 2, "role": "output", "activation": "identity", "bias": True}],
     "edges": [["x", "h"], ["h", "y1"], ["h", "y2"], ["y1", "y2"]]},
]


@pytest.mark.parametrize("graph", GRAPHS, ids=["chain", "two_outputs"])
def test_saved_activations_equal_autograd_saved_tensors(graph):
    """Every vertex's saved tensors (`vertex_saved`: the output, the pre-activation for gelu, the
    readout's copies) and the loss's one fp32 `[B, out_dim]` tensor are exactly what autograd
    keeps besides parameters and the input."""
    base = BaseGraph.from_dict(graph)
    lift = random_sparse_lift(base, 30, 3, seed=1)
    net = LiftedNetwork(base, lift, readout_init="normal", impl="blocked")
    B = 5
    x, target = torch.randn(B, 2), torch.randn(B, 2)
    x_contig = 1 * 2 * B * 4  # the expanded input, made contiguous for the kernel
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() > 1:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ((net(x) - target) ** 2).mean()
    expected = sum(x for v in base.order if base.vertices[v].role != "input"
                   for xs in am.vertex_saved(base, v, lift.n(v), B, 4, out_dim=2).values() for x in xs)
    loss_saved = tm.logit_bytes(B, 2, 4, "mse")[1]  # the difference the square keeps
    assert sum(saved.values()) == expected + x_contig + loss_saved
    loss.backward()
