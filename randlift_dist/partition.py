"""Ownership of lifted vertices by the ranks of a lift-parallel group: the partition strategies.

A partition gives every non-input fibre an `Ownership`: the owner rank of each of its vertices.
Input fibres are replicated (every rank holds the input) and have none. Strategies:

- `block` (default): per fibre, contiguous ranges balanced by in-edge work (all base in-edges of
  the fibre counted), with boundaries snapped to sampling blocks when the fibre is large enough
  that snapping costs little balance, so each rank samples whole blocks. Stored as `P + 1`
  boundaries: O(P) memory per fibre, whatever its size. Balancing reads the in-degrees block by
  block (no sources are drawn) and keeps one number per sampling block, plus the vertex-level
  loads of the few blocks a boundary falls into.
- `graph`: METIS (pymetis) on the whole lifted graph, then a greedy cut-aware pass that restores
  the balance of every fibre (pymetis offers a single balance constraint); for lifts small
  enough to partition on one host. Cuts far fewer edges than `block` at small degree.
- `random`: a seeded random balanced assignment; the no-locality baseline.
`graph` and `random` store an owner per vertex (`O(n)`; they are for lifts that fit one host).

Partitions depend only on the lift and the strategy (never on the rank), so every rank computes
the same ownership independently. Nothing here communicates. Not a command:
`python -m randlift_dist.partition` names the one that shows a partition (`planstats`).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from .lift import Lift

STRATEGIES = ("block", "graph", "random")


class PartitionError(ValueError):
    """A partition request does not fit the lift; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Ownership:
    """The owner rank of every vertex of one fibre of `n` vertices, over `world_size` ranks.

    Either contiguous ranges (`bounds`, `[P + 1]` ascending: rank r owns `[bounds[r],
    bounds[r + 1])`) or one owner per vertex (`owner`, int32 `[n]`). A rank's rows are always its
    vertices in increasing global index: `position(i)` is the row of vertex i in its owner's rows.
    """

    n: int
    world_size: int
    bounds: np.ndarray | None = None
    owner: np.ndarray | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def ranges(cls, bounds) -> "Ownership":
        b = np.asarray(bounds, dtype=np.int64)
        return cls(int(b[-1]), b.size - 1, bounds=b)

    @classmethod
    def per_vertex(cls, owner: np.ndarray, world_size: int) -> "Ownership":
        return cls(int(owner.size), world_size, owner=np.asarray(owner, dtype=np.int32))

    @property
    def contiguous(self) -> bool:
        return self.bounds is not None

    def counts(self) -> np.ndarray:
        """Vertices per rank, int64 `[P]`."""
        if self.contiguous:
            return np.diff(self.bounds)
        return np.bincount(self.owner, minlength=self.world_size).astype(np.int64)

    def count(self, rank: int) -> int:
        return int(self.counts()[rank])

    def own(self, rank: int) -> np.ndarray:
        """Sorted global indices (int64) owned by `rank`."""
        if self.contiguous:
            return np.arange(self.bounds[rank], self.bounds[rank + 1], dtype=np.int64)
        return np.flatnonzero(self.owner == rank).astype(np.int64)

    def owner_of(self, idx: np.ndarray) -> np.ndarray:
        """Owner rank (int64) of each global index in `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.contiguous:
            return np.searchsorted(self.bounds, idx, side="right").astype(np.int64) - 1
        return self.owner[idx].astype(np.int64)

    def position(self, idx: np.ndarray) -> np.ndarray:
        """Row (int64) of each global index in its owner's rows."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.contiguous:
            return idx - self.bounds[self.owner_of(idx)]
        if "pos" not in self._cache:  # O(n) once: graph / random partitions are O(n) anyway
            order = np.argsort(self.owner, kind="stable")
            starts = np.concatenate([[0], np.cumsum(self.counts())])
            pos = np.empty(self.n, dtype=np.int64)
            pos[order] = np.arange(self.n) - starts[self.owner[order]]
            self._cache["pos"] = pos
        return self._cache["pos"][idx]

    def local_rows(self, idx: np.ndarray, rank: int) -> np.ndarray:
        """Rows in `rank`'s rows of global indices that `rank` owns. With contiguous ownership the
        int64 array `idx` itself is returned, shifted in place (no new array: set-up memory)."""
        if self.contiguous:
            idx -= self.bounds[rank]
            return idx
        return self.position(idx)

    def owner_array(self) -> np.ndarray:
        """The owner of every vertex, int32 `[n]` (materialised: for statistics and tests)."""
        if self.contiguous:
            return np.repeat(np.arange(self.world_size, dtype=np.int32), self.counts())
        return self.owner


def hidden_fibres(lift: Lift) -> list[str]:
    """The non-input fibres, in topological order (the ones a partition assigns)."""
    return [v for v in lift.base.order if lift.base.vertices[v].role != "input"]


# ---------------------------------------------------------------- strategies
def _block_loads(lift: Lift, v: str, blocks: range) -> np.ndarray:
    """Work per target vertex of the given sampling blocks of fibre v: in-edges times the size of
    each message block, plus one for the vertex map and readout row."""
    B, n = lift.block_size, lift.n(v)
    lo, hi = blocks.start * B, min(blocks.stop * B, n)
    load = np.ones(hi - lo, dtype=np.float64)
    for e in lift.base.in_edges(v):
        scale = lift.base.dim(e.src) * lift.base.dim(v)
        deg = np.concatenate([lift.block_degrees(e, b) for b in blocks]) if len(blocks) else np.zeros(0)
        load += deg * scale
    return load


