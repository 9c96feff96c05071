"""Aggregation implementations: reference, scalar CSR SpMM, degree-grouped blocked gather-matmul.

See the package doc (`ops/__init__.py`) for the algorithms and `bench/kernels.py` /
`bench/step.py` for measurements. Backward, when both gradients are wanted (training):
`_blocked_backward` walks the sources grouped by out-degree and gathers the output-gradient rows
of their edges ONCE per chunk `[c, k*d_v, B]`; that chunk gives the input gradient (times the
sources' weight blocks) and the weight gradient (times the sources' own rows, read in place or
gathered c rows at a time), written to edge order with one `index_copy_` per chunk. It moves a
third fewer gathered bytes per training step than separate input- and weight-gradient kernels
(those are kept for single gradients and small batches). The scalar CSR path uses it too where it
wins (vector sources, or scalar sources too big for a cache). Every path is deterministic: no
atomics, no `index_add_`; every output element is written by exactly one chunk.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .csr import CSR, DegreeGroups

IMPLS = ("auto", "reference", "csr", "blocked", "triton")
# Elements of one gathered chunk ([rows, k * d, B], and of its weight blocks) in the blocked
# kernel. 2**21 fp32 elements is 8 MiB: the chunk is consumed by the matmul while it is still in
# cache, and there are few enough chunks that per-op overhead stays small (measured: 2**19 to
# 2**22 are within noise at d = 16, B = 256; 2**17 is 1.5x slower). The workspaces are reused.
# On a 2-core AMD EPYC: with 2 threads 2**21 is best (fused backward 333 ms vs 349 at 2**20 and
# 2**22, up to 2x slower at 2**19); with 1 thread 2**19 is ~10% faster, but training uses both.
_CHUNK_ELEMS = 1 << 21
# On accelerators, bigger chunks (fewer kernel launches; the caching allocator makes them cheap).
# Untested on a GPU so far: tune there.
_CHUNK_ELEMS_ACCEL = 1 << 25
# Scratch buffers up to this many elements are kept for reuse (per thread, dtype and slot; six
# slots, so at most ~6 * 32 MiB in fp32, typically much less); bigger ones are allocated per call.
_WS_CACHE_MAX = 1 << 23
# Both blocked gradients from one gather of the output gradients (`_blocked_backward`); False
# runs the two separate kernels (kept for the small-batch path, single gradients and benchmarks).
_FUSED_BACKWARD = True
# The scalar CSR path uses that fused backward from this batch size on (measured at B = 256 only;
# below, the SpMM + sampled product is kept), and at d = 1 only for sources of at least this
# many elements (32 MiB in fp32, an L3 cache: smaller ones are re-read from cache cheaply).
_FUSED_MIN_BATCH = 16
_FUSED_MIN_SCALAR_ELEMS = 1 << 23


def reference_aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """The definition, with plain autograd: z[row] += w @ y[col]."""
    z = y.new_zeros(csr.n_rows, w.shape[1], y.shape[2])  # [n_v, d_v, B]
    msg = torch.matmul(w, y[csr.col])  # [m, d_v, B]
    return z.index_add(0, csr.row, msg)


# ----------------------------------------------------------------------------- workspaces
_tls = threading.local()


def _workspace(n: int, like: torch.Tensor, slot: int) -> torch.Tensor:
    """A flat scratch buffer of n elements, reused across calls on CPU (per thread, dtype, slot).

    Only on CPU and up to `_WS_CACHE_MAX` elements: there a fresh multi-MiB allocation is a fresh
    mmap whose page faults cost more than the copy into it. On accelerators the caching allocator
    already recycles memory (and reusing one buffer across streams would need stream bookkeeping),
    so we allocate.
    """
    if like.device.type != "cpu" or n > _WS_CACHE_MAX:
        return like.new_empty(n)
    cache = getattr(_tls, "ws", None)
    if cache is None:
        cache = _tls.ws = {}
    key = (like.dtype, slot)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = like.new_empty(max(n, 1024))
    return buf[:n]


def release_workspaces() -> None:
    """Free this thread's cached scratch buffers (a few tens of MiB at most; see `_workspace`)."""
    _tls.ws = {}


