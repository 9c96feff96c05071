"""The plan stage: what one rank of a lift-parallel group owns, holds and exchanges.

`build_plan(lift, layout, ...)` is collective over the lift-parallel group and runs once, before
the network exists. It returns a `ShardPlan`: plain data (numpy arrays and numbers; no process
group, no statistics object) that `LiftedNetwork(base, lift, plan)` is built from without any
communication. Per non-input fibre, the `Ownership` (`partition.py`); per base edge, an
`EdgePlan`:

- the rank's in-edges over the edge (those ending at its vertices), sorted by target and split by
  where the source lives: local-source edges first, then remote-source edges (each part keeps the
  `(dst, src)` order), as CSR row/column arrays; `local_first` says how the sampled order maps to
  that order (the model draws weights in the sampled order and permutes them the same way);
- for edges whose source fibre is sharded (not an input, `P > 1`), an `Exchange`: the mode
  (`alltoall`: every needed row sent once, exact splits; `allgather`: every rank's rows padded to
  the largest shard), the rows this rank sends to each peer and receives from each, and the halo
  (the distinct remote sources, sorted by (owner, index)).

The mode is chosen identically on every rank from the `P x P` matrix of needed rows
(`need[q, r]`: rows rank q needs from rank r): all-gather once the halo reaches
`allgather_threshold` of the all-gather volume. The pure pieces of that (`split_edges`,
`plan_edge_exchange`, `rows_sent`, `Exchange`) live in `exchange.py` and are re-exported here:
`build_plan` feeds them the matrix from a collective, `planstats.py` fills it rank by rank in one
process, and the runtime's byte counters, the statistics CLI and the estimator all use `rows_sent`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from .exchange import (ALLGATHER_THRESHOLD, MODES, EdgeSplit, Exchange, choose_mode, plan_edge_exchange,  # noqa: F401
                       rows_sent, split_edges)
from .lift import Lift
from .partition import Ownership, PartitionError, make_partition

TOPOLOGIES = ("stored", "regenerate")
# torch >= 2.13 renamed the flat-tensor all-gather; older releases have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass
class BlockTopology:
    """A rank's in-edges over one base edge kept as the lift's sampling blocks, not as index
    arrays (`topology="regenerate"`): O(blocks) numbers instead of O(edges) indices.

    The edges are in the sampled `(dst, src)` order restricted to this rank's targets (which is
    the parameter order in this mode): block `blocks[i]` holds parameter rows
    `edge_ptr[i]:edge_ptr[i + 1]`, ending at local target rows `row_ptr[i]:row_ptr[i + 1]`.
    `ShardPlan.block_edges` regenerates any range of blocks' `(row, col)`."""

    blocks: np.ndarray  # int64 [nb], ascending sampling blocks of the target fibre
    edge_ptr: np.ndarray  # int64 [nb + 1]
    row_ptr: np.ndarray  # int64 [nb + 1]
    n_remote: int  # edges whose source lives on another rank

    @property
    def n_edges(self) -> int:
        return int(self.edge_ptr[-1])


@dataclasses.dataclass
class EdgePlan:
    """This rank's lifted edges over one base edge, in parameter order (see the module doc).

    Stored topology: `row_*` index this rank's target rows; `col_local` indexes its source rows
    (the whole fibre when the source is an input or `P = 1`), `col_remote` the exchange's
    received buffer. Regenerated topology: those arrays are None and `blocks` says where each
    sampling block's edges go (`ShardPlan.block_edges` gives their rows and columns)."""

    key: tuple[str, str]
    n_rows: int
    n_cols_local: int
    row_local: np.ndarray | None
    col_local: np.ndarray | None
    local_first: np.ndarray | None = None  # bool over the sampled order; None: already in order
    row_remote: np.ndarray | None = None
    col_remote: np.ndarray | None = None
    n_cols_remote: int = 0
    exchange: Exchange | None = None
    blocks: BlockTopology | None = None

    @property
    def regenerated(self) -> bool:
        return self.blocks is not None

    @property
    def n_local(self) -> int:
        """Edges whose source is held here (stored topology: the first rows of the parameter)."""
        if self.blocks is not None:
            return self.blocks.n_edges - self.blocks.n_remote
        return int(self.row_local.size)

    @property
    def n_edges(self) -> int:
        if self.blocks is not None:
            return self.blocks.n_edges
        return self.n_local + (0 if self.row_remote is None else int(self.row_remote.size))


