"""Communication plan and communication-aware exchanges for a sharded lifted network.

For base edge `e = (u, v)` a rank needs the activations of the distinct remote sources of the
lifted edges it owns (its halo). The plan is built once, collectively (`build_edge_layer`):
every rank sends each peer the list of rows it needs, so each needed row is sent exactly once.

Two exchange modes per base edge, chosen identically on every rank from the plan's byte counts:
- `alltoall`: `all_to_all_single` with exact split sizes; the backward sends gradients back with
  the splits swapped and adds them into the owners' rows. Bytes = the halo lower bound.
- `allgather`: every rank's rows are gathered (padded to the largest shard); the backward is a
  reduce-scatter. Cheaper in latency when the halo is nearly the whole fibre.

Both run asynchronously: `start` launches the collective, the local edges are aggregated, and
`finish` waits. Each exchanging base edge has its own process group, so collectives of different
edges can never be matched with each other whatever order autograd runs the backward in.
Bytes are counted on every call in `CommStats` (forward and backward separately).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .ops import CSR

MODES = ("auto", "alltoall", "allgather")
ALLGATHER_THRESHOLD = 0.8  # auto: all-gather once the halo reaches 80% of the all-gather volume
# torch >= 2.13 renamed the flat-tensor collectives; older releases have only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclasses.dataclass
class CommStats:
    """Bytes this rank has sent (payload of collectives, padding included) and time waited."""

    bytes_forward: int = 0
    bytes_backward: int = 0
    wait_s: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.bytes_forward + self.bytes_backward

    def reset(self) -> None:
        self.bytes_forward = self.bytes_backward = 0
        self.wait_s = 0.0


# ---------------------------------------------------------------- readout all-reduce
class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over the group; backward: identity (every rank holds the same loss)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity (the input is replicated on every rank); backward: sum over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Use a replicated input in a sharded computation: its gradient is summed over the shards."""
    if group is None or dist.get_world_size(group) == 1 or not x.requires_grad:
        return x
    return _CopyToGroup.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


# ---------------------------------------------------------------- plan
@dataclasses.dataclass
class EdgePlan:
    """What one rank sends and receives for one base edge, per forward (rows of `d_u` values)."""

    edge: str
    mode: str
    send_idx: torch.Tensor  # rows of own(u) to send, grouped by peer   [S]
    send_splits: list[int]
    recv_splits: list[int]  # halo rows from each peer                    [R = sum]
    halo_global: np.ndarray | None  # global index of each halo row, recv order (alltoall only)
    n_own: int  # rows of own(u)
    max_own: int  # largest own(u) over the group (allgather padding)
    row_bytes: int  # bytes of one row for one sample (d_u * element size)
    world_size: int
    group: Any = None
    stats: CommStats | None = None
    n_halo: int = 0  # distinct remote rows this rank needs (the lower bound's share)

    def rows_sent(self, mode: str | None = None) -> int:
        """Rows this rank sends per forward in `mode` (default: the chosen one)."""
        if (mode or self.mode) == "alltoall":
            return int(sum(self.send_splits))
        return self.max_own * (self.world_size - 1)

    def bytes_per_sample(self, mode: str | None = None) -> int:
        return self.rows_sent(mode) * self.row_bytes


def choose_mode(total_alltoall_rows: int, total_allgather_rows: int, requested: str, threshold: float) -> str:
    """`auto`: all-gather when the halo rows reach `threshold` of the all-gather volume."""
    if requested != "auto":
        return requested
    return "allgather" if total_alltoall_rows >= threshold * total_allgather_rows else "alltoall"


def _edge_group(shard) -> Any:
    """A process group of this lift-parallel group's ranks, private to one base edge.

    `new_group` is collective over the whole world: every rank creates the groups of every
    lift-parallel group (`shard.group_ranks`), in the same order, and keeps its own.
    """
    backend = dist.get_backend(shard.group)
    me = dist.get_rank()
    mine = None
    for ranks in shard.group_ranks or [dist.get_process_group_ranks(shard.group)]:
        g = dist.new_group(ranks=list(ranks), backend=backend)
        if me in ranks:
            mine = g
    return mine


