"""`aggregate(..., impl="triton")`: Triton GPU kernels for the forward, input and weight gradients.

One `torch.autograd.Function` (`TritonAggregate`) saves only y and w; nothing of size
`[m, d, B]` is ever materialised. The kernels (in `triton_jit.py`):
- scalar vertices (`d_u = d_v = 1`): a gather-only CSR SpMM (per block of target rows and batch
  tile, loop over the rows' edges); the input gradient is the same kernel on the transposed
  structure (`CSR.transposed()`), the weight gradient a sampled product reduced over the batch
  (`gw[e] = sum_b gz[row_e, b] * y[col_e, b]`), per tile of edges;
- any other dims: per target row and batch tile, `acc += W_e @ y[col_e]` over the row's in-edges
  with an fp32 accumulator (`tl.dot` when both dims are >= 2 and one is >= 16, padded to 16 with
  masks; a broadcast product otherwise, e.g. d = 8 or d_u = 1); the input gradient is the same
  kernel on the transposed structure reading W^T (swapped strides); the weight gradient one
  program per edge computing `gz[row_e] @ y[col_e]^T` with the batch reduced inside it.

Dtypes: float32, bfloat16 and float16 (y and w of one dtype); fp32 accumulation, results in the
input dtype. fp32 `tl.dot` uses `input_precision="ieee"` (full fp32 products, not TF32's 10-bit
mantissas, so fp32 matches the reference to ~1e-7 relative, as measured under the interpreter,
instead of ~1e-3; it forgoes the tensor cores); bf16/fp16 operands go to the tensor cores as
they are, with fp32 accumulation.
Deterministic: no atomics, fixed summation order, so two calls give bitwise equal results.

Triton is imported lazily (`_load`), never at package import. CUDA tensors run compiled kernels;
CPU tensors only under the Triton interpreter (`TRITON_INTERPRET=1` set before the first
`impl="triton"` call; slow, for tests). Anything else fails with a one-line error naming the fix.
Index arrays (int32 when they fit, else int64) are cached per CSR and device in a weak map.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref

import torch

from .csr import CSR

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch shapes (not yet tuned on a GPU: see bench/gpu_kernels.py).
_SCALAR_ROWS = 16  # target rows per program in the scalar SpMM
_SCALAR_BATCH = 128  # batch tile of the scalar SpMM (upper bound)
_SCALAR_EDGES = 64  # edges per program in the scalar weight gradient
_BLOCK_BATCH = 64  # batch tile of the block kernels (upper bound; >= 16 for tl.dot)
_BCAST_ELEMS = 8192  # register budget of the broadcast (non-tl.dot) product, elements

_INDEX_CACHE: "weakref.WeakKeyDictionary[CSR, dict]" = weakref.WeakKeyDictionary()


def _interpreting() -> bool:
    """Whether `TRITON_INTERPRET` is set now (read as triton reads it; triton must be importable)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether triton can be imported here (`impl="auto"` uses it on CUDA tensors only if so)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _load():
    """The kernel module (imports triton on first use). Its kernels are compiled, or interpreted
    if `TRITON_INTERPRET=1` was set when it was first imported; `check` guards the mismatch."""
    from . import triton_jit
    return triton_jit


