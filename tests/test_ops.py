"""Every fast aggregation path against `reference`: forward, gradients of y and w, gradcheck, and
the memory property (no gathered `[m, d, B]` tensor saved for backward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import randlift_dist.ops.blocked as BK
import randlift_dist.ops.kernels as K
import randlift_dist.ops.workspace as W
from randlift_dist.ops import CSR, IMPLS, aggregate


def make_case(n_v, n_u, d_v, d_u, B, degrees, seed=0, dtype=torch.float32, sources=None):
    """A CSR with the given in-degree per target (sources drawn without replacement per row)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    degrees = np.asarray(degrees, dtype=np.int64)
    assert degrees.shape == (n_v,)
    pool = n_u if sources is None else sources  # sources >= pool never get an edge
    row = np.repeat(np.arange(n_v), degrees)
    col = [np.sort(rng.choice(pool, size=d, replace=False)) for d in degrees]
    col = np.concatenate(col) if degrees.sum() else np.zeros(0, np.int64)
    csr = CSR(torch.from_numpy(row), torch.from_numpy(col.astype(np.int64)), n_v, n_u)
    y = torch.randn(n_u, d_u, B, generator=g, dtype=dtype)
    w = torch.randn(len(row), d_v, d_u, generator=g, dtype=dtype)
    return y, w, csr


def fast_impls(d_v, d_u):
    return ["csr", "blocked", "auto"] if d_v == 1 else ["blocked", "auto"]


rng0 = np.random.default_rng(1)
CASES = {
    # name: (n_v, n_u, d_v, d_u, B, degrees, sources)
    "scalar": (40, 30, 1, 1, 5, rng0.binomial(30, 0.2, 40), None),
    "scalar_fixed": (32, 32, 1, 1, 7, np.full(32, 4), None),
    "mixed_v>u": (25, 30, 4, 2, 3, rng0.binomial(30, 0.15, 25), None),
    "mixed_u>v": (25, 30, 2, 5, 6, rng0.binomial(30, 0.15, 25), None),
    "mixed_scalar_in": (20, 30, 8, 1, 4, rng0.binomial(30, 0.2, 20), None),
    "mixed_scalar_out": (20, 30, 1, 8, 4, rng0.binomial(30, 0.2, 20), None),
    "d16": (24, 20, 16, 16, 8, rng0.binomial(20, 0.2, 24), None),
    "d16_fixed": (16, 20, 16, 16, 32, np.full(16, 3), None),
    "empty_rows": (30, 20, 3, 3, 4, np.where(np.arange(30) % 3 == 0, 0, 2), None),
    "sorted_degrees": (13, 20, 3, 3, 4, np.repeat([0, 1, 2, 5], [3, 4, 4, 2]), None),  # identity order
    "many_edges": (6, 300, 2, 3, 4, np.array([0, 1, 250, 3, 299, 0]), None),
    "many_edges_scalar": (6, 300, 1, 1, 4, np.array([0, 1, 250, 3, 299, 0]), None),
    "sources_without_edges": (20, 40, 2, 2, 3, rng0.binomial(10, 0.3, 20), 10),
    "sources_without_edges_scalar": (20, 40, 1, 1, 3, rng0.binomial(10, 0.3, 20), 10),
    "batch1": (30, 30, 1, 1, 1, rng0.binomial(30, 0.2, 30), None),
    # B >= K._FUSED_MIN_BATCH: the scalar CSR path's backward is the fused blocked one
    "scalar_batch32": (40, 30, 1, 1, 32, rng0.binomial(30, 0.2, 40), None),
    "mixed_scalar_out_batch32": (20, 30, 1, 8, 32, rng0.binomial(30, 0.2, 20), None),
    "d4_batch32_empty": (30, 25, 4, 4, 32, np.where(np.arange(30) % 4 == 0, 0, 3), 15),
    "batch1_d16": (20, 20, 16, 16, 1, rng0.binomial(20, 0.25, 20), None),
    "batch2_d16_fixed": (20, 20, 16, 16, 2, np.full(20, 5), None),
    "batch4_d8_empty_rows": (12, 20, 8, 8, 4, [0, 3, 0, 0, 5, 1, 0, 2, 2, 0, 7, 0], None),  # small-batch path
    "batch8_mixed": (20, 20, 16, 4, 3, rng0.binomial(20, 0.25, 20), None),  # small-batch path, d_v != d_u
    "nnz0": (10, 8, 3, 2, 4, np.zeros(10, np.int64), None),
    "nnz0_scalar": (10, 8, 1, 1, 4, np.zeros(10, np.int64), None),
}


