"""The Triton kernels (`@triton.jit`) behind `impl="triton"`; launched from `triton_kernels.py`.

This module imports triton at its top, so it is only ever imported lazily, by
`triton_kernels._load()` on the first `impl="triton"` call. Whether the kernels are compiled or
run by the Triton interpreter is decided then (`TRITON_INTERPRET=1` in the environment at that
moment) and holds for the life of the process.

Invariants shared by every kernel here:
- activations are `[n, d, B]` with the batch contiguous (stride 1); weights `[m, d_v, d_u]`
  contiguous; the caller passes the other strides;
- accumulation is in fp32 and the result is cast to the output pointer's dtype on store;
- every output element is written by exactly one program and each program sums its terms in a
  fixed order (edges in CSR order, batch tiles ascending): no atomics, so reruns are bitwise equal;
- pointer offsets are computed in int64 (row index * row stride can pass 2**31); the per-edge
  index arrays may be int32 and are widened on load;
- `tl.dot` (`USE_DOT`) is only used with every block dimension >= 16 (the GPU minimum), padded
  with masked loads; `UPCAST` (on only under the interpreter, whose `tl.dot` on bf16 operands is
  wrong in triton 3.9) converts the operands to fp32 first; `DOT_PREC` is the `input_precision`
  ("ieee" for fp32 operands, so that fp32 matches the reference to ~1e-6 instead of TF32's 1e-3).
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were decorated


@triton.jit
def agg_scalar_kernel(x_ptr, w_ptr, out_ptr, indptr_ptr, idx_ptr, eperm_ptr, n_rows, B, sx_n, so_n,
                      BR: tl.constexpr, BB: tl.constexpr, HAS_PERM: tl.constexpr):
    """Scalar vertices: `out[r, b] = sum_{e in row r} w[eid(e)] * x[idx[e], b]` (gather-only CSR
    SpMM). One program per block of BR rows and BB batch columns; it walks the block's rows'
    edges in lockstep up to the block's largest degree (masked beyond each row's own)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
    b = tl.program_id(1) * BB + tl.arange(0, BB)  # [BB]
    rm = rows < n_rows
    bm = b < B
    start = tl.load(indptr_ptr + rows, mask=rm, other=0)  # int64 [BR]
    deg = tl.load(indptr_ptr + rows + 1, mask=rm, other=0) - start
    acc = tl.zeros([BR, BB], dtype=tl.float32)
    for k in range(0, tl.max(deg, axis=0)):
        em = k < deg
        e = start + k
        src = tl.load(idx_ptr + e, mask=em, other=0).to(tl.int64)
        if HAS_PERM:
            eid = tl.load(eperm_ptr + e, mask=em, other=0).to(tl.int64)
        else:
            eid = e
        wv = tl.load(w_ptr + eid, mask=em, other=0.0).to(tl.float32)  # [BR]
        xv = tl.load(x_ptr + src[:, None] * sx_n + b[None, :], mask=em[:, None] & bm[None, :],
                     other=0.0).to(tl.float32)  # [BR, BB]
        acc += wv[:, None] * xv
    out = out_ptr + rows.to(tl.int64)[:, None] * so_n + b[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & bm[None, :])


