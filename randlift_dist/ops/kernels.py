"""Aggregation implementations: reference, scalar CSR SpMM, chunked blocked gather-matmul."""

from __future__ import annotations

import warnings

import torch

from .csr import CSR

IMPLS = ("auto", "reference", "csr", "blocked")
_CHUNK_ELEMS = 1 << 22  # elements of one gathered chunk ([c, d, B]) in the blocked kernel


def reference_aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """The definition, with plain autograd: z[row] += w @ y[col]."""
    z = y.new_zeros(csr.n_rows, w.shape[1], y.shape[2])  # [n_v, d_v, B]
    msg = torch.matmul(w, y[csr.col])  # [m, d_v, B]
    return z.index_add(0, csr.row, msg)


def _csr_tensor(indptr, col, values, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(indptr, col, values, size=shape, check_invariants=False)


class _ScalarCSR(torch.autograd.Function):
    """d_u = d_v = 1: z = A @ Y with A the [n_v, n_u] CSR matrix of the edge weights."""

    @staticmethod
    def forward(ctx, y, w, csr):
        B = y.shape[2]
        A = _csr_tensor(csr.indptr, csr.col, w.reshape(-1), (csr.n_rows, csr.n_cols))
        z = torch.sparse.mm(A, y.reshape(csr.n_cols, B))  # [n_v, B]
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return z.view(csr.n_rows, 1, B)

    @staticmethod
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        csr = ctx.csr
        B = y.shape[2]
        gz2 = gz.reshape(csr.n_rows, B).contiguous()
        gy = gw = None
        if ctx.needs_input_grad[0]:
            t_indptr, t_col, perm = csr.transposed()
            At = _csr_tensor(t_indptr, t_col, w.reshape(-1)[perm], (csr.n_cols, csr.n_rows))
            gy = torch.sparse.mm(At, gz2).view(csr.n_cols, 1, B)
        if ctx.needs_input_grad[1]:
            pattern = _csr_tensor(csr.indptr, csr.col, w.new_zeros(csr.nnz), (csr.n_rows, csr.n_cols))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sampled = torch.sparse.sampled_addmm(pattern, gz2, y.reshape(csr.n_cols, B).t(), beta=0.0)
            gw = sampled.values().view(-1, 1, 1)
        return gy, gw, None


def _chunks(m: int, d: int, B: int):
    c = max(1, _CHUNK_ELEMS // max(1, d * B))
    for s in range(0, m, c):
        yield slice(s, min(m, s + c))


class _Blocked(torch.autograd.Function):
    """Any dims: per chunk of edges, gather y[col], batched matmul with w, index_add into z."""

    @staticmethod
    def forward(ctx, y, w, csr):
        m, d_v, d_u = w.shape
        B = y.shape[2]
        z = y.new_zeros(csr.n_rows, d_v, B)
        for e in _chunks(m, max(d_u, d_v), B):
            z.index_add_(0, csr.row[e], torch.bmm(w[e], y[csr.col[e]]))  # [c, d_v, B]
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return z

    @staticmethod
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        csr = ctx.csr
        m, d_v, d_u = w.shape
        B = y.shape[2]
        gy = torch.zeros_like(y) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for e in _chunks(m, max(d_u, d_v), B):
            g = gz[csr.row[e]]  # [c, d_v, B]
            if gy is not None:
                gy.index_add_(0, csr.col[e], torch.bmm(w[e].transpose(1, 2), g))
            if gw is not None:
                torch.bmm(g, y[csr.col[e]].transpose(1, 2), out=gw[e])
        return gy, gw, None


def aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR, impl: str = "auto") -> torch.Tensor:
    """`z[j] = sum_{(i->j)} w_ij @ y[i]`; y `[n_u, d_u, B]`, w `[m, d_v, d_u]` -> z `[n_v, d_v, B]`."""
    if impl == "auto":
        scalar = w.shape[1] == 1 and w.shape[2] == 1 and y.device.type == "cpu"
        impl = "csr" if scalar else "blocked"
    if csr.nnz == 0:
        return y.new_zeros(csr.n_rows, w.shape[1], y.shape[2]) + 0 * w.sum() + 0 * y.sum()
    if impl == "reference":
        return reference_aggregate(y, w, csr)
    if impl == "csr":
        if w.shape[1] != 1 or w.shape[2] != 1:
            raise ValueError(f"impl='csr' needs scalar vertices, got weight blocks {tuple(w.shape[1:])}")
        return _ScalarCSR.apply(y.contiguous(), w, csr)
    if impl == "blocked":
        return _Blocked.apply(y.contiguous(), w, csr)
    raise ValueError(f"unknown aggregation impl {impl!r}: choose one of {IMPLS}")