def chunked(impl, d_v, d_u):
    """Whether `impl` runs the chunked blocked kernel (then it is also tested with tiny chunks)."""
    return impl == "blocked" or (impl == "auto" and d_v != 1)


def params(cases):
    for name, (n_v, n_u, d_v, d_u, B, deg, src) in cases.items():
        for impl in fast_impls(d_v, d_u):
            for tiny in ([False, True] if chunked(impl, d_v, d_u) else [False]):
                yield pytest.param(name, impl, tiny, id=f"{name}-{impl}" + ("-tiny_chunks" if tiny else ""))


def _grads(impl, y, w, csr, gz):
    y = y.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    z = aggregate(y, w, csr, impl)
    gy, gw = torch.autograd.grad(z, (y, w), gz)
    return z.detach(), gy, gw


def _close(a, b, rtol):
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name,impl,tiny_chunks", list(params(CASES)))
def test_matches_reference_float32(name, impl, tiny_chunks, monkeypatch):
    if tiny_chunks:  # chunks of one row (several per degree group), outputs scattered per chunk
        monkeypatch.setattr(W, "CHUNK_ELEMS", 64)
        monkeypatch.setattr(W, "WS_CACHE_MAX", 16)
    monkeypatch.setattr(K, "_FUSED_MIN_SCALAR_ELEMS", 0)  # the fused scalar backward at every size
    n_v, n_u, d_v, d_u, B, deg, src = CASES[name]
    y, w, csr = make_case(n_v, n_u, d_v, d_u, B, deg, sources=src)
    gz = torch.randn(n_v, d_v, B)
    # ground truth in float64 through the reference; the fast path runs in float32
    z_ref, gy_ref, gw_ref = _grads("reference", y.double(), w.double(), csr, gz.double())
    z, gy, gw = _grads(impl, y, w, csr, gz)
    assert z.shape == (n_v, d_v, B) and z.dtype == torch.float32
    assert gy.shape == y.shape and gw.shape == w.shape
    _close(z, z_ref.float(), 1e-5)
    _close(gy, gy_ref.float(), 1e-5)
    _close(gw, gw_ref.float(), 1e-5)
    # and the float32 reference agrees too
    z32, gy32, gw32 = _grads("reference", y, w, csr, gz)
    _close(z, z32, 1e-5)
    _close(gy, gy32, 1e-5)
    _close(gw, gw32, 1e-5)


GRADCHECK = {
    # small versions of the shapes above (gradcheck costs one forward per input element)
    "scalar": (7, 6, 1, 1, 3, [2, 0, 3, 1, 6, 2, 1], None),
    "mixed": (5, 6, 3, 2, 2, [2, 0, 3, 1, 2], None),
    "mixed_scalar_out": (4, 5, 1, 4, 2, [1, 3, 0, 2], None),
    "empty_rows_and_sources": (5, 8, 2, 2, 2, [0, 2, 0, 3, 1], 4),
    "d16_batch1": (3, 4, 16, 16, 1, [2, 0, 3], None),
    "nnz0": (3, 4, 2, 2, 2, [0, 0, 0], None),
}


@pytest.mark.parametrize("name,impl,tiny_chunks", [p for p in params(GRADCHECK) if p.values[1] != "auto"])
def test_gradcheck_float64(name, impl, tiny_chunks, monkeypatch):
    if tiny_chunks:
        monkeypatch.setattr(W, "CHUNK_ELEMS", 64)
        monkeypatch.setattr(W, "WS_CACHE_MAX", 16)
    n_v, n_u, d_v, d_u, B, deg, src = GRADCHECK[name]
    y, w, csr = make_case(n_v, n_u, d_v, d_u, B, deg, dtype=torch.float64, sources=src)
    y.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, w: aggregate(y, w, csr, impl), (y, w), fast_mode=d_v * d_u > 8)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("d,B", [(1, 16), (16, 4), (4, 1), (3, 32)])
