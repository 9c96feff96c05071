"""Ownership of lifted vertices by the ranks of a lift-parallel group, and a rank's `Shard`.

A partition maps every vertex of every non-input fibre to one rank (`owner[v]`, an int32 array of
size `n_v`: O(vertices), never O(edges)). Input fibres are replicated: every rank holds the input.
A rank owns the targets assigned to it, holds the weights of the lifted edges that END there, and
samples only those edges (block-wise, see `lift.py`).

Strategies:
- `block` (default): per fibre, contiguous ranges balanced by in-edge count (all base in-edges of
  the fibre counted), with boundaries snapped to sampling blocks when the fibre is large enough
  that snapping costs little balance, so each rank samples whole blocks.
- `graph`: METIS (pymetis) on the whole lifted graph, then a greedy cut-aware pass that restores
  the balance of every fibre (pymetis offers a single balance constraint); for lifts small
  enough to partition on one host. Cuts far fewer edges than `block` at small degree.
- `random`: a seeded random balanced assignment; the no-locality baseline.

Partitions depend only on the lift and the strategy (never on the rank), so every rank computes
the same ownership independently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .comm import ALLGATHER_THRESHOLD
from .lift import Lift

STRATEGIES = ("block", "graph", "random")


class PartitionError(ValueError):
    """A partition request does not fit the lift; the message names the value and the fix."""


# ---------------------------------------------------------------- strategies
def _vertex_load(lift: Lift, v: str) -> np.ndarray:
    """Work per target vertex of fibre v: in-edges times the block size of each message."""
    load = np.zeros(lift.n(v), dtype=np.float64)
    for e in lift.base.in_edges(v):
        load += lift.in_degrees(e) * lift.base.dim(e.src) * lift.base.dim(v)
    return load + 1.0  # the vertex map and readout row


def block_partition(lift: Lift, world_size: int) -> dict[str, np.ndarray]:
    owners = {}
    B = lift.block_size
    for v in lift.base.order:
        if lift.base.vertices[v].role == "input":
            continue
        n = lift.n(v)
        load = _vertex_load(lift, v)
        cum = np.concatenate([[0.0], np.cumsum(load)])
        targets = cum[-1] * np.arange(1, world_size) / world_size
        cuts = np.searchsorted(cum, targets, side="left")  # vertex boundaries
        if n >= 8 * B * world_size:
            cuts = np.clip(np.rint(cuts / B).astype(np.int64) * B, 0, n)
        bounds = np.concatenate([[0], cuts, [n]]).astype(np.int64)
        bounds = np.maximum.accumulate(bounds)
        owner = np.zeros(n, dtype=np.int32)
        for r in range(world_size):
            owner[bounds[r]:bounds[r + 1]] = r
        owners[v] = owner
    return owners


def random_partition(lift: Lift, world_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    owners = {}
    for i, v in enumerate(lift.base.order):
        if lift.base.vertices[v].role == "input":
            continue
        n = lift.n(v)
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, lift.seed, 7, i])))
        owners[v] = (rng.permutation(n) % world_size).astype(np.int32)
    return owners


def graph_partition(lift: Lift, world_size: int, max_edges: int = 20_000_000) -> dict[str, np.ndarray]:
    try:
        import pymetis
    except ImportError:
        raise PartitionError("partition strategy 'graph' needs pymetis: pip install pymetis "
                             "(or choose strategy 'block')") from None
    base = lift.base
    hidden = [v for v in base.order if base.vertices[v].role != "input"]
    total = sum(lift.expected_edges(e) for e in base.edges if e.src in hidden)
    if total > max_edges:
        raise PartitionError(f"partition strategy 'graph' on a lift with ~{total:.3g} edges: more than "
                             f"{max_edges:.3g}; use strategy 'block' for lifts this large")
    offset, off = {}, 0
    for v in hidden:
        offset[v], off = off, off + lift.n(v)
    if world_size == 1:
        return {v: np.zeros(lift.n(v), np.int32) for v in hidden}
    rows, cols = [], []
    for e in base.edges:
        if e.src not in offset:
            continue
        src, dst = lift.edges(e)
        rows.append(src + offset[e.src]), cols.append(dst + offset[e.dst])
    a = np.concatenate(rows + cols) if rows else np.zeros(0, np.int64)
    b = np.concatenate(cols + rows) if rows else np.zeros(0, np.int64)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.ones(a.size, dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b = a[keep], b[keep]
    xadj = np.zeros(off + 1, dtype=np.int64)
    np.cumsum(np.bincount(a, minlength=off), out=xadj[1:])
    # pymetis runs METIS with a single balance constraint, so balance the whole graph there and
    # then restore the balance of every fibre with a greedy, cut-aware move pass
    opts = pymetis.Options(seed=lift.seed % (2**31), contig=False)
    adjacency = pymetis.CSRAdjacency(xadj, b) if hasattr(pymetis, "CSRAdjacency") else None
    if adjacency is not None:
        _, parts = pymetis.part_graph(world_size, adjacency, options=opts)
    else:
        _, parts = pymetis.part_graph(world_size, xadj=xadj, adjncy=b, options=opts)
    parts = np.asarray(parts, dtype=np.int32)
    for v in hidden:
        _rebalance_fibre(parts, xadj, b, offset[v], lift.n(v), world_size)
    return {v: parts[offset[v]:offset[v] + lift.n(v)].copy() for v in hidden}


def _rebalance_fibre(parts: np.ndarray, xadj: np.ndarray, adjncy: np.ndarray, lo: int, n: int, P: int) -> None:
    """Move vertices of fibre [lo, lo+n) until every rank holds n // P or n // P + 1 of them.

    Each move goes from the most overloaded rank to the most underloaded one and takes the
    vertices with the best gain (neighbours in the destination minus neighbours left behind).
    """
    target = n // P + (np.arange(P) < n % P)
    while True:
        fibre = parts[lo:lo + n]
        over = np.bincount(fibre, minlength=P) - target
        if (over <= 0).all():
            return
        src_part, dst_part = int(np.argmax(over)), int(np.argmin(over))
        k = int(min(over[src_part], -over[dst_part]))
        cand = np.flatnonzero(fibre == src_part) + lo
        deg = xadj[cand + 1] - xadj[cand]
        owner = np.repeat(np.arange(cand.size), deg)
        nbr = adjncy[np.concatenate([np.arange(xadj[c], xadj[c + 1]) for c in cand])] if cand.size else cand
        nbr_part = parts[nbr]
        gain = np.bincount(owner, weights=(nbr_part == dst_part).astype(float) - (nbr_part == src_part),
                           minlength=cand.size)
        move = cand[np.argsort(-gain, kind="stable")[:k]]
        parts[move] = dst_part


def make_partition(lift: Lift, world_size: int, strategy: str = "block", seed: int = 0) -> dict[str, np.ndarray]:
    """Owner rank of every vertex of every non-input fibre."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PartitionError(f"lift-parallel size {world_size!r}: must be a positive integer")
    if strategy == "block":
        return block_partition(lift, world_size)
    if strategy == "random":
        return random_partition(lift, world_size, seed)
    if strategy == "graph":
        return graph_partition(lift, world_size)
    raise PartitionError(f"partition strategy {strategy!r}: choose one of {STRATEGIES}")