def build_plan(shard, e, halo_global: np.ndarray, halo_owner: np.ndarray, row_bytes: int) -> EdgePlan:
    """Collective over the lift-parallel group: tell each owner which of its rows we need."""
    P, group = shard.world_size, shard.group
    recv_splits = np.bincount(halo_owner, minlength=P).astype(np.int64)
    send_splits = torch.zeros(P, dtype=torch.int64)
    dist.all_to_all_single(send_splits, torch.from_numpy(recv_splits), group=group)
    n_own = len(shard.own(e.src))
    sizes = torch.tensor([n_own, int(recv_splits.sum())], dtype=torch.int64)
    gathered = [torch.zeros_like(sizes) for _ in range(P)]
    dist.all_gather(gathered, sizes, group=group)
    max_own = max(int(g[0]) for g in gathered)
    total_a2a = sum(int(g[1]) for g in gathered)
    mode = choose_mode(total_a2a, P * (P - 1) * max_own, shard.exchange, shard.allgather_threshold)
    send_idx = torch.zeros(0, dtype=torch.int64)
    if mode == "alltoall":  # tell each owner which of its rows we need
        want = torch.from_numpy(halo_global.astype(np.int64))
        asked = torch.zeros(int(send_splits.sum()), dtype=torch.int64)
        dist.all_to_all_single(asked, want, send_splits.tolist(), recv_splits.tolist(), group=group)
        pos = shard.local_pos(e.src)[asked.numpy()]
        if (pos < 0).any():
            raise RuntimeError(f"exchange plan for {e}: a peer asked for rows this rank does not own")
        send_idx = torch.from_numpy(pos.astype(np.int64))
    else:
        halo_global = None  # the all-gather layout needs no index lists
    return EdgePlan(str(e), mode, send_idx, send_splits.tolist(), recv_splits.tolist(),
                    halo_global, n_own, max_own, row_bytes, P, _edge_group(shard), shard.stats,
                    n_halo=int(recv_splits.sum()))


# ---------------------------------------------------------------- exchanges as autograd
class _Pending:
    """Handles of one in-flight exchange (one forward call), shared by its start and finish."""

    def __init__(self, plan: EdgePlan):
        self.plan = plan
        self.work = self.recv = self.grad_work = self.grad_buf = None
        self.shape: tuple[int, ...] = ()


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_own, pending: _Pending):
        plan = pending.plan
        d, B = y_own.shape[1], y_own.shape[2]
        pending.shape = (y_own.shape[0], d, B)
        if plan.mode == "alltoall":
            send = y_own.index_select(0, plan.send_idx.to(y_own.device)).contiguous()
            pending.recv = y_own.new_empty(sum(plan.recv_splits), d, B)
            pending.work = dist.all_to_all_single(pending.recv, send, plan.recv_splits, plan.send_splits,
                                                  group=plan.group, async_op=True)
        else:
            send = y_own.new_zeros(plan.max_own, d, B)
            send[: y_own.shape[0]] = y_own
            pending.recv = y_own.new_empty(plan.world_size * plan.max_own, d, B)
            pending.work = _all_gather_single(pending.recv, send, group=plan.group, async_op=True)
        pending.send = send  # keep the send buffer alive until the collective completes
        if plan.stats is not None:
            plan.stats.bytes_forward += plan.rows_sent() * d * B * y_own.element_size()
        ctx.pending = pending
        return y_own.new_zeros(())  # a token that orders finish after start in the graph

    @staticmethod
    def backward(ctx, _token_grad):
        p = ctx.pending
        t0 = time.perf_counter()
        p.grad_work.wait()
        if p.plan.stats is not None:
            p.plan.stats.wait_s += time.perf_counter() - t0
        plan = p.plan
        if plan.mode == "alltoall":
            gy = p.grad_buf.new_zeros(p.shape)
            gy.index_add_(0, plan.send_idx.to(gy.device), p.grad_buf)
        else:
            gy = p.grad_buf[: p.shape[0]]
        p.grad_buf = p.grad_work = None
        return gy, None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, pending: _Pending):
        t0 = time.perf_counter()
        pending.work.wait()
        if pending.plan.stats is not None:
            pending.plan.stats.wait_s += time.perf_counter() - t0
        pending.work = pending.send = None
        ctx.pending = pending
        recv, pending.recv = pending.recv, None
        return recv

    @staticmethod
    def backward(ctx, g):
        p = ctx.pending
        plan = p.plan
        g = g.contiguous()
        n, d, B = p.shape
        if plan.mode == "alltoall":
            p.grad_buf = g.new_empty(sum(plan.send_splits), d, B)
            p.grad_work = dist.all_to_all_single(p.grad_buf, g, plan.send_splits, plan.recv_splits,
                                                 group=plan.group, async_op=True)
        else:
            p.grad_buf = g.new_empty(plan.max_own, d, B)
            p.grad_work = _reduce_scatter_single(p.grad_buf, g, op=dist.ReduceOp.SUM,
                                                 group=plan.group, async_op=True)
        p.grad_send = g
        if plan.stats is not None:
            plan.stats.bytes_backward += plan.rows_sent() * d * B * g.element_size()
        return g.new_zeros(()), None


class HaloExchange:
    """The exchange of one base edge on one rank: `finish(start(y_own))` returns the halo rows.

    In `alltoall` mode the halo rows are `plan.halo_global` (recv order); in `allgather` mode the
    returned buffer is the whole fibre laid out as `[rank, row in that rank's own list]`.
    """

    def __init__(self, plan: EdgePlan):
        self.plan = plan

    def start(self, y_own: torch.Tensor) -> tuple[torch.Tensor, _Pending]:
        pending = _Pending(self.plan)
        return _Start.apply(y_own, pending), pending

    def finish(self, started: tuple[torch.Tensor, _Pending]) -> torch.Tensor:
        token, pending = started
        return _Finish.apply(token, pending)


