"""Aggregation over a topology that is not stored: the edges are produced chunk by chunk when
needed (by the plan, from the lift's counter-based streams) in the forward and again in the
backward, and dropped after each chunk.

`topology` is any object with `n_rows` (target rows) and `chunks(max_edges, prepare)`, an
iterator over chunks: target rows `r0:r1` (consecutive chunks cover `0:n_rows` in order), whose
edges are the parameter rows `e0:e1`, with numpy int64 `row` (sorted, in `r0:r1`) and `col` (rows
of the source buffer) per edge; it yields `prepare(r0, r1, e0, e1, row, col)`, and may call
`prepare` on another thread (the plan's producer draws the next chunk while this one computes,
so the index work below runs there too). At most `max_edges` edges per chunk unless a single unit
of the producer (a sampling block) is bigger.

Scalar vertices (d_u = d_v = 1) on CPU in float32/float64, per chunk of up to
`workspace.REGEN_CHUNK_EDGES` edges: forward, MKL's CSR SpMM (the row pointer found by binary
search in the sorted rows, int32 indices). Backward: the weight gradient as a sampled
dense-dense product on the chunk's pattern (`sampled_addmm`: one dot product over the batch per
edge, nothing gathered); the input gradient accumulated into the sources' rows by a CSR SpMM
with the chunk's transposed structure (sorted on the producer thread by sorting `col * m + edge`
keys). Deterministic, no atomics, no per-edge value buffers beyond the chunk's weights.
Other dims and devices: the messages `w_e @ y[col]` summed per row with `scatter_add_`, and in
the backward `scatter_add_` into the sources (on CPU a serial, deterministic sum; on CUDA atomic,
so not bitwise reproducible). Only y and w are saved. Memory: a few `[chunk edges, d, B]` buffers,
bounded by `workspace.REGEN_CHUNK_ELEMS`; no per-edge array outlives its chunk.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from . import workspace as ws


def scalar_path(d_v: int, d_u: int, device: str, dtype: torch.dtype) -> bool:
    """Whether weight blocks `[d_v, d_u]` of `dtype` on a `device` of that type take the scalar CPU
    path (see the module doc); the memory model (`estimate/`) asks the same question."""
    return d_v == 1 and d_u == 1 and device == "cpu" and dtype in (torch.float32, torch.float64)


def chunk_edges(d_v: int, d_u: int, B: int, scalar: bool) -> int:
    """Edges per chunk: the scalar CPU path holds only indices (~50 B per edge while a chunk is
    prepared), the other path gathers `[edges, d, B]` values."""
    if scalar:
        return ws.REGEN_CHUNK_EDGES
    return max(1, ws.REGEN_CHUNK_ELEMS // (max(d_v, d_u) * B))


def _max_edges(w: torch.Tensor, B: int, scalar_cpu: bool) -> int:
    return chunk_edges(w.shape[1], w.shape[2], B, scalar_cpu)


def _scalar_cpu(y: torch.Tensor, w: torch.Tensor) -> bool:
    return scalar_path(w.shape[1], w.shape[2], y.device.type, y.dtype)


@dataclasses.dataclass
class _Chunk:
    """One chunk's indices, made on the producer's thread (numpy); `indptr` (rows relative to
    r0) and the transposed structure only for the scalar CPU path."""

    r0: int
    r1: int
    e0: int
    e1: int
    row: torch.Tensor  # int64 [m], absolute target rows
    col: torch.Tensor  # int64 [m]
    indptr: torch.Tensor | None = None  # int32 [r1 - r0 + 1]
    col32: torch.Tensor | None = None  # int32 [m]
    t_indptr: torch.Tensor | None = None  # int32 [n_cols + 1], over all sources
    t_row: torch.Tensor | None = None  # int32 [m], relative target row of each edge, by source
    perm: torch.Tensor | None = None  # int64 [m], edge of each transposed position


def _index_type(n: int):
    return np.int32 if n < 2**31 - 1 else np.int64


def _preparer(scalar_cpu: bool, backward: bool, n_cols: int, device: torch.device):
    def prepare(r0: int, r1: int, e0: int, e1: int, row: np.ndarray, col: np.ndarray) -> _Chunk:
        c = _Chunk(r0, r1, e0, e1, torch.from_numpy(row).to(device), torch.from_numpy(col).to(device))
        m = row.size
        if not scalar_cpu or m == 0:
            return c
        it = _index_type(max(n_cols, m))
        c.indptr = torch.from_numpy(np.searchsorted(row, np.arange(r0, r1 + 1)).astype(it))
        c.col32 = torch.from_numpy(col.astype(it))
        if not backward:
            return c
        key = col * m + np.arange(m, dtype=np.int64)  # by source, then edge order: one sort of values
        key.sort()
        perm = key % m
        t_indptr = np.zeros(n_cols + 1, dtype=it)
        np.cumsum(np.bincount(col, minlength=n_cols), out=t_indptr[1:])
        c.t_indptr = torch.from_numpy(t_indptr)
        c.t_row = torch.from_numpy((row[perm] - r0).astype(it))
        c.perm = torch.from_numpy(perm)
        return c
    return prepare


def _general_forward(y: torch.Tensor, w: torch.Tensor, c: _Chunk, out: torch.Tensor) -> None:
    """`out[r] = sum over the chunk's edges (col -> r) of w_e @ y[col]`."""
    if c.col.numel() == 0:
        out.zero_()
        return
    msg = torch.matmul(w, y.index_select(0, c.col))  # [m, d_v, B]
    _add_rows(out.zero_(), c.row - c.r0, msg)


def _add_rows(out: torch.Tensor, idx: torch.Tensor, msg: torch.Tensor) -> None:
    """`out[idx[e]] += msg[e]` in edge order, as `scatter_add_` over rows flattened to 2-d (on CPU
    a serial sum: deterministic; `index_add_` adds row by row and is ~2x slower)."""
    n, m = out.shape[0], msg.shape[0]
    flat = out.view(n, -1)
    flat.scatter_add_(0, idx.unsqueeze(1).expand(m, flat.shape[1]), msg.reshape(m, flat.shape[1]))


def regen_forward(y: torch.Tensor, w: torch.Tensor, topology) -> torch.Tensor:
    """The forward without autograd: `z [n_rows, d_v, B]` over the topology's chunks."""
    y, w = y.contiguous(), w.contiguous()
    n_cols, B = y.shape[0], y.shape[2]
    scalar = _scalar_cpu(y, w)
    z = y.new_empty(topology.n_rows, w.shape[1], B)
    y2 = y.view(n_cols, -1)
    done = 0
    for c in topology.chunks(_max_edges(w, B, scalar), _preparer(scalar, False, n_cols, y.device)):
        out = z[c.r0:c.r1]
        if scalar and c.col.numel():
            A = ws.csr_tensor(c.indptr, c.col32, w[c.e0:c.e1].reshape(-1), (c.r1 - c.r0, n_cols))
            ws.spmm(A, y2, out=out.view(c.r1 - c.r0, B))
        else:
            _general_forward(y, w[c.e0:c.e1], c, out)
        done = c.r1
    if done != topology.n_rows:
        raise RuntimeError(f"regenerated topology covered rows 0:{done} of {topology.n_rows}")
    return z