def _index_dtype(n: int):
    """int32 for fibre-sized index arrays when it fits: they are O(n) on every rank."""
    return np.int32 if n < 2**31 else np.int64


# ---------------------------------------------------------------- a rank's shard
@dataclasses.dataclass
class Shard:
    """What one rank of a lift-parallel group holds: its vertices and, via `comm`, its exchanges.

    `owners[v]` is the owner rank of every vertex of fibre v (non-input fibres only).
    `group` is the lift-parallel process group (None at world size 1).
    `exchange` is `auto`, `alltoall` or `allgather` (see `comm.choose_mode`).
    """

    lift: Lift
    owners: dict[str, np.ndarray]
    rank: int = 0
    world_size: int = 1
    group: Any = None
    exchange: str = "auto"
    allgather_threshold: float = ALLGATHER_THRESHOLD
    group_ranks: list[list[int]] | None = None  # the ranks of every lift-parallel group of the world

    def __post_init__(self):
        self._own: dict[str, np.ndarray] = {}
        self._pos: dict[str, np.ndarray] = {}
        self._pos_in_owner: dict[str, np.ndarray] = {}
        self.plans: dict[tuple[str, str], Any] = {}
        from .comm import CommStats

        self.stats = CommStats()

    @classmethod
    def single(cls, lift: Lift) -> "Shard":
        owners = {v: np.zeros(lift.n(v), np.int32) for v in lift.base.order
                  if lift.base.vertices[v].role != "input"}
        return cls(lift, owners)

    @classmethod
    def create(cls, lift: Lift, layout, strategy: str = "block", exchange: str = "auto",
               allgather_threshold: float = ALLGATHER_THRESHOLD) -> "Shard":
        """This rank's shard for a `layout.Layout` (its lift-parallel group and rank)."""
        from .comm import MODES

        if exchange not in MODES:
            raise PartitionError(f"exchange mode {exchange!r}: choose one of {MODES}")
        P = layout.lift_parallel
        if strategy == "graph" and P > 1:  # one METIS run, broadcast: every rank gets the same owners
            import torch.distributed as dist

            box = [make_partition(lift, P, strategy) if layout.lift_rank == 0 else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(layout.lift_group, 0), group=layout.lift_group)
            owners = box[0]
        else:
            owners = make_partition(lift, P, strategy)
        return cls(lift, owners, layout.lift_rank, P, layout.lift_group, exchange, allgather_threshold,
                   layout.lift_group_ranks())

    def is_input(self, v: str) -> bool:
        return self.lift.base.vertices[v].role == "input"

    def own(self, v: str) -> np.ndarray:
        """Sorted global indices of fibre v held here (inputs: the whole fibre)."""
        if v not in self._own:
            if self.is_input(v) or self.world_size == 1:
                self._own[v] = np.arange(self.lift.n(v), dtype=np.int64)
            else:
                self._own[v] = np.flatnonzero(self.owners[v] == self.rank).astype(np.int64)
        return self._own[v]

    def own_or_none(self, v: str) -> np.ndarray | None:
        """`own(v)`, or None when it is the whole fibre (so sampling needs no mask)."""
        own = self.own(v)
        return None if own.size == self.lift.n(v) else own

    def local_pos(self, v: str) -> np.ndarray:
        """Global index -> row in `own(v)` (-1 where not held here); O(n_v) int64, cached."""
        if v not in self._pos:
            pos = np.full(self.lift.n(v), -1, dtype=_index_dtype(self.lift.n(v)))
            own = self.own(v)
            pos[own] = np.arange(own.size)
            self._pos[v] = pos
        return self._pos[v]

    def pos_in_owner(self, v: str) -> np.ndarray:
        """Global index -> row in its owner's `own(v)` list (for the all-gather layout)."""
        if v not in self._pos_in_owner:
            owner = self.owners[v]
            order = np.argsort(owner, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=self.world_size))])
            pos = np.empty(owner.size, dtype=_index_dtype(owner.size))
            pos[order] = np.arange(owner.size) - starts[owner[order]]
            self._pos_in_owner[v] = pos
        return self._pos_in_owner[v]

    def edge_layer(self, e, w: torch.Tensor, src: np.ndarray, dst: np.ndarray, impl: str):
        from .comm import build_edge_layer

        return build_edge_layer(self, e, w, src, dst, impl)

    def reduce_readout(self, out: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return out
        from .comm import all_reduce_sum

        return all_reduce_sum(out, self.group)


if __name__ == "__main__":  # python -m randlift_dist.partition: plan statistics without a cluster
    from randlift_dist.planstats import main

    main()