# ---------------------------------------------------------------- building a shard's edge layer
@dataclasses.dataclass
class EdgeSplit:
    """This rank's in-edges over one base edge, split by where their source lives.

    `order` puts local-source edges first (each part keeps the (dst, src) order); `halo_global`
    are the distinct remote sources sorted by (owner, index), `halo_owner` their owners, and
    `col_remote[k]` the halo row of remote edge k. Pure: the planner's statistics use it too.
    """

    order: np.ndarray
    n_local: int
    halo_global: np.ndarray
    halo_owner: np.ndarray
    col_remote: np.ndarray


def split_edges(owners_u: np.ndarray, n_u: int, rank: int, src: np.ndarray) -> EdgeSplit:
    owner = owners_u[src]
    local = owner == rank
    order = np.concatenate([np.flatnonzero(local), np.flatnonzero(~local)])
    n_local = int(local.sum())
    key = owner[order[n_local:]].astype(np.int64) * n_u + src[order[n_local:]]
    uniq, col_remote = np.unique(key, return_inverse=True)  # halo sorted by (owner, global index)
    return EdgeSplit(order, n_local, uniq % n_u, (uniq // n_u).astype(np.int64), col_remote.reshape(-1))


def build_edge_layer(shard, e, w: torch.Tensor, src: np.ndarray, dst: np.ndarray, impl: str):
    """Split this rank's in-edges over `e` into local and remote sources; plan the exchange.

    Takes ownership of `w`, `src` and `dst` (permuted in place). The layer keeps only its CSRs
    (local rows and columns); global indices are derived on demand (`_edge_index`).
    """
    from .model import EdgeLayer

    n_v_own = len(shard.own(e.dst))
    if shard.world_size == 1 or shard.is_input(e.src):
        row = dst if shard.world_size == 1 else shard.local_pos(e.dst)[dst]
        csr = CSR(torch.from_numpy(row), torch.from_numpy(src), n_v_own, shard.lift.n(e.src))
        return EdgeLayer(w, src.size, csr, None, None, impl, functools.partial(_edge_index, shard, e, None))
    sp = split_edges(shard.owners[e.src], shard.lift.n(e.src), shard.rank, src)
    src[:] = src[sp.order]
    row = shard.local_pos(e.dst)[dst[sp.order]]
    del dst
    w.copy_(w[torch.from_numpy(sp.order)])
    n_local = sp.n_local
    plan = build_plan(shard, e, sp.halo_global, sp.halo_owner, shard.lift.base.dim(e.src) * w.element_size())
    if plan.mode == "allgather":
        remote = src[n_local:]
        col_remote = shard.owners[e.src][remote].astype(np.int64) * plan.max_own + shard.pos_in_owner(e.src)[remote]
        n_cols = plan.world_size * plan.max_own
    else:
        col_remote, n_cols = sp.col_remote, sp.halo_global.size
    del sp
    shard.plans[e.key] = plan
    col_local = shard.local_pos(e.src)[src[:n_local]]
    del src
    csr_local = CSR(torch.from_numpy(row[:n_local]), torch.from_numpy(col_local), n_v_own, len(shard.own(e.src)))
    csr_remote = CSR(torch.from_numpy(row[n_local:]), torch.from_numpy(np.asarray(col_remote, np.int64)),
                     n_v_own, n_cols)
    return EdgeLayer(w, n_local, csr_local, csr_remote, HaloExchange(plan), impl,
                     functools.partial(_edge_index, shard, e, plan))


def _edge_index(shard, e, plan: EdgePlan | None, layer) -> tuple[np.ndarray, np.ndarray]:
    """Global `(src, dst)` of a layer's rows, from its CSRs and the shard's ownership."""
    rows = [layer.csr_local.row] + ([layer.csr_remote.row] if layer.csr_remote is not None else [])
    dst = shard.own(e.dst)[torch.cat(rows).cpu().numpy().astype(np.int64)]
    col_local = layer.csr_local.col.cpu().numpy().astype(np.int64)
    if plan is None:  # sources are the whole fibre (one process, or an input fibre)
        return col_local, dst
    src_local = shard.own(e.src)[col_local]
    col_remote = layer.csr_remote.col.cpu().numpy().astype(np.int64)
    if plan.mode == "alltoall":
        src_remote = plan.halo_global[col_remote]
    else:  # all-gather layout: [rank, row in that rank's own list]
        rank, pos = np.divmod(col_remote, plan.max_own)
        src_remote = np.empty(col_remote.size, np.int64)
        owners = shard.owners[e.src]
        for p in np.unique(rank).tolist():
            sel = rank == p
            src_remote[sel] = np.flatnonzero(owners == p)[pos[sel]]
    return np.concatenate([src_local, src_remote]), dst