def regen_grads(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, topology, want_y: bool = True,
                want_w: bool = True):
    """`(gy, gw)` of `regen_forward` (None where not needed); the edges are drawn again."""
    y, w, gz = y.contiguous(), w.contiguous(), gz.contiguous()
    n_cols, B = y.shape[0], y.shape[2]
    scalar_cpu = _scalar_cpu(y, w)
    gy = torch.zeros_like(y) if want_y else None
    gw = torch.empty_like(w) if want_w else None
    if scalar_cpu:
        y2, gy2 = y.view(n_cols, B), (gy.view(n_cols, B) if want_y else None)
    prepare = _preparer(scalar_cpu, want_y, n_cols, y.device)
    for c in topology.chunks(_max_edges(w, B, scalar_cpu), prepare):
        if c.e1 == c.e0:
            continue
        wc = w[c.e0:c.e1]
        if scalar_cpu:
            r, gzc = c.r1 - c.r0, gz[c.r0:c.r1].view(c.r1 - c.r0, B)
            if want_w:  # per edge: gz[row] . y[col] over the batch (zeros: NaN in the pattern would spread)
                pattern = ws.csr_tensor(c.indptr, c.col32, wc.new_zeros(wc.numel()), (r, n_cols))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gw[c.e0:c.e1].view(-1).copy_(torch.sparse.sampled_addmm(pattern, gzc, y2.t(), beta=0.0).values())
            if want_y:  # gy += A^T gz with the chunk's transposed structure over all sources
                At = ws.csr_tensor(c.t_indptr, c.t_row, wc.reshape(-1)[c.perm], (n_cols, r))
                gy2.addmm_(At, gzc)
            continue
        g = gz.index_select(0, c.row)  # [m, d_v, B]
        if want_w:
            yc = y.index_select(0, c.col)  # [m, d_u, B]
            torch.matmul(g, yc.transpose(1, 2), out=gw[c.e0:c.e1])
            del yc
        if want_y:
            _add_rows(gy, c.col, torch.matmul(wc.transpose(1, 2), g))
    return gy, gw


class _Regenerated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, topology):
        ctx.topology = topology
        ctx.save_for_backward(y, w)
        return regen_forward(y, w, topology)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        return (*regen_grads(gz, y, w, ctx.topology, *ctx.needs_input_grad[:2]), None)


def regenerated_aggregate(y: torch.Tensor, w: torch.Tensor, topology) -> torch.Tensor:
    """`z[j] = sum_{(i->j)} w_ij @ y[i]` with the edges from `topology` (see the module doc);
    y `[n_cols, d_u, B]`, w `[m, d_v, d_u]` in the topology's edge order -> z `[n_rows, d_v, B]`."""
    return _Regenerated.apply(y.contiguous(), w.contiguous(), topology)
