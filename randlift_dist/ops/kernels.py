"""Aggregation implementations and their dispatch: reference, scalar CSR SpMM, degree-grouped
blocked gather-matmul (`blocked.py`), Triton (`triton_kernels.py`).

See the package doc (`ops/__init__.py`) for the algorithms and `bench/kernels.py` /
`bench/step.py` for measurements. The scalar CSR path's backward is the blocked kernel's fused
backward where that wins (vector sources, or scalar sources too big for a cache).

`choose_impl` and `csr_fused_backward` are the one place that decides which kernel and which
backward path run: `aggregate` calls them on its tensors, the memory model (`estimate/`) on the
shapes and dtype of a config, so the two cannot disagree.
"""

from __future__ import annotations

import warnings

import torch

from . import workspace as ws
from . import blocked
from .blocked import _Blocked, _blocked_backward
from .csr import CSR
from . import triton_kernels  # imports no triton: that happens on the first impl="triton" call

IMPLS = ("auto", "reference", "csr", "blocked", "triton")
# The scalar CSR path uses that fused backward from this batch size on (measured at B = 256 only;
# below, the SpMM + sampled product is kept), and at d = 1 only for sources of at least this
# many elements (32 MiB in fp32, an L3 cache: smaller ones are re-read from cache cheaply).
_FUSED_MIN_BATCH = 16
_FUSED_MIN_SCALAR_ELEMS = 1 << 23
# `auto` on CPU: scalar targets with vector sources go to the blocked kernel from this batch on
# (B = 256, 1 x 16 blocks: forward 91 vs 153 ms on 2 threads; mixed results at B = 16 to 64)
_CSR_MAX_BATCH_VECTOR = 128
# MKL's CSR kernels take these dtypes only (no bf16): other dtypes go to the blocked kernel on CPU
_CSR_DTYPES = (torch.float32, torch.float64)


def choose_impl(impl: str, d_v: int, d_u: int, batch: int, dtype: torch.dtype, device: str,
                triton_available: bool) -> str:
    """The kernel `aggregate(..., impl)` runs for weight blocks `[d_v, d_u]`, `batch` samples of
    `dtype` on a `device` of that type ("cpu", "cuda", ...). `triton_available`: triton imports
    here and y and w share the dtype. Anything but `auto` is returned as it is.

    `auto`: triton for CUDA tensors of its dtypes (fp32, bf16, fp16) when available; else, on CPU,
    `csr` for float32/float64 scalar targets (d_v = 1) whose sources are scalar (d_u = 1) or whose
    batch is below `_CSR_MAX_BATCH_VECTOR`; `blocked` otherwise."""
    if impl != "auto":
        return impl
    if device == "cuda" and dtype in triton_kernels.DTYPES and triton_available:
        return "triton"
    if d_v == 1 and device == "cpu" and dtype in _CSR_DTYPES and (d_u == 1 or batch < _CSR_MAX_BATCH_VECTOR):
        return "csr"
    return "blocked"


def csr_fused_backward(d_u: int, n_src: int, batch: int, both_gradients: bool = True) -> bool:
    """Whether the scalar CSR kernel's backward runs the blocked kernel's fused backward (one
    gather of the output gradient for both gradients) for `n_src` source rows of dimension d_u:
    both gradients wanted, batch >= `_FUSED_MIN_BATCH`, and vector sources or a source buffer of
    at least `_FUSED_MIN_SCALAR_ELEMS` values. Otherwise an SpMM on the transposed structure and a
    sampled product (`_ScalarCSR.backward`)."""
    return (both_gradients and blocked._FUSED_BACKWARD and batch >= _FUSED_MIN_BATCH
            and (d_u > 1 or n_src * d_u * batch >= _FUSED_MIN_SCALAR_ELEMS))


def reference_aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """The definition, with plain autograd: z[row] += w @ y[col]."""
    z = y.new_zeros(csr.n_rows, w.shape[1], y.shape[2])  # [n_v, d_v, B]
    msg = torch.matmul(w, y[csr.col])  # [m, d_v, B]
    return z.index_add(0, csr.row, msg)


