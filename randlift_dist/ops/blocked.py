"""The degree-grouped blocked kernel: any dims, one batched GEMM per (degree, chunk) of rows.

Forward: for the c target rows of a chunk that all have k in-edges, gather their sources into
`[c, k*d_u, B]`, lay their weights side by side as `[c, d_v, k*d_u]` and multiply: each row's sum
over edges is the inner dimension of one GEMM (no scatter-add, no `[m, d_v, B]` messages).
Backward, when both gradients are wanted (training): `_blocked_backward` walks the sources grouped
by out-degree and gathers the output-gradient rows of their edges ONCE per chunk `[c, k*d_v, B]`;
that chunk gives the input gradient (times the sources' weight blocks) and the weight gradient
(times the sources' own rows), written to edge order with one `index_copy_` per chunk: a third
fewer gathered bytes per training step than separate input- and weight-gradient kernels (kept for
single gradients and small batches). Every path is deterministic: no atomics, no `index_add_`;
every output element is written by exactly one chunk. Saves only y and w.
"""

from __future__ import annotations

import torch

from . import workspace as ws
from .csr import CSR, DegreeGroups

# Both blocked gradients from one gather of the output gradients (`_blocked_backward`); False
# runs the two separate kernels (kept for the small-batch path, single gradients and benchmarks).
_FUSED_BACKWARD = True