def _ws_view(shape: tuple[int, ...], like: torch.Tensor, slot: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return _workspace(n, like, slot).view(shape)


# ----------------------------------------------------------------------------- scalar CSR
def _csr_tensor(indptr, col, values, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(indptr, col, values, size=shape, check_invariants=False)


def _spmm(A: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`A @ x` for a CSR matrix A (into `out` if given). On CPU, into an uninitialised output with
    `addmm(beta=0)` (documented to ignore the input; MKL writes every row, empty ones as 0):
    `torch.sparse.mm` zero-fills a fresh output and allocates once more, which cost ~20 ms of
    ~50 ms at 32768 x 256 on the benchmark VM (page faults of fresh 32 MiB buffers dominate)."""
    if x.device.type != "cpu":
        r = torch.sparse.mm(A, x)
        return r if out is None else out.copy_(r)
    if out is None:
        out = x.new_empty(A.shape[0], x.shape[1])
    return torch.addmm(out, A, x, beta=0.0, out=out)


class _ScalarCSR(torch.autograd.Function):
    """d_v = 1 (scalar targets, any d_u): z = A @ Y with A the scalar CSR matrix
    `[n_v, n_u * d_u]` holding the flat weights (`CSR.scalar_expansion`), Y = y as `[n_u*d_u, B]`.

    Backward, both gradients at B >= _FUSED_MIN_BATCH and (d_u > 1 or y too big for a cache):
    the blocked kernels' fused backward (one gather of gZ rows serves both). Else: `gY = A^T @ gZ` with the cached transposed structure
    (torch's `A.t() @ gZ` converts the matrix on every call and is ~10x slower), and
    `gw = sampled(gZ @ Y^T)` on A's pattern.
    Indices are cached as int32 (MKL's index type). Only y and w are saved. For d_u > 1 this
    beats the blocked kernel 2-3x on CPU (its batched GEMMs have a single row there).
    """

    @staticmethod
    def forward(ctx, y, w, csr):
        B = y.shape[2]
        x = csr.scalar_expansion(w.shape[2])
        A = _csr_tensor(x.indptr, x.col, w.reshape(-1), (x.n_rows, x.n_cols))
        z = _spmm(A, y.reshape(x.n_cols, B))  # [n_v, B]
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return z.view(csr.n_rows, 1, B)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        x = ctx.csr.scalar_expansion(w.shape[2])
        B = y.shape[2]
        if (all(ctx.needs_input_grad[:2]) and _FUSED_BACKWARD and B >= _FUSED_MIN_BATCH
                and (w.shape[2] > 1 or y.numel() >= _FUSED_MIN_SCALAR_ELEMS)):
            # one gather of gz rows for both gradients (see `_blocked_backward`), B = 256, 1
            # thread: 2x faster at d_u = 16; at d = 1 1.2x faster for y of 64 MiB, 1.5-2x
            # slower for y of 16 MiB or less (in cache, the second gather is cheap)
            return (*_blocked_backward(gz.contiguous(), y, w, ctx.csr), None)
        gz2 = gz.reshape(x.n_rows, B).contiguous()
        gy = gw = None
        if ctx.needs_input_grad[0]:
            At = _csr_tensor(x.t_indptr, x.t_col, w.reshape(-1)[x.perm], (x.n_cols, x.n_rows))
            gy = _spmm(At, gz2).view(y.shape)
        if ctx.needs_input_grad[1]:
            # zeros, not empty: sampled_addmm propagates NaN from the pattern's values even at beta=0
            pattern = _csr_tensor(x.indptr, x.col, w.new_zeros(w.numel()), (x.n_rows, x.n_cols))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sampled = torch.sparse.sampled_addmm(pattern, gz2, y.reshape(x.n_cols, B).t(), beta=0.0)
            gw = sampled.values().view(w.shape)
        return gy, gw, None


# ----------------------------------------------------------------------------- blocked
def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(a, b, out=out)`, except an inner dimension of 1 (outer products), where MKL's
    batched GEMM is ~20x slower than the broadcast product."""
    if a.shape[2] == 1:
        return torch.mul(a, b, out=out)
    return torch.bmm(a, b, out=out)


def _row_chunks(groups: DegreeGroups, w_shape, B: int, device: torch.device):
    """Yield `(k, rows, pos, e0, q)` chunks of rows with k edges whose gathered activations and
    weight blocks each hold at most ~_CHUNK_ELEMS elements; `pos` is the chunk's offset in the
    degree-sorted order, `e0` its first edge when its edges are one range (else None), and its
    edges are `groups.edges[q:q + k * len(rows)]`."""
    _, d_v, d_u = w_shape
    per_edge = max(d_u * B, d_v * B, d_u * d_v)
    budget = _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_ACCEL
    for g in groups.groups:
        c = max(1, budget // (g.k * per_edge))
        for s in range(0, g.rows.numel(), c):
            yield (g.k, g.rows[s:s + c], g.pos + s, (None if g.r0 is None else g.e0 + s * g.k),
                   g.q + s * g.k)


class _Output:
    """Where the per-chunk results of a degree-grouped kernel go, and how they reach row order.

    - all rows in degree order already (e.g. one fixed degree): straight into the result;
    - output up to `_WS_CACHE_MAX` elements: into a reused buffer in degree-sorted order, then
      one gather (`index_select`) into row order;
    - bigger outputs: each chunk's rows are scattered into the result with `index_copy_`.
    Measured (2 threads, d = 16 and mixed 16/1, B = 256): the last two are within ~5% of each
    other, and both 1.2-2x faster than gathering from a freshly allocated sorted buffer (fresh
    pages cost ~0.5 ms per MiB on the benchmark VM). Rows without edges are zeroed.
    """

    def __init__(self, groups: DegreeGroups, shape: tuple[int, ...], like: torch.Tensor):
        self.groups = groups
        n = 1
        for s in shape:
            n *= s
        self.mode = "direct" if groups.identity else ("sorted" if n <= _WS_CACHE_MAX else "scatter")
        if self.mode == "sorted":
            self.buf = _ws_view(shape, like, 4)
            if groups.n_empty:
                self.buf[:groups.n_empty].zero_()
        else:
            self.buf = like.new_empty(shape)
            if groups.n_empty and self.mode == "direct":
                self.buf[:groups.n_empty].zero_()
            elif groups.n_empty:
                self.buf.index_fill_(0, groups.empty_rows, 0)
        self.like = like

    def target(self, pos: int, c: int) -> torch.Tensor:
        if self.mode == "scatter":
            return _ws_view((c, *self.buf.shape[1:]), self.like, 2)
        return self.buf[pos:pos + c]

    def commit(self, rows: torch.Tensor, t: torch.Tensor) -> None:
        if self.mode == "scatter":
            self.buf.index_copy_(0, rows, t)

    def result(self) -> torch.Tensor:
        return self.buf.index_select(0, self.groups.inv) if self.mode == "sorted" else self.buf


def _vk_index(e: torch.Tensor, c: int, k: int, d_v: int) -> torch.Tensor:
    """Row ids of `w.view(m * d_v, d_u)` in the order (row n, v, slot k): `e[n, k] * d_v + v`."""
    return (e.view(c, 1, k) * d_v + torch.arange(d_v, device=e.device).view(1, d_v, 1)).reshape(-1)


def _gather_w_vk(w: torch.Tensor, e: torch.Tensor | None, e0: int | None, c: int, k: int) -> torch.Tensor:
    """`[c, d_v, k * d_u]`: for each of c rows, its k weight blocks side by side (`[W_1 ... W_k]`)."""
    _, d_v, d_u = w.shape
    if e is None:  # edges e0 .. e0 + c*k, in row order
        src = w[e0:e0 + c * k].view(c, k, d_v, d_u)
        if d_v == 1 or k == 1:
            return src.view(c, d_v, k * d_u) if d_v == 1 else src.view(c, d_v, d_u)
        out = _ws_view((c, d_v, k, d_u), w, 1)
        out.copy_(src.transpose(1, 2))
        return out.view(c, d_v, k * d_u)
    if d_v == 1 or k == 1:
        return torch.index_select(w, 0, e, out=_ws_view((c * k, d_v, d_u), w, 1)).view(c, d_v, k * d_u)
    if d_u >= 8:  # whole blocks, then one strided copy: ~1.4x faster than gathering d_u-rows
        blocks = torch.index_select(w, 0, e, out=_ws_view((c * k, d_v, d_u), w, 3))
        out = _ws_view((c, d_v, k, d_u), w, 1)
        out.copy_(blocks.view(c, k, d_v, d_u).transpose(1, 2))
        return out.view(c, d_v, k * d_u)
    out = _ws_view((c * d_v * k, d_u), w, 1)
    torch.index_select(w.view(-1, d_u), 0, _vk_index(e, c, k, d_v), out=out)
    return out.view(c, d_v, k * d_u)


def _small_batch(w_shape, B: int) -> bool:
    """True when an edge's weight block is bigger than its activations (B < 16 at d = 16): then
    streaming the weights in place beats rearranging them for the grouped GEMM (measured at
    d = 16: 1.3-1.5x faster forward for B = 4 to 12, equal at 16 to 24)."""
    _, d_v, d_u = w_shape
    return B * max(d_u, d_v) < d_u * d_v


def _row_ranges(csr: CSR, per_edge: int, device: torch.device) -> list[tuple[int, int, int, int]]:
    """`(r0, r1, e0, e1)`: consecutive row ranges holding ~chunk-budget / per_edge edges each."""
    budget = _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_ACCEL
    step = max(1, budget // per_edge)
    bounds = {0, csr.n_rows}
    if step < csr.nnz:
        targets = torch.arange(step, csr.nnz, step, device=csr.indptr.device)
        bounds.update(torch.searchsorted(csr.indptr, targets).tolist())
    bounds = sorted(bounds)
    ptr = csr.indptr[bounds].tolist()
    return [(bounds[i], bounds[i + 1], ptr[i], ptr[i + 1]) for i in range(len(bounds) - 1)]


def _segment_matrix(indptr: torch.Tensor, r0: int, r1: int, e0: int, e1: int,
                    like: torch.Tensor) -> torch.Tensor:
    """The 0/1 CSR matrix `[r1 - r0, e1 - e0]` summing each row's (consecutive) edges: MKL's SpMM
    does this segment sum ~10x faster than `index_add_` or `segment_reduce` at small rows."""
    c = e1 - e0
    crow = (indptr[r0:r1 + 1] - e0).to(torch.int32)
    col = torch.arange(c, dtype=torch.int32, device=indptr.device)
    return _csr_tensor(crow, col, like.new_ones(c), (r1 - r0, c))


def _blocked_forward_small_batch(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """Small batches: the weights dominate the traffic, so read them in place. Per range of rows
    (in row order, so the edges and weights are one contiguous range): gather the sources,
    multiply edge by edge (`[c, d_v, d_u] @ [c, d_u, B]`), and sum each row's messages with a 0/1
    CSR SpMM straight into z. The message chunk is smaller than the weights it came from."""
    m, d_v, d_u = w.shape
    B = y.shape[2]
    z = y.new_empty(csr.n_rows, d_v, B)
    for r0, r1, e0, e1 in _row_ranges(csr, d_v * d_u, y.device):
        c = e1 - e0
        if c == 0:
            z[r0:r1].zero_()
            continue
        yg = torch.index_select(y, 0, csr.col[e0:e1], out=_ws_view((c, d_u, B), y, 0))
        msg = _bmm(w[e0:e1], yg, out=_ws_view((c, d_v, B), y, 3))
        S = _segment_matrix(csr.indptr, r0, r1, e0, e1, y)
        _spmm(S, msg.view(c, d_v * B), out=z[r0:r1].view(r1 - r0, d_v * B))
    return z


def _blocked_grad_weight_small_batch(gz: torch.Tensor, y: torch.Tensor, w_shape, csr: CSR) -> torch.Tensor:
    """Small batches: per range of edges, `gw[e] = gz[row_e] @ y[col_e]^T` written in place."""
    m, d_v, d_u = w_shape
    B = y.shape[2]
    gw = gz.new_empty(m, d_v, d_u)
    for r0, r1, e0, e1 in _row_ranges(csr, d_v * d_u, y.device):
        c = e1 - e0
        if c == 0:
            continue
        gg = torch.index_select(gz, 0, csr.row[e0:e1], out=_ws_view((c, d_v, B), gz, 2))
        yg = torch.index_select(y, 0, csr.col[e0:e1], out=_ws_view((c, d_u, B), y, 0))
        _bmm(gg, yg.transpose(1, 2), out=gw[e0:e1])
    return gw


def _blocked_forward(y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """z = sum over edges of W @ y[col], one batched matmul per (degree, chunk) of target rows.

    For the c rows of a chunk that all have k in-edges: gather their sources into `[c, k*d_u, B]`,
    lay their weights side by side as `[c, d_v, k*d_u]` and multiply: each row's sum over edges
    becomes the inner dimension of one GEMM, so there is no scatter-add and no `[m, d_v, B]`
    message tensor. Results land in degree-sorted order and are put in row order by one gather
    (nothing to do when all rows have the same degree).
    """
    m, d_v, d_u = w.shape
    B = y.shape[2]
    if _small_batch(w.shape, B):
        return _blocked_forward_small_batch(y, w, csr)
    groups = csr.degree_groups()
    z = _Output(groups, (csr.n_rows, d_v, B), y)
    for k, rows, pos, e0, q in _row_chunks(groups, w.shape, B, y.device):
        c = rows.numel()
        e = groups.edges[q:q + c * k] if e0 is None else None
        src = csr.col[e0:e0 + c * k] if e is None else csr.col.index_select(0, e)
        yg = torch.index_select(y, 0, src, out=_ws_view((c * k, d_u, B), y, 0))
        z.commit(rows, _bmm(_gather_w_vk(w, e, e0, c, k), yg.view(c, k * d_u, B), out=z.target(pos, c)))
    return z.result()


def _blocked_grad_input(gz: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
    """gy[i] = sum over out-edges (i -> j) of W^T @ gz[j]: the forward kernel on the transposed
    structure (no scatter-add, so deterministic). The weights need no rearranging: for a source
    with k out-edges, `[W_1^T ... W_k^T]` is the transpose of the `[k * d_v, d_u]` stack of its
    gathered blocks."""
    m, d_v, d_u = w.shape
    B = gz.shape[2]
    t_indptr, t_row, perm = csr.transposed()
    groups = csr.degree_groups(transposed=True)
    gy = _Output(groups, (csr.n_cols, d_u, B), gz)
    for k, srcs, pos, p0, q in _row_chunks(groups, w.shape, B, gz.device):
        c = srcs.numel()
        if p0 is not None:
            e = perm[p0:p0 + c * k]
            tgt = t_row[p0:p0 + c * k]
        else:
            p = groups.edges[q:q + c * k]
            e = perm.index_select(0, p)
            tgt = t_row.index_select(0, p)
        gg = torch.index_select(gz, 0, tgt, out=_ws_view((c * k, d_v, B), gz, 0)).view(c, k * d_v, B)
        wt = torch.index_select(w, 0, e, out=_ws_view((c * k, d_v, d_u), w, 1)).view(c, k * d_v, d_u)
        gy.commit(srcs, _bmm(wt.transpose(1, 2), gg, out=gy.target(pos, c)))
    return gy.result()


def _blocked_grad_weight(gz: torch.Tensor, y: torch.Tensor, w_shape, csr: CSR) -> torch.Tensor:
    """gw[e] = gz[row_e] @ y[col_e]^T: per chunk of rows with k edges, one batched matmul of the
    gathered sources `[c, k*d_u, B]` with `gz[rows]^T` `[c, B, d_v]` (the gather is recomputed
    here, never saved), giving `[c, k, d_u, d_v]`, then transposed into gw's blocks. (This
    operand order ran ~30% faster than `gz[rows] @ gathered^T` with MKL.)"""
    m, d_v, d_u = w_shape
    B = y.shape[2]
    if _small_batch(w_shape, B):
        return _blocked_grad_weight_small_batch(gz, y, w_shape, csr)
    gw = gz.new_empty(m, d_v, d_u)
    groups = csr.degree_groups()
    for k, rows, pos, e0, q in _row_chunks(groups, w_shape, B, y.device):
        c = rows.numel()
        e = groups.edges[q:q + c * k] if e0 is None else None
        src = csr.col[e0:e0 + c * k] if e is None else csr.col.index_select(0, e)
        g = torch.index_select(gz, 0, rows, out=_ws_view((c, d_v, B), gz, 2))
        yg = torch.index_select(y, 0, src, out=_ws_view((c * k, d_u, B), y, 0)).view(c, k * d_u, B)
        prod = _bmm(yg, g.transpose(1, 2), out=_ws_view((c, k * d_u, d_v), gz, 1))
        blocks = prod.view(c * k, d_u, d_v).transpose(1, 2)  # [c*k, d_v, d_u]
        if e is None:
            gw[e0:e0 + c * k].copy_(blocks)
        else:
            if min(d_u, d_v) > 1:
                blocks = _ws_view((c * k, d_v, d_u), gz, 3).copy_(blocks)
            gw.index_copy_(0, e, blocks.reshape(c * k, d_v, d_u))
    return gw


def _blocked_backward(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, csr: CSR):
    """Both gradients from ONE gather of the output gradients, on the transposed structure.

    For a chunk of c sources with k out-edges each: gather `gz[targets]` once as `[c, k*d_v, B]`;
    then `gy[i] = [W_1^T ... W_k^T] @ gathered` (as in `_blocked_grad_input`) and, with the
    sources' own rows `y[i]` (a slice, or a small gather of c rows), the weight gradients
    `gathered @ y[i]^T` `[c, k*d_v, d_u]`, which is already the `[k, d_v, d_u]` stack of the
    sources' edge blocks: one `index_copy_` puts them in edge order (each edge once, so
    deterministic). Versus the separate kernels this saves the second gather of `[m, d_u, B]`
    source rows (a third of the training step's gathered bytes), at the price of scattering
    `[m, d_v, d_u]` gradient blocks (B / d_v times fewer bytes)."""
    m, d_v, d_u = w.shape
    B = gz.shape[2]
    t_indptr, t_row, perm = csr.transposed()
    groups = csr.degree_groups(transposed=True)
    gy = _Output(groups, (csr.n_cols, d_u, B), gz)
    gw = gz.new_empty(m, d_v, d_u)
    for k, srcs, pos, p0, q in _row_chunks(groups, w.shape, B, gz.device):
        c = srcs.numel()
        if p0 is not None:  # contiguous sources: their edges are one range of the transposed order
            e = perm[p0:p0 + c * k]
            tgt = t_row[p0:p0 + c * k]
            ys = y.narrow(0, int(srcs[0]), c)
        else:
            p = groups.edges[q:q + c * k]
            e = perm.index_select(0, p)
            tgt = t_row.index_select(0, p)
            ys = torch.index_select(y, 0, srcs, out=_ws_view((c, d_u, B), y, 3))
        gg = torch.index_select(gz, 0, tgt, out=_ws_view((c * k, d_v, B), gz, 0)).view(c, k * d_v, B)
        wt = torch.index_select(w, 0, e, out=_ws_view((c * k, d_v, d_u), w, 1)).view(c, k * d_v, d_u)
        gy.commit(srcs, _bmm(wt.transpose(1, 2), gg, out=gy.target(pos, c)))
        blocks = _bmm(gg, ys.transpose(1, 2), out=_ws_view((c, k * d_v, d_u), gz, 5))
        gw.index_copy_(0, e, blocks.view(c * k, d_v, d_u))
    return gy.result(), gw


class _Blocked(torch.autograd.Function):
    """Any dims; see `_blocked_forward`, `_blocked_grad_input`, `_blocked_grad_weight`.

    Saves only y and w: the gathers are recomputed chunk by chunk in the backward, so no
    `[m, d, B]` tensor lives between forward and backward.
    """

    @staticmethod
    def forward(ctx, y, w, csr):
        ctx.csr = csr
        ctx.save_for_backward(y, w)
        return _blocked_forward(y, w, csr)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        csr = ctx.csr
        gz = gz.contiguous()
        if all(ctx.needs_input_grad[:2]) and not _small_batch(w.shape, gz.shape[2]) and _FUSED_BACKWARD:
            return (*_blocked_backward(gz, y, w, csr), None)
        gy = _blocked_grad_input(gz, w, csr) if ctx.needs_input_grad[0] else None
        gw = _blocked_grad_weight(gz, y, w.shape, csr) if ctx.needs_input_grad[1] else None
        return gy, gw, None


def aggregate(y: torch.Tensor, w: torch.Tensor, csr: CSR, impl: str = "auto") -> torch.Tensor:
    """`z[j] = sum_{(i->j)} w_ij @ y[i]`; y `[n_u, d_u, B]`, w `[m, d_v, d_u]` -> z `[n_v, d_v, B]`."""
    if impl == "auto":  # triton on CUDA (dtypes it supports, if it imports); else csr / blocked
        # MKL's CSR kernels take float32/float64 only: bf16 on CPU goes to the blocked kernel
        scalar_cpu = w.shape[1] == 1 and y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)
        impl = "csr" if scalar_cpu else "blocked"
        if y.device.type == "cuda":
            from . import triton_kernels  # does not import triton itself

            if y.dtype in triton_kernels.DTYPES and w.dtype == y.dtype and triton_kernels.available():
                impl = "triton"
    if impl == "triton":
        from .triton_kernels import check, triton_aggregate  # imports triton only now

        check(y, w)
        if csr.nnz:
            return triton_aggregate(y, w, csr)
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
