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
`allgather_threshold` of the all-gather volume. `plan_edge_exchange` makes that choice from the
matrix whether the matrix came from a collective (`build_plan`) or was filled rank by rank in one
process (`planstats.py`), and `rows_sent` is the one formula of the volume: the runtime's byte
counters are checked against it, the statistics CLI and the estimator use it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from .lift import Lift
from .partition import Ownership, PartitionError, make_partition

MODES = ("auto", "alltoall", "allgather")
# torch >= 2.13 renamed the flat-tensor all-gather; older releases have only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
ALLGATHER_THRESHOLD = 0.8  # auto: all-gather once the halo rows reach 80% of the all-gather volume


def rows_sent(mode: str, send_rows: int, max_own: int, world_size: int) -> int:
    """Rows of `d_u` values one rank sends per sample and per forward (the backward: the same).

    `alltoall` sends exactly the rows its peers need (`send_rows`); `allgather` sends its shard,
    padded to `max_own` rows, to each of the `world_size - 1` other ranks."""
    if mode == "alltoall":
        return int(send_rows)
    return int(max_own) * (world_size - 1)


def choose_mode(halo_rows: int, allgather_rows: int, requested: str, threshold: float) -> str:
    """`auto`: all-gather when the halo rows (summed over ranks) reach `threshold` of its volume."""
    if requested != "auto":
        return requested
    return "allgather" if halo_rows >= threshold * allgather_rows else "alltoall"


@dataclasses.dataclass
class Exchange:
    """One rank's exchange for one base edge (rows of `d_u` values, per sample).

    `send_idx` (int64 `[S]`, alltoall only) are rows of this rank's source shard, grouped by peer
    (`send_splits[q]` rows for peer q); the rank receives `recv_splits[q]` rows from peer q, in
    that order: the halo, whose global indices are `halo_global` (alltoall only). In all-gather
    mode the received buffer is every rank's shard padded to `max_own` rows: `[P * max_own]`."""

    mode: str
    send_idx: np.ndarray
    send_splits: list[int]
    recv_splits: list[int]
    max_own: int
    world_size: int
    halo_global: np.ndarray | None

    @property
    def n_halo(self) -> int:
        """Distinct remote rows this rank needs (its share of the lower bound)."""
        return int(sum(self.recv_splits))

    def rows_sent(self, mode: str | None = None) -> int:
        """Rows sent per sample and forward in `mode` (default: the chosen one)."""
        return rows_sent(mode or self.mode, sum(self.send_splits), self.max_own, self.world_size)