@dataclasses.dataclass
class ShardPlan:
    """Everything one rank of a lift-parallel group holds: ownership and per-edge plans."""

    lift: Lift
    rank: int
    world_size: int
    owners: dict[str, Ownership]
    edges: dict[tuple[str, str], EdgePlan]
    strategy: str = "block"
    exchange: str = "auto"
    allgather_threshold: float = ALLGATHER_THRESHOLD
    topology: str = "stored"
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def is_input(self, v: str) -> bool:
        return self.lift.base.vertices[v].role == "input"

    def own(self, v: str) -> np.ndarray:
        """Sorted global indices of fibre v held here (inputs and world size 1: the whole fibre)."""
        if self.is_input(v) or self.world_size == 1:
            return np.arange(self.lift.n(v), dtype=np.int64)
        return self.owners[v].own(self.rank)

    def n_own(self, v: str) -> int:
        if self.is_input(v) or self.world_size == 1:
            return self.lift.n(v)
        return self.owners[v].count(self.rank)

    def _sharded(self, v: str) -> bool:
        return not (self.is_input(v) or self.world_size == 1)

    def target_blocks(self, v: str) -> np.ndarray:
        """The sampling blocks of fibre v holding this rank's vertices, ascending (int64)."""
        B = self.lift.block_size
        if not self._sharded(v) or self.n_own(v) == self.lift.n(v):
            return np.arange(self.lift.num_blocks(v), dtype=np.int64)
        if self.owners[v].contiguous:
            lo, hi = (int(x) for x in self.owners[v].bounds[self.rank:self.rank + 2])
            return np.arange(lo // B, -(-hi // B) if hi > lo else lo // B, dtype=np.int64)
        return np.unique(self.own(v) // B)

    def block_keep(self, v: str, b: int, rows: int) -> np.ndarray | None:
        """Which of the `rows` vertices of sampling block b of fibre v are this rank's (None: all)."""
        if not self._sharded(v):
            return None
        lo = b * self.lift.block_size
        own = self.owners[v]
        if own.contiguous:
            a, z = int(own.bounds[self.rank]) - lo, int(own.bounds[self.rank + 1]) - lo
            if a <= 0 and z >= rows:
                return None
            keep = np.zeros(rows, dtype=bool)
            keep[max(a, 0):max(min(z, rows), 0)] = True
            return keep
        if ("own", v) not in self._cache:
            self._cache[("own", v)] = self.own(v)
        mine = self._cache[("own", v)]
        i0, i1 = np.searchsorted(mine, (lo, lo + rows))
        keep = np.zeros(rows, dtype=bool)
        keep[mine[i0:i1] - lo] = True
        return keep

    def block_global_edges(self, key: tuple[str, str], i0: int, i1: int) -> tuple[np.ndarray, np.ndarray]:
        """Global `(src, dst)` of blocks `i0:i1` of a regenerated edge (parameter rows
        `edge_ptr[i0]:edge_ptr[i1]`), drawn again from the lift's counter-based streams."""
        bt = self.edges[key].blocks
        e, B = self.lift.base.edge(key), self.lift.block_size
        srcs, dsts = [], []
        for b in bt.blocks[i0:i1].tolist():
            src, dst = self.lift.sample_block(e, b)
            keep = self.block_keep(key[1], b, min(B, self.lift.n(key[1]) - b * B))
            if keep is not None:
                m = keep[dst - b * B]
                src, dst = src[m], dst[m]
            srcs.append(src)
            dsts.append(dst)
        if not srcs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(srcs), np.concatenate(dsts)

    def block_edges(self, key: tuple[str, str], i0: int, i1: int) -> tuple[np.ndarray, np.ndarray]:
        """`(row, col)` int64 of blocks `i0:i1` of a regenerated edge, in parameter order: `row`
        indexes this rank's target rows, `col` the source buffer `[own source rows | received
        rows]` (`n_cols_local + n_cols_remote` rows; no received part without an exchange)."""
        ep = self.edges[key]
        u, v = key[0], key[1]
        src, dst = self.block_global_edges(key, i0, i1)
        row = self.owners[v].local_rows(dst, self.rank) if self._sharded(v) else dst
        if ep.exchange is None:
            return row, src
        ou, ex = self.owners[u], ep.exchange
        owner = ou.owner_of(src)
        local = owner == self.rank
        col = np.empty_like(src)
        col[local] = ou.position(src[local])
        rs, ro = src[~local], owner[~local]
        if ex.mode == "alltoall":  # the halo is sorted by (owner, index)
            if ("halo", key) not in self._cache:
                self._cache[("halo", key)] = ou.owner_of(ex.halo_global) * ou.n + ex.halo_global
            col[~local] = ep.n_cols_local + np.searchsorted(self._cache[("halo", key)], ro * ou.n + rs)
        else:  # all-gather layout [rank, row in that rank's rows]
            col[~local] = ep.n_cols_local + ro * ex.max_own + ou.position(rs)
        return row, col

    def in_degrees(self, key: tuple[str, str]) -> np.ndarray:
        """In-degree over `key` of each of this rank's target rows, int64 `[n_rows]`."""
        ep = self.edges[key]
        if ep.blocks is None:
            deg = np.bincount(ep.row_local, minlength=ep.n_rows)
            if ep.row_remote is not None:
                deg = deg + np.bincount(ep.row_remote, minlength=ep.n_rows)
            return deg
        parts = []
        for b in ep.blocks.blocks.tolist():
            d = self.lift.block_degrees(key, b)
            keep = self.block_keep(key[1], b, d.size)
            parts.append(d if keep is None else d[keep])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def global_edges(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """Global `(src, dst)` fibre indices of this rank's edges over `key`, in parameter order."""
        ep = self.edges[key]
        if ep.blocks is not None:
            return self.block_global_edges(key, 0, ep.blocks.blocks.size)
        u, v = key[0], key[1]
        own_v = self.own(v)
        dst = [own_v[ep.row_local]]
        src = [self.own(u)[ep.col_local] if ep.exchange is not None else ep.col_local.astype(np.int64)]
        ex = ep.exchange
        if ex is not None:
            dst.append(own_v[ep.row_remote])
            if ex.mode == "alltoall":
                src.append(ex.halo_global[ep.col_remote])
            else:  # all-gather layout: [rank, row in that rank's rows]
                rank, pos = np.divmod(ep.col_remote.astype(np.int64), ex.max_own)
                remote = np.empty(rank.size, np.int64)
                owners = self.owners[u]
                for p in np.unique(rank).tolist():
                    sel = rank == p
                    remote[sel] = owners.own(p)[pos[sel]]
                src.append(remote)
        return np.concatenate(src), np.concatenate(dst)


def _ordered(x: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x[local], x[~local]


# ---------------------------------------------------------------- the collective build
def _lift_partition(lift: Lift, layout, strategy: str) -> dict[str, Ownership]:
    P = layout.lift_parallel
    if strategy == "graph" and P > 1:  # one METIS run, broadcast: every rank gets the same owners
        box = [make_partition(lift, P, strategy) if layout.lift_rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(layout.lift_group, 0), group=layout.lift_group)
        return box[0]
    return make_partition(lift, P, strategy)


def build_plan(lift: Lift, layout=None, strategy: str = "block", exchange: str = "auto",
               allgather_threshold: float = ALLGATHER_THRESHOLD, topology: str = "stored") -> ShardPlan:
    """This rank's `ShardPlan`; collective over `layout`'s lift-parallel group (None: one process).

    Samples only the rank's own in-edges (block-wise, see `lift.py`), splits them, and agrees on
    the exchanges with two collectives per exchanging base edge: an all-gather of the need matrix
    and, in all-to-all mode, an all-to-all telling each owner which of its rows are needed.

    `topology="regenerate"` keeps no index arrays: per base edge only the sampling blocks holding
    the rank's targets and where their edges go (`BlockTopology`); the edges are drawn block by
    block here (for the halo) and again whenever the network needs them."""
    if exchange not in MODES:
        raise PartitionError(f"exchange mode {exchange!r}: choose one of {MODES}")
    if topology not in TOPOLOGIES:
        raise PartitionError(f"topology {topology!r}: choose one of {TOPOLOGIES}")
    P = 1 if layout is None else layout.lift_parallel
    rank = 0 if layout is None else layout.lift_rank
    owners = _lift_partition(lift, layout, strategy) if layout is not None else make_partition(lift, 1, strategy)
    plan = ShardPlan(lift, rank, P, owners, {}, strategy, exchange, allgather_threshold, topology)
    for e in lift.base.edges:
        if topology == "regenerate":
            plan.edges[e.key] = _regenerated_edge(plan, layout, e)
            continue
        targets = None if (P == 1 or plan.n_own(e.dst) == lift.n(e.dst)) else plan.own(e.dst)
        src, row = lift.edges(e, targets)  # row: global target index, made local below
        if targets is not None:
            row = owners[e.dst].local_rows(row, rank)
        n_rows = plan.n_own(e.dst)
        if P == 1 or plan.is_input(e.src):
            plan.edges[e.key] = EdgePlan(e.key, n_rows, lift.n(e.src), row, src)
            continue
        plan.edges[e.key] = _exchanging_edge(plan, layout, e, src, row, n_rows)
        del src, row
    return plan


def _agree_exchange(plan: ShardPlan, layout, e, halo_global: np.ndarray, halo_owner: np.ndarray) -> Exchange:
    """The collective part of an exchange: from this rank's halo (sorted by (owner, index)), the
    need matrix, the mode and, in all-to-all mode, the rows each owner sends."""
    P, rank, group = plan.world_size, plan.rank, layout.lift_group
    owners_u = plan.owners[e.src]
    mine = torch.from_numpy(np.bincount(halo_owner, minlength=P).astype(np.int64))
    need = torch.zeros(P * P, dtype=torch.int64)
    _all_gather_single(need, mine, group=group)
    mode, send_splits, recv_splits, max_own = plan_edge_exchange(
        need.view(P, P).numpy(), owners_u, rank, plan.exchange, plan.allgather_threshold)
    if mode == "alltoall":  # tell each owner which of its rows we need
        asked = torch.zeros(int(sum(send_splits)), dtype=torch.int64)
        dist.all_to_all_single(asked, torch.from_numpy(halo_global.astype(np.int64)), send_splits, recv_splits,
                               group=group)
        asked = asked.numpy()
        if asked.size and (owners_u.owner_of(asked) != rank).any():
            raise RuntimeError(f"exchange plan for {e}: a peer asked for rows this rank does not own")
        send_idx, halo = owners_u.position(asked), halo_global
    else:  # all-gather layout [rank, row in that rank's rows]: no index lists
        send_idx, halo = np.zeros(0, np.int64), None
    return Exchange(mode, send_idx.astype(np.int64, copy=False), send_splits, recv_splits, max_own, P, halo)


def _n_received(ex: Exchange) -> int:
    return int(ex.halo_global.size) if ex.mode == "alltoall" else ex.world_size * ex.max_own


def _exchanging_edge(plan: ShardPlan, layout, e, src: np.ndarray, row: np.ndarray, n_rows: int) -> EdgePlan:
    rank, owners_u = plan.rank, plan.owners[e.src]
    sp = split_edges(owners_u, rank, src)
    ex = _agree_exchange(plan, layout, e, sp.halo_global, sp.halo_owner)
    row_local, row_remote = _ordered(row, sp.local)
    col_local = owners_u.local_rows(src[sp.local], rank)  # global index -> row in this rank's source rows
    if ex.mode == "alltoall":
        col_remote = sp.col_remote
    else:  # all-gather layout [rank, row in that rank's rows]
        remote = src[~sp.local]
        col_remote = owners_u.owner_of(remote) * ex.max_own + owners_u.position(remote)
    local_first = None if sp.local.all() else sp.local
    return EdgePlan(e.key, n_rows, owners_u.count(rank), row_local, col_local.astype(np.int64, copy=False), local_first,
                    row_remote, np.asarray(col_remote, np.int64), _n_received(ex), ex)


_HALO_SCAN_BLOCKS = 64  # sampling blocks drawn at once while collecting a regenerated edge's halo


def _regenerated_edge(plan: ShardPlan, layout, e) -> EdgePlan:
    """A `BlockTopology` edge: block offsets from the in-degrees alone; with an exchange, the
    halo collected block by block (O(halo + a few blocks) memory, never O(edges))."""
    lift, v = plan.lift, e.dst
    n_rows, blocks = plan.n_own(v), plan.target_blocks(v)
    n_edges, n_rows_b = np.zeros(blocks.size, np.int64), np.zeros(blocks.size, np.int64)
    for i, b in enumerate(blocks.tolist()):
        deg = lift.block_degrees(e, b)
        keep = plan.block_keep(v, b, deg.size)
        if keep is not None:
            deg = deg[keep]
        n_edges[i], n_rows_b[i] = deg.sum(), deg.size
    bt = BlockTopology(blocks, np.concatenate([[0], np.cumsum(n_edges)]), np.concatenate([[0], np.cumsum(n_rows_b)]), 0)
    if bt.row_ptr[-1] != n_rows:
        raise RuntimeError(f"edge {e}: the sampling blocks hold {bt.row_ptr[-1]} of this rank's {n_rows} targets")
    ep = EdgePlan(e.key, n_rows, lift.n(e.src), None, None, blocks=bt)
    if not plan._sharded(e.src):
        return ep
    ou, rank = plan.owners[e.src], plan.rank
    plan.edges[e.key] = ep  # block_global_edges reads it
    keys: list[np.ndarray] = []
    n_keys = 0
    for i0 in range(0, blocks.size, _HALO_SCAN_BLOCKS):
        src, _ = plan.block_global_edges(e.key, i0, min(i0 + _HALO_SCAN_BLOCKS, blocks.size))
        owner = ou.owner_of(src)
        remote = owner != rank
        bt.n_remote += int(remote.sum())
        keys.append(np.unique(owner[remote] * ou.n + src[remote]))
        n_keys += keys[-1].size
        if n_keys > 4 * max(ou.n, 1) or len(keys) > 64:  # merge: bounded by the source fibre
            keys = [np.unique(np.concatenate(keys))]
            n_keys = keys[0].size
    uniq = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    ex = _agree_exchange(plan, layout, e, uniq % ou.n, uniq // ou.n)
    return EdgePlan(e.key, n_rows, ou.count(rank), None, None, n_cols_remote=_n_received(ex), exchange=ex, blocks=bt)