@triton.jit
def agg_block_kernel(x_ptr, w_ptr, out_ptr, indptr_ptr, idx_ptr, eperm_ptr, B,
                     sx_n, sx_d, sw_e, sw_o, sw_i, so_n, so_d,
                     D_OUT: tl.constexpr, D_IN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                     BB: tl.constexpr, HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Block vertices: `out[r] = sum_{e in row r} W_e @ x[idx[e]]` with `W_e` the `[D_OUT, D_IN]`
    block at `w + eid(e) * sw_e` read with strides `(sw_o, sw_i)` (so the input gradient reads
    W^T by swapping them). One program per row and BB batch columns, fp32 accumulator
    `[BO, BB]`; `tl.dot` when USE_DOT, else a broadcast product summed over the inner dim."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BB + tl.arange(0, BB)  # [BB]
    o = tl.arange(0, BO)
    i = tl.arange(0, BI)
    om = o < D_OUT
    im = i < D_IN
    bm = b < B
    w_off = o[:, None] * sw_o + i[None, :] * sw_i  # [BO, BI]
    w_mask = om[:, None] & im[None, :]
    x_off = i[:, None] * sx_d + b[None, :]  # [BI, BB]
    x_mask = im[:, None] & bm[None, :]
    start = tl.load(indptr_ptr + r)
    end = tl.load(indptr_ptr + r + 1)
    acc = tl.zeros([BO, BB], dtype=tl.float32)
    for e in range(start, end):
        src = tl.load(idx_ptr + e).to(tl.int64)
        if HAS_PERM:
            eid = tl.load(eperm_ptr + e).to(tl.int64)
        else:
            eid = e  # int64 already: the loop bounds come from the int64 row pointer
        wb = tl.load(w_ptr + eid * sw_e + w_off, mask=w_mask, other=0.0)  # [BO, BI]
        xb = tl.load(x_ptr + src * sx_n + x_off, mask=x_mask, other=0.0)  # [BI, BB]
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(wb.to(tl.float32), xb.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc = tl.dot(wb, xb, acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(wb.to(tl.float32)[:, :, None] * xb.to(tl.float32)[None, :, :], axis=1)
    out = out_ptr + r * so_n + o[:, None] * so_d + b[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=om[:, None] & bm[None, :])


@triton.jit
def wgrad_scalar_kernel(gz_ptr, y_ptr, gw_ptr, row_ptr, col_ptr, m, B, sg_n, sy_n,
                        BE: tl.constexpr, BB: tl.constexpr):
    """Scalar vertices: `gw[e] = sum_b gz[row_e, b] * y[col_e, b]` (a sampled product), one
    program per BE edges, looping over the batch in tiles of BB."""
    e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)  # [BE]
    em = e < m
    r = tl.load(row_ptr + e, mask=em, other=0).to(tl.int64)
    c = tl.load(col_ptr + e, mask=em, other=0).to(tl.int64)
    acc = tl.zeros([BE], dtype=tl.float32)
    for b0 in range(0, B, BB):
        b = b0 + tl.arange(0, BB)
        mask = em[:, None] & (b < B)[None, :]
        g = tl.load(gz_ptr + r[:, None] * sg_n + b[None, :], mask=mask, other=0.0).to(tl.float32)
        yy = tl.load(y_ptr + c[:, None] * sy_n + b[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * yy, axis=1)
    tl.store(gw_ptr + e, acc.to(gw_ptr.dtype.element_ty), mask=em)


@triton.jit
def wgrad_block_kernel(gz_ptr, y_ptr, gw_ptr, row_ptr, col_ptr, B, sg_n, sg_d, sy_n, sy_d, sw_e, sw_o,
                       D_OUT: tl.constexpr, D_IN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                       BB: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Block vertices: `gw[e] = gz[row_e] @ y[col_e]^T` (`[D_OUT, B] @ [B, D_IN]`), one program
    per edge, the batch reduced inside the program in tiles of BB (fp32 accumulator)."""
    e = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BO)
    i = tl.arange(0, BI)
    om = o < D_OUT
    im = i < D_IN
    r = tl.load(row_ptr + e).to(tl.int64)
    c = tl.load(col_ptr + e).to(tl.int64)
    acc = tl.zeros([BO, BI], dtype=tl.float32)
    for b0 in range(0, B, BB):
        b = b0 + tl.arange(0, BB)
        bm = b < B
        g = tl.load(gz_ptr + r * sg_n + o[:, None] * sg_d + b[None, :],
                    mask=om[:, None] & bm[None, :], other=0.0)  # [BO, BB]
        yy = tl.load(y_ptr + c * sy_n + i[:, None] * sy_d + b[None, :],
                     mask=im[:, None] & bm[None, :], other=0.0)  # [BI, BB]
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(g.to(tl.float32), tl.trans(yy.to(tl.float32)), input_precision=DOT_PREC)
            else:
                acc = tl.dot(g, tl.trans(yy), acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(g.to(tl.float32)[:, None, :] * yy.to(tl.float32)[None, :, :], axis=2)
    out = gw_ptr + e * sw_e + o[:, None] * sw_o + i[None, :]
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=om[:, None] & im[None, :])