def block_partition(lift: Lift, world_size: int) -> dict[str, Ownership]:
    """Contiguous ranges per fibre, balanced by in-edge work (see the module doc)."""
    out = {}
    B = lift.block_size
    for v in hidden_fibres(lift):
        n, nb = lift.n(v), lift.num_blocks(v)
        per_block = np.array([_block_loads(lift, v, range(b, b + 1)).sum() for b in range(nb)])
        cum_block = np.concatenate([[0.0], np.cumsum(per_block)])
        targets = cum_block[-1] * np.arange(1, world_size) / world_size
        # the vertex-level cut: the first vertex whose cumulative load reaches the target
        cuts = np.zeros(world_size - 1, dtype=np.int64)
        for k, t in enumerate(targets):
            b = min(int(np.searchsorted(cum_block, t, side="left")) - 1, nb - 1)
            b = max(b, 0)
            cum = cum_block[b] + np.cumsum(_block_loads(lift, v, range(b, b + 1)))
            cum = np.concatenate([[cum_block[b]], cum])
            cuts[k] = b * B + int(np.searchsorted(cum, t, side="left"))
        out[v] = Ownership.ranges(range_bounds(cuts, n, B, world_size))
    return out


def range_bounds(cuts, n: int, block: int, world_size: int) -> np.ndarray:
    """The `[P + 1]` boundaries of a `block` ownership of n vertices from its `P - 1` vertex-level
    cuts: snapped to the nearest multiple of the sampling block (ties to even) when the fibre has
    at least 8 blocks per rank (a rank then samples whole blocks, at a balance cost of at most half
    a block in eight), then made non-decreasing and clipped to `[0, n]`. The one snapping rule:
    `block_partition` and the memory model (`estimate/`) both call it."""
    cuts = np.asarray(cuts, dtype=np.int64).reshape(-1)
    if n >= 8 * block * world_size:
        cuts = np.clip(np.rint(cuts / block).astype(np.int64) * block, 0, n)
    bounds = np.maximum.accumulate(np.concatenate([[0], cuts, [n]]).astype(np.int64))
    return np.minimum(bounds, n)


def equal_load_bounds(n: int, world_size: int, block: int) -> np.ndarray:
    """`range_bounds` when every vertex carries the same load (the expectation of the `block`
    strategy for one fibre, exact for the fixed-degree law): cut r at the first vertex whose
    cumulative load reaches r / P of the total, `ceil(n r / P)`."""
    cuts = [-(-n * r // world_size) for r in range(1, world_size)]
    return range_bounds(cuts, n, block, world_size)


def random_partition(lift: Lift, world_size: int, seed: int = 0) -> dict[str, Ownership]:
    out = {}
    for i, v in enumerate(lift.base.order):
        if lift.base.vertices[v].role == "input":
            continue
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, lift.seed, 7, i])))
        out[v] = Ownership.per_vertex(rng.permutation(lift.n(v)) % world_size, world_size)
    return out


def graph_partition(lift: Lift, world_size: int, max_edges: int = 20_000_000) -> dict[str, Ownership]:
    try:
        import pymetis
    except ImportError:
        raise PartitionError("partition strategy 'graph' needs pymetis: pip install pymetis "
                             "(or choose strategy 'block')") from None
    base = lift.base
    hidden = hidden_fibres(lift)
    total = sum(lift.expected_edges(e) for e in base.edges if e.src in hidden)
    if total > max_edges:
        raise PartitionError(f"partition strategy 'graph' on a lift with ~{total:.3g} edges: more than "
                             f"{max_edges:.3g}; use strategy 'block' for lifts this large")
    offset, off = {}, 0
    for v in hidden:
        offset[v], off = off, off + lift.n(v)
    if world_size == 1:
        return {v: Ownership.per_vertex(np.zeros(lift.n(v), np.int32), 1) for v in hidden}
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
    return {v: Ownership.per_vertex(parts[offset[v]:offset[v] + lift.n(v)].copy(), world_size) for v in hidden}


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


def make_partition(lift: Lift, world_size: int, strategy: str = "block", seed: int = 0) -> dict[str, Ownership]:
    """The `Ownership` of every non-input fibre over `world_size` ranks."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PartitionError(f"lift-parallel size {world_size!r}: must be a positive integer")
    if strategy == "block":
        return block_partition(lift, world_size)
    if strategy == "random":
        return random_partition(lift, world_size, seed)
    if strategy == "graph":
        return graph_partition(lift, world_size)
    raise PartitionError(f"partition strategy {strategy!r}: choose one of {STRATEGIES}")


if __name__ == "__main__":  # not a command: say which one shows a partition
    print("python -m randlift_dist.partition is not a command: the partition of a config (vertices per rank, "
          "cut, halo) is shown by python -m randlift_dist.planstats --config FILE --world-size P "
          "[--strategy block|graph|random]", file=sys.stderr)
    sys.exit(2)