def test_large_fan_in_and_many_chunks(d, B, fused, monkeypatch):
    """A bigger random lift with binomial degrees (many degree groups, scattered rows) and a
    fixed-degree one (contiguous groups), split into many chunks; the blocked backward fused
    (both gradients from one gather) and as two kernels."""
    monkeypatch.setattr(W, "CHUNK_ELEMS", 16384)
    monkeypatch.setattr(BK, "_FUSED_BACKWARD", fused)
    monkeypatch.setattr(K, "_FUSED_MIN_SCALAR_ELEMS", 0)
    for deg in (np.random.default_rng(3).binomial(150, 0.1, 100), np.full(100, 12)):
        y, w, csr = make_case(100, 150, d, d, B, deg, seed=4)
        gz = torch.randn(100, d, B)
        ref = _grads("reference", y.double(), w.double(), csr, gz.double())
        for impl in fast_impls(d, d):
            for a, b in zip(_grads(impl, y, w, csr, gz), ref):
                _close(a, b.float(), 1e-5)


@pytest.mark.parametrize("requires", [(True, False), (False, True)])
@pytest.mark.parametrize("d", [1, 3])
def test_partial_requires_grad(requires, d):
    y, w, csr = make_case(20, 15, d, d, 4, np.random.default_rng(0).binomial(15, 0.3, 20))
    y.requires_grad_(requires[0])
    w.requires_grad_(requires[1])
    for impl in fast_impls(d, d):
        z = aggregate(y, w, csr, impl)
        (g,) = torch.autograd.grad(z.sum(), [y if requires[0] else w])
        (g_ref,) = torch.autograd.grad(aggregate(y, w, csr, "reference").sum(), [y if requires[0] else w])
        _close(g, g_ref, 1e-5)


def _saved_numels(impl, y, w, csr):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = aggregate(y, w, csr, impl)
    return z, sizes


@pytest.mark.parametrize("d_v,d_u,B", [(1, 1, 64), (16, 16, 32), (8, 2, 16), (2, 8, 16), (1, 8, 16), (16, 16, 2)])
def test_no_gathered_tensor_saved(d_v, d_u, B):
    """Fast paths save only y and w (plus O(m) index data): never an [m, d, B] gathered tensor."""
    n = 64
    deg = np.full(n, 12)
    y, w, csr = make_case(n, n, d_v, d_u, B, deg)
    y.requires_grad_(True)
    w.requires_grad_(True)
    m = csr.nnz
    gathered = {m * d_u * B, m * d_v * B}
    # the check detects the reference, which does keep y[col] ([m, d_u, B]) alive
    _, ref_sizes = _saved_numels("reference", y, w, csr)
    assert gathered & set(ref_sizes)
    for impl in fast_impls(d_v, d_u):
        z, sizes = _saved_numels(impl, y, w, csr)
        assert not gathered & set(sizes), (impl, sizes)
        assert sum(sizes) <= y.numel() + w.numel() + 4 * m, (impl, sizes)
        z.sum().backward()


def test_outputs_do_not_alias_workspaces():
    """The blocked kernel reuses scratch buffers across calls: results must stay intact."""
    y, w, csr = make_case(30, 30, 4, 4, 8, np.random.default_rng(5).binomial(30, 0.2, 30))
    y2, w2, csr2 = make_case(30, 30, 4, 4, 8, np.full(30, 3), seed=6)
    z1 = aggregate(y, w, csr, "blocked")
    keep = z1.clone()
    z2 = aggregate(y2, w2, csr2, "blocked")
    assert torch.equal(z1, keep)
    assert not torch.equal(z1, z2)