def check(y: torch.Tensor, w: torch.Tensor) -> None:
    """Raise a one-line error if `impl="triton"` cannot run on these tensors."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError("impl='triton' needs the triton package: pip install triton "
                           "(or use impl='blocked')") from err
    if y.device.type == "cpu":
        jit = sys.modules.get(__package__ + ".triton_jit")
        if not _interpreting() or (jit is not None and not jit.INTERPRETED):
            raise RuntimeError("impl='triton' needs CUDA tensors (got CPU tensors): move the model to "
                               "a GPU, use impl='blocked', or set TRITON_INTERPRET=1 before the first "
                               "impl='triton' call to run the kernels on CPU (slow, for tests)")
    if y.dtype not in DTYPES or w.dtype != y.dtype:
        raise ValueError(f"impl='triton' supports y and w of one dtype among float32, bfloat16, "
                         f"float16 (got y {y.dtype}, w {w.dtype}): use impl='blocked' for others")
    if y.device != w.device:
        raise ValueError(f"impl='triton': y is on {y.device} but w on {w.device}; put both on one device")


def _idx(t: torch.Tensor, limit: int) -> torch.Tensor:
    return t.to(torch.int32) if limit < 2**31 - 1 else t.to(torch.int64)


def _indices(csr: CSR, device: torch.device) -> dict[str, torch.Tensor]:
    """Device index arrays of `csr` for the kernels, cached per CSR and device."""
    per_csr = _INDEX_CACHE.setdefault(csr, {})
    key = str(device)
    if key not in per_csr:
        t_indptr, t_row, perm = csr.transposed()
        lim = max(csr.nnz, csr.n_rows, csr.n_cols)
        per_csr[key] = {
            "indptr": csr.indptr.to(device, torch.int64),  # [n_rows + 1]
            "row": _idx(csr.row, lim).to(device),  # [m]
            "col": _idx(csr.col, lim).to(device),  # [m]
            "t_indptr": t_indptr.to(device, torch.int64),  # [n_cols + 1]
            "t_row": _idx(t_row, lim).to(device),  # [m], target of each edge in source order
            "perm": _idx(perm, lim).to(device),  # [m], source order -> CSR order
        }
    return per_csr[key]


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def dot_config(d_o: int, d_i: int, dtype: torch.dtype, interp: bool) -> dict:
    """Padded block sizes and the `tl.dot` switches for an `[d_o, d_i]` weight block (`interp`:
    for the interpreter, which needs bf16/fp16 `tl.dot` operands upcast)."""
    use_dot = min(d_o, d_i) > 1 and max(d_o, d_i) >= 16
    lo = 16 if use_dot else 1
    return dict(BO=_pow2(d_o, lo), BI=_pow2(d_i, lo), USE_DOT=use_dot,
                UPCAST=interp and dtype != torch.float32,
                DOT_PREC="ieee" if dtype == torch.float32 or interp else None)


def batch_tile(B: int, cfg: dict) -> int:
    """Batch tile: >= 16 for tl.dot; for the broadcast product, the `[BO, BI, BB]` temporary
    stays within the register budget."""
    if cfg["USE_DOT"]:
        return min(_BLOCK_BATCH, _pow2(B, 16))
    return max(1, min(_BLOCK_BATCH, _pow2(B), _BCAST_ELEMS // (cfg["BO"] * cfg["BI"])))


def _spmm(x: torch.Tensor, w: torch.Tensor, n_out: int, indptr: torch.Tensor, idx: torch.Tensor,
          eperm: torch.Tensor | None, transpose_w: bool) -> torch.Tensor:
    """`out[r] = sum_{e in indptr[r]:indptr[r+1]} W_{eperm[e]} @ x[idx[e]]` (W^T if transpose_w).

    x `[n_in, d_in, B]` contiguous, w `[m, d_v, d_u]` contiguous -> out `[n_out, d_out, B]`."""
    jit = _load()
    _, d_v, d_u = w.shape
    d_o, d_i = (d_u, d_v) if transpose_w else (d_v, d_u)
    B = x.shape[2]
    out = x.new_empty(n_out, d_o, B)
    if n_out == 0 or B == 0:
        return out
    has_perm = eperm is not None
    eperm = idx if eperm is None else eperm  # unused placeholder pointer when not has_perm
    if d_o == 1 and d_i == 1:
        BB = min(_SCALAR_BATCH, _pow2(B))
        grid = (_cdiv(n_out, _SCALAR_ROWS), _cdiv(B, BB))
        jit.agg_scalar_kernel[grid](x, w, out, indptr, idx, eperm, n_out, B, x.stride(0), out.stride(0),
                                    BR=_SCALAR_ROWS, BB=BB, HAS_PERM=has_perm, num_warps=4)
        return out
    cfg = dot_config(d_o, d_i, w.dtype, jit.INTERPRETED)
    BB = batch_tile(B, cfg)
    sw_o, sw_i = (w.stride(2), w.stride(1)) if transpose_w else (w.stride(1), w.stride(2))
    grid = (n_out, _cdiv(B, BB))
    jit.agg_block_kernel[grid](x, w, out, indptr, idx, eperm, B, x.stride(0), x.stride(1),
                               w.stride(0), sw_o, sw_i, out.stride(0), out.stride(1),
                               D_OUT=d_o, D_IN=d_i, BB=BB, HAS_PERM=has_perm, num_warps=4, **cfg)
    return out


def _grad_weight(gz: torch.Tensor, y: torch.Tensor, w_shape, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """`gw[e] = gz[row_e] @ y[col_e]^T`; gz `[n_v, d_v, B]`, y `[n_u, d_u, B]` -> gw `[m, d_v, d_u]`."""
    jit = _load()
    m, d_v, d_u = w_shape
    B = y.shape[2]
    gw = y.new_empty(m, d_v, d_u)
    if m == 0:
        return gw
    if B == 0:
        return gw.zero_()
    if d_v == 1 and d_u == 1:
        BB = min(_SCALAR_BATCH, _pow2(B))
        grid = (_cdiv(m, _SCALAR_EDGES),)
        jit.wgrad_scalar_kernel[grid](gz, y, gw, row, col, m, B, gz.stride(0), y.stride(0),
                                      BE=_SCALAR_EDGES, BB=BB, num_warps=4)
        return gw
    cfg = dot_config(d_v, d_u, y.dtype, jit.INTERPRETED)
    BB = batch_tile(B, cfg)
    jit.wgrad_block_kernel[(m,)](gz, y, gw, row, col, B, gz.stride(0), gz.stride(1), y.stride(0),
                                 y.stride(1), gw.stride(0), gw.stride(1), D_OUT=d_v, D_IN=d_u, BB=BB,
                                 num_warps=4, **cfg)
    return gw


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device), or nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def triton_forward(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """The forward kernel without autograd; y, w contiguous, on one device."""
    check(y, w)
    ix = _indices(csr, y.device)
    with _on_device(y):
        return _spmm(y, w, csr.n_rows, ix["indptr"], ix["col"], None, transpose_w=False)


def triton_grads(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, csr: CSR, need_y: bool = True,
                 need_w: bool = True):
    """`(gy, gw)` of `triton_forward` (None where not needed)."""
    ix = _indices(csr, y.device)
    gz = gz.to(y.dtype).contiguous()
    gy = gw = None
    with _on_device(y):
        if need_y:
            gy = _spmm(gz, w, csr.n_cols, ix["t_indptr"], ix["t_row"], ix["perm"], transpose_w=True)
        if need_w:
            gw = _grad_weight(gz, y, w.shape, ix["row"], ix["col"])
    return gy, gw


class TritonAggregate(torch.autograd.Function):
    """`z = aggregate(y, w, csr)` with the Triton kernels; saves only y and w."""

    @staticmethod
    def forward(ctx, y, w, csr):
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return triton_forward(y, w, csr)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        return (*triton_grads(gz, y, w, ctx.csr, *ctx.needs_input_grad[:2]), None)


def triton_aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """`z[j] = sum_{(i->j)} w_ij @ y[i]`; y `[n_u, d_u, B]`, w `[m, d_v, d_u]` -> z `[n_v, d_v, B]`."""
    check(y, w)
    if y.shape[0] != csr.n_cols or w.shape[0] != csr.nnz or w.shape[2] != y.shape[1]:
        raise ValueError(f"impl='triton': shapes y {tuple(y.shape)}, w {tuple(w.shape)} do not fit a CSR "
                         f"of {csr.nnz} edges from {csr.n_cols} sources (need y [n_u, d_u, B], w [m, d_v, d_u])")
    return TritonAggregate.apply(y.contiguous(), w.contiguous(), csr)


def compile_for_target(arch: int = 90, dtypes=(torch.float32, torch.bfloat16)) -> int:
    """Compile every kernel variant the dispatcher launches for these dims, to a cubin for CUDA
    compute capability `arch` (90: H100/H200), without a GPU (ptxas ships with triton). Checks
    the GPU code path (tl.dot shape limits, dtypes, dynamic loops) on CPU-only machines. Must run
    in a process where `TRITON_INTERPRET` was unset when triton was imported. Returns the count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _load()
    if jit.INTERPRETED:
        raise RuntimeError("compile_for_target needs a process without TRITON_INTERPRET=1")
    target, n = GPUTarget("cuda", arch, 32), 0

    def build(fn, types: dict, consts: dict) -> None:
        nonlocal n
        sig = {a: "constexpr" if a in consts else types.get(a, "i64") for a in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": 4})
        n += 1

    for dtype in dtypes:
        t = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        types = dict(x_ptr=t, w_ptr=t, out_ptr=t, gz_ptr=t, y_ptr=t, gw_ptr=t, indptr_ptr="*i64",
                     idx_ptr="*i32", eperm_ptr="*i32", row_ptr="*i32", col_ptr="*i32", B="i32")
        build(jit.agg_scalar_kernel, types, dict(BR=_SCALAR_ROWS, BB=_SCALAR_BATCH, HAS_PERM=True))
        build(jit.wgrad_scalar_kernel, types, dict(BE=_SCALAR_EDGES, BB=_SCALAR_BATCH))
        for d_o, d_i, B in ((16, 16, 256), (32, 16, 8), (8, 8, 64), (16, 1, 64), (1, 16, 1), (3, 5, 7)):
            cfg = dot_config(d_o, d_i, dtype, interp=False)
            BB = batch_tile(B, cfg)
            build(jit.agg_block_kernel, types, dict(D_OUT=d_o, D_IN=d_i, BB=BB, HAS_PERM=True, **cfg))
            build(jit.wgrad_block_kernel, types, dict(D_OUT=d_o, D_IN=d_i, BB=BB, **cfg))
    return n
