"""The exchange of one base edge on one rank, as plain numbers: which of the rank's in-edges have a
remote source (`split_edges`), the mode and the per-peer row counts (`plan_edge_exchange`, from
the `P x P` need matrix), and the volume (`rows_sent`). No process group and no torch here:
`plan.build_plan` gets the need matrix from a collective, `planstats` fills it rank by rank in one
process, the memory model (`estimate/`) predicts it; all three then call these functions, so the
runtime's byte counters, the statistics CLI and the estimate agree on the mode and the volume.

The mode is chosen identically on every rank from the need matrix (`need[q, r]`: rows rank q
needs from rank r): `alltoall` (every needed row sent once, exact splits) unless the halo rows,
summed over ranks, reach `allgather_threshold` of the all-gather volume (`allgather`: every rank's
rows padded to the largest shard, sent to every other rank).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .partition import Ownership

MODES = ("auto", "alltoall", "allgather")
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