def csr_forward(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """d_v = 1: `z = A @ Y`, A the scalar CSR matrix `[n_v, n_u * d_u]` of the flat weights."""
    B = y.shape[2]
    x = csr.scalar_expansion(w.shape[2])
    A = ws.csr_tensor(x.indptr, x.col, w.reshape(-1), (x.n_rows, x.n_cols))
    return ws.spmm(A, y.reshape(x.n_cols, B)).view(csr.n_rows, 1, B)  # [n_v, 1, B]


def csr_grads(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, csr: CSR, need_y: bool = True,
              need_w: bool = True):
    """`(gy, gw)` of `csr_forward` (see `_ScalarCSR`)."""
    x = csr.scalar_expansion(w.shape[2])
    B = y.shape[2]
    if csr_fused_backward(w.shape[2], y.shape[0], B, need_y and need_w):
        # one gather of gz rows for both gradients (see `_blocked_backward`), B = 256, 1
        # thread: 2x faster at d_u = 16; at d = 1 1.2x faster for y of 64 MiB, 1.5-2x
        # slower for y of 16 MiB or less (in cache, the second gather is cheap)
        return _blocked_backward(gz.contiguous(), y, w, csr)
    gz2 = gz.reshape(x.n_rows, B).contiguous()
    gy = gw = None
    if need_y:
        At = ws.csr_tensor(x.t_indptr, x.t_col, w.reshape(-1)[x.perm], (x.n_cols, x.n_rows))
        gy = ws.spmm(At, gz2).view(y.shape)
    if need_w:
        # zeros, not empty: sampled_addmm propagates NaN from the pattern's values even at beta=0
        pattern = ws.csr_tensor(x.indptr, x.col, w.new_zeros(w.numel()), (x.n_rows, x.n_cols))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampled = torch.sparse.sampled_addmm(pattern, gz2, y.reshape(x.n_cols, B).t(), beta=0.0)
        gw = sampled.values().view(w.shape)
    return gy, gw


class _ScalarCSR(torch.autograd.Function):
    """d_v = 1 (scalar targets, any d_u): z = A @ Y with A the scalar CSR matrix
    `[n_v, n_u * d_u]` holding the flat weights (`CSR.scalar_expansion`), Y = y as `[n_u*d_u, B]`.

    Backward, both gradients at B >= _FUSED_MIN_BATCH and (d_u > 1 or y too big for a cache):
    the blocked kernels' fused backward (one gather of gZ rows serves both). Else: `gY = A^T @ gZ` with the cached transposed structure
    (torch's `A.t() @ gZ` converts the matrix on every call and is ~10x slower), and
    `gw = sampled(gZ @ Y^T)` on A's pattern.
    Indices are cached as int32 (MKL's index type). Only y and w are saved. For d_u > 1 at small
    batches this beats the blocked kernel 2-3x on CPU (its batched GEMMs have a single row there);
    from B = `_CSR_MAX_BATCH_VECTOR` on the blocked kernel is faster and `auto` takes it.
    """

    @staticmethod
    def forward(ctx, y, w, csr):
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return csr_forward(y, w, csr)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        return (*csr_grads(gz, y, w, ctx.csr, *ctx.needs_input_grad[:2]), None)


def resolve_impl(y: torch.Tensor, w: torch.Tensor, impl: str) -> str:
    """The implementation `impl` stands for on these tensors (`choose_impl` on their shapes, dtype
    and device)."""
    if impl != "auto":
        return impl
    cuda = y.device.type == "cuda"
    return choose_impl(impl, w.shape[1], w.shape[2], y.shape[2], y.dtype, y.device.type,
                       cuda and w.dtype == y.dtype and triton_kernels.available())


def agg_forward(y: torch.Tensor, w: torch.Tensor, csr: CSR, impl: str = "auto") -> torch.Tensor:
    """`aggregate` without autograd (for composite ops that save their own inputs, e.g. `unfold.py`)."""
    impl = resolve_impl(y, w, impl)
    y, w = y.contiguous(), w.contiguous()
    if csr.nnz == 0:
        return y.new_zeros(csr.n_rows, w.shape[1], y.shape[2])
    if impl == "triton":
        from .triton_kernels import triton_forward

        return triton_forward(y, w, csr)
    if impl == "reference":
        with torch.no_grad():
            return reference_aggregate(y, w, csr)
    if impl == "csr":
        return csr_forward(y, w, csr)
    if impl == "blocked":
        return blocked._blocked_forward(y, w, csr)
    raise ValueError(f"unknown aggregation impl {impl!r}: choose one of {IMPLS}")


def agg_backward(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, csr: CSR, impl: str = "auto",
                 need_y: bool = True, need_w: bool = True):
    """`(gy, gw)` of `agg_forward(y, w, csr, impl)` for the output gradient gz (None where not needed)."""
    impl = resolve_impl(y, w, impl)
    y, w, gz = y.contiguous(), w.contiguous(), gz.contiguous()
    if csr.nnz == 0:
        return (torch.zeros_like(y) if need_y else None), (torch.zeros_like(w) if need_w else None)
    if impl == "triton":
        from .triton_kernels import triton_grads

        return triton_grads(gz, y, w, csr, need_y, need_w)
    if impl == "csr":
        return csr_grads(gz, y, w, csr, need_y, need_w)
    if impl == "blocked":
        return blocked.blocked_grads(gz, y, w, csr, need_y, need_w)
    if impl == "reference":
        with torch.enable_grad():
            yy, ww = y.detach().requires_grad_(need_y), w.detach().requires_grad_(need_w)
            want = [t for t in (yy, ww) if t.requires_grad]
            got = iter(torch.autograd.grad(reference_aggregate(yy, ww, csr), want, gz)) if want else iter(())
            return (next(got) if need_y else None), (next(got) if need_w else None)
    raise ValueError(f"unknown aggregation impl {impl!r}: choose one of {IMPLS}")


def aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR, impl: str = "auto") -> torch.Tensor:
    """`z[j] = sum_{(i->j)} w_ij @ y[i]`; y `[n_u, d_u, B]`, w `[m, d_v, d_u]` -> z `[n_v, d_v, B]`."""
    impl = resolve_impl(y, w, impl)  # triton on CUDA (dtypes it supports, if it imports); else csr / blocked
    if impl == "triton":
        triton_kernels.check(y, w)  # imports triton only now
        if csr.nnz:
            return triton_kernels.triton_aggregate(y, w, csr)
    if csr.nnz == 0:
        return y.new_zeros(csr.n_rows, w.shape[1], y.shape[2]) + 0 * w.sum() + 0 * y.sum()
    if impl == "reference":
        return reference_aggregate(y, w, csr)
    if impl == "csr":
        if w.shape[1] != 1:
            raise ValueError("impl='csr' needs scalar vertices (scalar targets, d_v = 1), "
                             f"got weight blocks {tuple(w.shape[1:])}")
        return _ScalarCSR.apply(y.contiguous(), w.contiguous(), csr)
    if impl == "blocked":
        return _Blocked.apply(y.contiguous(), w.contiguous(), csr)
    raise ValueError(f"unknown aggregation impl {impl!r}: choose one of {IMPLS}")