def _row_chunks(groups: DegreeGroups, w_shape, B: int, device: torch.device):
    """Yield `(k, rows, pos, e0, q)` chunks of rows with k edges whose gathered activations and
    weight blocks each hold at most ~ws.CHUNK_ELEMS elements; `pos` is the chunk's offset in the
    degree-sorted order, `e0` its first edge when its edges are one range (else None), and its
    edges are `groups.edges[q:q + k * len(rows)]`."""
    _, d_v, d_u = w_shape
    per_edge = max(d_u * B, d_v * B, d_u * d_v)
    budget = ws.CHUNK_ELEMS if device.type == "cpu" else ws.CHUNK_ELEMS_ACCEL
    for g in groups.groups:
        c = max(1, budget // (g.k * per_edge))
        for s in range(0, g.rows.numel(), c):
            yield (g.k, g.rows[s:s + c], g.pos + s, (None if g.r0 is None else g.e0 + s * g.k),
                   g.q + s * g.k)


class _Output:
    """Where the per-chunk results of a degree-grouped kernel go, and how they reach row order.

    - all rows in degree order already (e.g. one fixed degree): straight into the result;
    - output up to `ws.WS_CACHE_MAX` elements: into a reused buffer in degree-sorted order, then
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
        self.mode = "direct" if groups.identity else ("sorted" if n <= ws.WS_CACHE_MAX else "scatter")
        if self.mode == "sorted":
            self.buf = ws.ws_view(shape, like, 4)
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
            return ws.ws_view((c, *self.buf.shape[1:]), self.like, 2)
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
        out = ws.ws_view((c, d_v, k, d_u), w, 1)
        out.copy_(src.transpose(1, 2))
        return out.view(c, d_v, k * d_u)
    if d_v == 1 or k == 1:
        return torch.index_select(w, 0, e, out=ws.ws_view((c * k, d_v, d_u), w, 1)).view(c, d_v, k * d_u)
    if d_u >= 8:  # whole blocks, then one strided copy: ~1.4x faster than gathering d_u-rows
        blocks = torch.index_select(w, 0, e, out=ws.ws_view((c * k, d_v, d_u), w, 3))
        out = ws.ws_view((c, d_v, k, d_u), w, 1)
        out.copy_(blocks.view(c, k, d_v, d_u).transpose(1, 2))
        return out.view(c, d_v, k * d_u)
    out = ws.ws_view((c * d_v * k, d_u), w, 1)
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
    budget = ws.CHUNK_ELEMS if device.type == "cpu" else ws.CHUNK_ELEMS_ACCEL
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
    return ws.csr_tensor(crow, col, like.new_ones(c), (r1 - r0, c))


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
        yg = torch.index_select(y, 0, csr.col[e0:e1], out=ws.ws_view((c, d_u, B), y, 0))
        msg = ws.bmm(w[e0:e1], yg, out=ws.ws_view((c, d_v, B), y, 3))
        S = _segment_matrix(csr.indptr, r0, r1, e0, e1, y)
        ws.spmm(S, msg.view(c, d_v * B), out=z[r0:r1].view(r1 - r0, d_v * B))
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
        gg = torch.index_select(gz, 0, csr.row[e0:e1], out=ws.ws_view((c, d_v, B), gz, 2))
        yg = torch.index_select(y, 0, csr.col[e0:e1], out=ws.ws_view((c, d_u, B), y, 0))
        ws.bmm(gg, yg.transpose(1, 2), out=gw[e0:e1])
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
        yg = torch.index_select(y, 0, src, out=ws.ws_view((c * k, d_u, B), y, 0))
        z.commit(rows, ws.bmm(_gather_w_vk(w, e, e0, c, k), yg.view(c, k * d_u, B), out=z.target(pos, c)))
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
        gg = torch.index_select(gz, 0, tgt, out=ws.ws_view((c * k, d_v, B), gz, 0)).view(c, k * d_v, B)
        wt = torch.index_select(w, 0, e, out=ws.ws_view((c * k, d_v, d_u), w, 1)).view(c, k * d_v, d_u)
        gy.commit(srcs, ws.bmm(wt.transpose(1, 2), gg, out=gy.target(pos, c)))
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
        g = torch.index_select(gz, 0, rows, out=ws.ws_view((c, d_v, B), gz, 2))
        yg = torch.index_select(y, 0, src, out=ws.ws_view((c * k, d_u, B), y, 0)).view(c, k * d_u, B)
        prod = ws.bmm(yg, g.transpose(1, 2), out=ws.ws_view((c, k * d_u, d_v), gz, 1))
        blocks = prod.view(c * k, d_u, d_v).transpose(1, 2)  # [c*k, d_v, d_u]
        if e is None:
            gw[e0:e0 + c * k].copy_(blocks)
        else:
            if min(d_u, d_v) > 1:
                blocks = ws.ws_view((c * k, d_v, d_u), gz, 3).copy_(blocks)
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
            ys = torch.index_select(y, 0, srcs, out=ws.ws_view((c, d_u, B), y, 3))
        gg = torch.index_select(gz, 0, tgt, out=ws.ws_view((c * k, d_v, B), gz, 0)).view(c, k * d_v, B)
        wt = torch.index_select(w, 0, e, out=ws.ws_view((c * k, d_v, d_u), w, 1)).view(c, k * d_v, d_u)
        gy.commit(srcs, ws.bmm(wt.transpose(1, 2), gg, out=gy.target(pos, c)))
        blocks = ws.bmm(gg, ys.transpose(1, 2), out=ws.ws_view((c, k * d_v, d_u), gz, 5))
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
        return (*blocked_grads(gz, y, w, ctx.csr, *ctx.needs_input_grad[:2]), None)


def blocked_grads(gz: torch.Tensor, y: torch.Tensor, w: torch.Tensor, csr: CSR, need_y: bool = True,
                  need_w: bool = True):
    """`(gy, gw)` of the blocked kernel (None for a gradient not needed): the fused backward when
    both are wanted (and the batch is not small), else the separate kernels."""
    gz = gz.contiguous()
    if need_y and need_w and not _small_batch(w.shape, gz.shape[2]) and _FUSED_BACKWARD:
        return _blocked_backward(gz, y, w, csr)
    gy = _blocked_grad_input(gz, w, csr) if need_y else None
    gw = _blocked_grad_weight(gz, y, w.shape, csr) if need_w else None
    return gy, gw