@dataclasses.dataclass
class EdgePlan:
    """This rank's lifted edges over one base edge, in parameter order (see the module doc).

    `row_*` index this rank's target rows; `col_local` indexes its source rows (the whole fibre
    when the source is an input or `P = 1`), `col_remote` the exchange's received buffer."""

    key: tuple[str, str]
    n_rows: int
    n_cols_local: int
    row_local: np.ndarray
    col_local: np.ndarray
    local_first: np.ndarray | None = None  # bool over the sampled order; None: already in order
    row_remote: np.ndarray | None = None
    col_remote: np.ndarray | None = None
    n_cols_remote: int = 0
    exchange: Exchange | None = None

    @property
    def n_local(self) -> int:
        return int(self.row_local.size)

    @property
    def n_edges(self) -> int:
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

    def global_edges(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """Global `(src, dst)` fibre indices of this rank's edges over `key`, in parameter order."""
        ep = self.edges[key]
        u, v = key
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


# ---------------------------------------------------------------- pure pieces (shared with planstats)
@dataclasses.dataclass
class EdgeSplit:
    """A rank's in-edges over one base edge, split by where their source lives.

    `local` marks local-source edges in the sampled order; `halo_global` are the distinct remote
    sources sorted by (owner, index), `halo_owner` their owners, `col_remote[k]` the halo row of
    the k-th remote edge (sampled order)."""

    local: np.ndarray
    halo_global: np.ndarray
    halo_owner: np.ndarray
    col_remote: np.ndarray

    @property
    def n_local(self) -> int:
        return int(self.local.sum())


def split_edges(owners_u: Ownership, rank: int, src: np.ndarray) -> EdgeSplit:
    if owners_u.contiguous:  # owners are monotone in the index: (owner, index) order is index order
        lo, hi = int(owners_u.bounds[rank]), int(owners_u.bounds[rank + 1])
        local = (src >= lo) & (src < hi)
        uniq, col_remote = np.unique(src[~local], return_inverse=True)
        return EdgeSplit(local, uniq, owners_u.owner_of(uniq), col_remote.reshape(-1))
    owner = owners_u.owner_of(src)
    local = owner == rank
    n_u = owners_u.n
    key = owner[~local] * n_u + src[~local]
    del owner
    uniq, col_remote = np.unique(key, return_inverse=True)  # halo sorted by (owner, global index)
    return EdgeSplit(local, uniq % n_u, uniq // n_u, col_remote.reshape(-1))


def plan_edge_exchange(need: np.ndarray, owners_u: Ownership, rank: int, requested: str,
                       threshold: float) -> tuple[str, list[int], list[int], int]:
    """`(mode, send_splits, recv_splits, max_own)` of one rank, from the `P x P` need matrix."""
    P = need.shape[0]
    max_own = int(owners_u.counts().max())
    mode = choose_mode(int(need.sum()), P * (P - 1) * max_own, requested, threshold)
    return mode, need[:, rank].astype(np.int64).tolist(), need[rank].astype(np.int64).tolist(), max_own


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
               allgather_threshold: float = ALLGATHER_THRESHOLD) -> ShardPlan:
    """This rank's `ShardPlan`; collective over `layout`'s lift-parallel group (None: one process).

    Samples only the rank's own in-edges (block-wise, see `lift.py`), splits them, and agrees on
    the exchanges with two collectives per exchanging base edge: an all-gather of the need matrix
    and, in all-to-all mode, an all-to-all telling each owner which of its rows are needed."""
    if exchange not in MODES:
        raise PartitionError(f"exchange mode {exchange!r}: choose one of {MODES}")
    P = 1 if layout is None else layout.lift_parallel
    rank = 0 if layout is None else layout.lift_rank
    owners = _lift_partition(lift, layout, strategy) if layout is not None else make_partition(lift, 1, strategy)
    plan = ShardPlan(lift, rank, P, owners, {}, strategy, exchange, allgather_threshold)
    for e in lift.base.edges:
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


def _exchanging_edge(plan: ShardPlan, layout, e, src: np.ndarray, row: np.ndarray, n_rows: int) -> EdgePlan:
    P, rank, group = plan.world_size, plan.rank, layout.lift_group
    owners_u = plan.owners[e.src]
    sp = split_edges(owners_u, rank, src)
    mine = torch.from_numpy(np.bincount(sp.halo_owner, minlength=P).astype(np.int64))
    need = torch.zeros(P * P, dtype=torch.int64)
    _all_gather_single(need, mine, group=group)
    mode, send_splits, recv_splits, max_own = plan_edge_exchange(
        need.view(P, P).numpy(), owners_u, rank, plan.exchange, plan.allgather_threshold)
    row_local, row_remote = _ordered(row, sp.local)
    col_local = owners_u.local_rows(src[sp.local], rank)  # global index -> row in this rank's source rows
    if mode == "alltoall":  # tell each owner which of its rows we need
        asked = torch.zeros(int(sum(send_splits)), dtype=torch.int64)
        dist.all_to_all_single(asked, torch.from_numpy(sp.halo_global.astype(np.int64)), send_splits, recv_splits,
                               group=group)
        asked = asked.numpy()
        if asked.size and (owners_u.owner_of(asked) != rank).any():
            raise RuntimeError(f"exchange plan for {e}: a peer asked for rows this rank does not own")
        send_idx, halo = owners_u.position(asked), sp.halo_global
        col_remote, n_cols = sp.col_remote, sp.halo_global.size
    else:  # all-gather layout [rank, row in that rank's rows]: no index lists
        remote = src[~sp.local]
        col_remote = owners_u.owner_of(remote) * max_own + owners_u.position(remote)
        send_idx, halo, n_cols = np.zeros(0, np.int64), None, P * max_own
    ex = Exchange(mode, send_idx.astype(np.int64, copy=False), send_splits, recv_splits, max_own, P, halo)
    local_first = None if sp.local.all() else sp.local
    return EdgePlan(e.key, n_rows, owners_u.count(rank), row_local, col_local.astype(np.int64, copy=False), local_first,
                    row_remote, np.asarray(col_remote, np.int64), n_cols, ex)