@pytest.mark.parametrize("impl", ["csr", "blocked"])
def test_deterministic(impl):
    y, w, csr = make_case(50, 40, 1, 1, 6, np.random.default_rng(7).binomial(40, 0.2, 50))
    y.requires_grad_(True)
    w.requires_grad_(True)
    outs = []
    for _ in range(2):
        z = aggregate(y, w, csr, impl)
        outs.append((z.detach(), *torch.autograd.grad(z, (y, w), torch.ones_like(z))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_auto_choice_and_errors():
    y, w, csr = make_case(5, 5, 2, 2, 3, np.full(5, 2))
    with pytest.raises(ValueError, match="d_v = 1"):
        aggregate(y, w, csr, "csr")
    with pytest.raises(ValueError, match="unknown"):
        aggregate(y, w, csr, "nope")
    assert {"auto", "reference", "csr", "blocked"} <= set(IMPLS)
    with pytest.raises(ValueError, match="sorted"):
        CSR(torch.tensor([1, 0]), torch.tensor([0, 0]), 2, 1)


def test_csr_caches_structures():
    _, _, csr = make_case(20, 20, 1, 1, 2, np.random.default_rng(8).binomial(20, 0.3, 20))
    assert csr.transposed() is csr.transposed()
    assert csr.degree_groups() is csr.degree_groups()
    t_indptr, t_col, perm = csr.transposed()
    assert torch.equal(csr.col[perm], torch.repeat_interleave(torch.arange(20), t_indptr.diff()))
    assert torch.equal(csr.row[perm], t_col)
    deg = csr.indptr.diff()
    for transposed, d in ((False, deg), (True, t_indptr.diff())):
        groups = csr.degree_groups(transposed)
        order = torch.argsort(groups.inv)  # sorted position -> row
        assert int((d == 0).sum()) == groups.n_empty and bool((d[order[:groups.n_empty]] == 0).all())
        covered = [order[:groups.n_empty]]
        for g in groups.groups:
            assert bool((d[g.rows] == g.k).all())
            assert torch.equal(order[g.pos:g.pos + g.rows.numel()], g.rows)
            if g.r0 is not None:
                assert torch.equal(g.rows, torch.arange(g.r0, g.r0 + g.rows.numel()))
            # the group's edges, row by row, each row's in its own order
            ptr = t_indptr if transposed else csr.indptr
            want = torch.cat([torch.arange(int(ptr[r]), int(ptr[r + 1])) for r in g.rows.tolist()])
            assert torch.equal(groups.edges[g.q:g.q + g.k * g.rows.numel()], want)
            covered.append(g.rows)
        assert torch.equal(torch.cat(covered).sort().values, torch.arange(20))
        assert torch.equal(groups.edges.sort().values, torch.arange(csr.nnz))
    for d_u in (1, 3):  # the scalar matrix [n_v, n_u * d_u] of d_v = 1 targets, and its transpose
        x = csr.scalar_expansion(d_u)
        assert x is csr.scalar_expansion(d_u) and x.col.dtype == torch.int32
        vals = torch.arange(csr.nnz * d_u, dtype=torch.float64)
        A = W.csr_tensor(x.indptr, x.col, vals, (x.n_rows, x.n_cols)).to_dense()
        At = W.csr_tensor(x.t_indptr, x.t_col, vals[x.perm.long()], (x.n_cols, x.n_rows))
        assert torch.equal(At.to_dense(), A.t())
        w = vals.view(-1, 1, d_u)
        for e in range(csr.nnz):
            assert torch.equal(A[csr.row[e], csr.col[e] * d_u:(csr.col[e] + 1) * d_u], w[e, 0])


def test_non_contiguous_inputs():
    y, w, csr = make_case(12, 10, 3, 3, 5, np.full(12, 2))
    yt = y.transpose(0, 2).contiguous().transpose(0, 2).requires_grad_(True)  # same values, other strides
    wt = w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not yt.is_contiguous() and not wt.is_contiguous()
    z = aggregate(yt, wt, csr, "blocked")
    gy, gw = torch.autograd.grad(z.sum(), (yt, wt))
    z_ref, gy_ref, gw_ref = _grads("reference", y, w, csr, torch.ones_like(z))
    _close(z.detach(), z_ref, 1e-5)
    _close(gy, gy_ref, 1e-5)
    _close(gw, gw_ref, 1e-5)
