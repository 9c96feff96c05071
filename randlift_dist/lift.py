"""Lifts of a base network: fibre sizes and block-wise, counter-based edge sampling.

A `Lift` fixes, for every base vertex `v`, a fibre size `n_v`, and for every base edge
`e = (u, v)` a law for the lifted edges over `e`:

- `full`: every pair (i in fibre u, j in fibre v) is an edge (the fully-connected lift);
- `bernoulli`: each pair is kept independently with probability `p_e = min(1, degree_e / n_u)`;
- `fixed_degree`: each target draws exactly `min(k_e, n_u)` distinct sources, uniformly.

World-size invariance: the targets of fibre `v` are cut into blocks of
`block_size` consecutive vertices, and the in-edges of block `b` over edge `e` are drawn from a
Philox stream keyed by `(seed, stream, edge name, b)` only. Generating any set of targets yields
exactly the matching rows of the whole edge list, whichever process asks and in whatever order.
Within a block the stream first draws the in-degrees, then the sources; so counting edges (for
load balancing) is cheap and never needs the sources.

Edges are returned as `(src, dst)` int64 arrays of indices inside the fibres, sorted by
`(dst, src)`; there are no duplicates. No step allocates an `n_u x n_v` array for a sparse law.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .graph import BaseGraph, Edge, GraphError, edge_key

LAWS = ("full", "bernoulli", "fixed_degree")
STREAM_EDGES = 0
STREAM_WEIGHTS = 1
STREAM_READOUT = 2
_DENSE_CHUNK = 1 << 22  # elements of random keys per chunk in the dense-sampling branch


class LiftError(ValueError):
    """A lift specification is invalid; the message names the value and the fix."""


def block_rng(seed: int, stream: int, name: str, block: int) -> np.random.Generator:
    """The counter-based stream for one block of one named object (a base edge 'u->v', a vertex)."""
    tag = zlib.crc32(name.encode())
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, stream, tag, block])))


@dataclasses.dataclass(frozen=True)
class Lift:
    """A lift specification. Build it with `random_sparse_lift` or `fully_connected_lift`."""

    base: BaseGraph
    sizes: Mapping[str, int]
    law: str
    degrees: Mapping[tuple[str, str], float]
    seed: int = 0
    block_size: int = 512

    # ------------------------------------------------------------ sizes and laws
    def n(self, v: str) -> int:
        return self.sizes[v]

    def num_blocks(self, v: str) -> int:
        return -(-self.sizes[v] // self.block_size)

    def in_degree_of(self, e: Edge) -> int:
        """Exact in-degree (full, fixed_degree) or the mean of the binomial one (bernoulli)."""
        n_u = self.sizes[e.src]
        if self.law == "full":
            return n_u
        if self.law == "fixed_degree":
            return min(int(self.degrees[e.key]), n_u)
        return n_u * self.prob(e)

    def prob(self, e: Edge) -> float:
        if self.law == "full":
            return 1.0
        return min(1.0, self.degrees[e.key] / self.sizes[e.src])

    def all_pairs(self, e: Edge) -> bool:
        """True when every (source, target) pair over `e` is an edge: the fully-connected lift's law,
        or a degree at least the source fibre's size (then bernoulli keeps every pair with
        probability 1 and fixed_degree takes every source)."""
        return self.law == "full" or self.degrees[e.key] >= self.sizes[e.src]

    def expected_edges(self, e: Edge) -> float:
        return self.sizes[e.dst] * self.in_degree_of(e)

    def expected_fan_in(self, v: str) -> float:
        """Expected scalar fan-in of a lifted vertex of fibre v: sum over in-edges of E[deg] * d_u."""
        return sum(self.in_degree_of(e) * self.base.dim(e.src) for e in self.base.in_edges(v))

    # ------------------------------------------------------------ sampling
    def block_degrees(self, e: Edge, block: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """In-degrees of the targets of one block (the first draw of the block's stream)."""
        e = self.base.edge(e)
        lo = block * self.block_size
        rows = min(self.block_size, self.sizes[e.dst] - lo)
        n_u = self.sizes[e.src]
        if self.law == "bernoulli":
            p = self.prob(e)
            if p < 1.0:
                rng = rng or block_rng(self.seed, STREAM_EDGES, str(e), block)
                return rng.binomial(n_u, p, size=rows).astype(np.int64)
        return np.full(rows, self.in_degree_of(e), dtype=np.int64)

    def sample_block(self, e: Edge, block: int) -> tuple[np.ndarray, np.ndarray]:
        """All in-edges `(src, dst)` of the targets of one block, sorted by (dst, src)."""
        e = self.base.edge(e)
        rng = block_rng(self.seed, STREAM_EDGES, str(e), block)
        deg = self.block_degrees(e, block, rng)
        row, src = _draw_sources(rng, self.sizes[e.src], deg, self.law == "full" or self.prob(e) >= 1.0)
        return src, row + block * self.block_size

    def iter_blocks(self, e: Edge, targets: np.ndarray | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Yield `(block, src, dst, keep)` for every block holding one of `targets`.

        `targets` is a sorted array of target indices (None: the whole fibre); `keep` is a boolean
        mask over the block's edges selecting the wanted targets (None: keep all).
        """
        e = self.base.edge(e)
        B = self.block_size
        if targets is None:
            for b in range(self.num_blocks(e.dst)):
                src, dst = self.sample_block(e, b)
                yield b, src, dst, None
            return
        targets = np.asarray(targets, dtype=np.int64)
        if targets.ndim != 1 or (targets.size > 1 and bool((targets[1:] <= targets[:-1]).any())):
            raise LiftError(f"targets for fibre {e.dst!r} must be a 1-d strictly increasing array of "
                            "indices (sorted, no repeats)")
        if targets.size and (targets[0] < 0 or targets[-1] >= self.sizes[e.dst]):
            raise LiftError(f"targets out of range [0, {self.sizes[e.dst]}) for fibre {e.dst!r}")
        blocks, starts = np.unique(targets // B, return_index=True)
        ends = np.append(starts[1:], targets.size)
        for b, s, t in zip(blocks.tolist(), starts.tolist(), ends.tolist()):
            src, dst = self.sample_block(e, b)
            rows = min(B, self.sizes[e.dst] - b * B)
            if t - s == rows:
                yield b, src, dst, None
            else:
                want = np.zeros(rows, dtype=bool)
                want[targets[s:t] - b * B] = True
                yield b, src, dst, want[dst - b * B]

    def edges(self, e: Edge | tuple[str, str] | str, targets: np.ndarray | range | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """`(src, dst)` of the lifted edges over base edge `e` ending in `targets` (None: all)."""
        e = self.base.edge(e)
        if isinstance(targets, range):
            targets = np.arange(targets.start, targets.stop, targets.step, dtype=np.int64)
        srcs, dsts = [], []
        for _, src, dst, keep in self.iter_blocks(e, targets):
            if keep is not None:
                src, dst = src[keep], dst[keep]
            srcs.append(src)
            dsts.append(dst)
        if not srcs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(srcs), np.concatenate(dsts)

    def in_degrees(self, e: Edge | tuple[str, str] | str) -> np.ndarray:
        """In-degree of every target of the fibre of `e.dst` (cheap: no sources drawn)."""
        e = self.base.edge(e)
        return np.concatenate([self.block_degrees(e, b) for b in range(self.num_blocks(e.dst))])

    # ------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "sizes": dict(self.sizes),
            "law": self.law,
            "degrees": {_key_str(k): d for k, d in self.degrees.items()},
            "seed": self.seed,
            "block_size": self.block_size,
        }

    def fingerprint(self) -> str:
        """A hash of everything that determines the lifted graph (not the weights)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"Lift(law={self.law}, sizes={dict(self.sizes)}, seed={self.seed}, "
                f"degrees={{{', '.join(f'{_key_str(k)}: {d:g}' for k, d in self.degrees.items())}}})")


def _key_str(key: tuple[str, ...]) -> str:
    """'u->v' (or 'u->v:slot' for an edge into an attention vertex), as `str(Edge)`."""
    return f"{key[0]}->{key[1]}" + (f":{key[2]}" if len(key) > 2 else "")


def _draw_sources(rng: np.random.Generator, n_u: int, deg: np.ndarray, all_sources: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rows and sources: for row r, `deg[r]` distinct sources uniform in [0, n_u), sorted.

    Every branch is symmetric under relabelling the sources, and returns sets of the drawn size,
    so each row's set is uniform among the sets of that size; with binomial degrees this is
    exactly independent Bernoulli edges.
    """
    rows = deg.size
    row = np.repeat(np.arange(rows, dtype=np.int64), deg)
    if row.size == 0:
        return row, np.zeros(0, np.int64)
    if all_sources:
        return row, np.tile(np.arange(n_u, dtype=np.int64), rows)
    kmax = int(deg.max())
    if 4 * kmax >= n_u:
        # dense branch: random keys per (row, source), keep each row's deg smallest keys
        out = []
        chunk = max(1, _DENSE_CHUNK // n_u)
        for lo in range(0, rows, chunk):
            d = deg[lo:lo + chunk]
            picks = np.argsort(rng.random((d.size, n_u)), axis=1)[:, :kmax]
            mask = np.arange(kmax) < d[:, None]
            picks = np.sort(np.where(mask, picks, n_u), axis=1)
            out.append(picks[mask])
        return row, np.concatenate(out).astype(np.int64)
    # sparse branch: draw with replacement, redraw duplicates until none are left
    # The key row * n_u + src fixes src, so sorting the keys themselves (no argsort, no
    # gather; any sort algorithm gives the same array) yields the sources in (row, src) order.
    src = rng.integers(0, n_u, size=row.size, dtype=np.int64)
    base = row * n_u
    while True:
        key = base + src
        key.sort()
        np.subtract(key, base, out=src)  # rows stay sorted: the key is row-major
        dup = np.zeros(src.size, dtype=bool)
        np.equal(key[1:], key[:-1], out=dup[1:])
        n_dup = int(dup.sum())
        if n_dup == 0:
            return row, src
        src[dup] = rng.integers(0, n_u, size=n_dup, dtype=np.int64)


# ---------------------------------------------------------------- constructors
def _resolve_sizes(base: BaseGraph, size: Any, inputs_default: int = 1) -> dict[str, int]:
    sizes: dict[str, int] = {}
    if isinstance(size, Mapping):
        unknown = set(size) - set(base.vertices)
        if unknown:
            raise LiftError(f"lift size names unknown vertices {sorted(unknown)}; vertices: {list(base.vertices)}")
        for v in base.vertices:
            default = inputs_default if base.vertices[v].role == "input" else None
            s = size.get(v, default)
            if s is None:
                raise LiftError(f"lift size has no entry for vertex {v!r}: give every non-input vertex a size")
            sizes[v] = s
    else:
        for v in base.vertices:
            sizes[v] = inputs_default if base.vertices[v].role == "input" else size
    for v, s in sizes.items():
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise LiftError(f"lift size {s!r} for vertex {v!r}: a lift size must be a positive integer")
        sizes[v] = int(s)
    return sizes


def _resolve_degrees(base: BaseGraph, degree: Any, law: str) -> dict[tuple[str, str], float]:
    per_edge: dict[tuple[str, str], Any] = {}
    default = degree
    if isinstance(degree, Mapping):
        default = None
        for k, d in degree.items():
            key = edge_key(k)
            try:
                base.edge(key)
            except GraphError:
                raise LiftError(f"degree given for unknown edge {key[0]}->{key[1]}; edges: {[str(e) for e in base.edges]}") from None
            per_edge[key] = d
    out = {}
    for e in base.edges:
        d = per_edge.get(e.key, e.degree if e.degree is not None else default)
        if d is None:
            raise LiftError(f"no degree for edge {e}: pass degree=<number> or a degree per edge")
        if isinstance(d, bool) or not isinstance(d, (int, float, np.integer, np.floating)) or not d > 0 or not math.isfinite(d):
            raise LiftError(f"degree {d!r} for edge {e}: a degree must be a finite number > 0")
        if law == "fixed_degree" and float(d) != int(d):
            raise LiftError(f"degree {d!r} for edge {e}: the fixed_degree law needs an integer degree "
                            "(or use law='bernoulli' for a fractional average degree)")
        out[e.key] = int(d) if law == "fixed_degree" else float(d)
    return out


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise LiftError(f"block_size {block_size!r}: must be a positive integer (default 512)")
    return block_size


def random_sparse_lift(base: BaseGraph, size: int | Mapping[str, int], degree: float | Mapping[Any, float],
                       seed: int = 0, law: str = "bernoulli", block_size: int = 512) -> Lift:
    """The random sparse lift of `base`: each pair between adjacent fibres kept independently.

    size: fibre size of every non-input vertex, or a mapping vertex -> size (inputs default to 1).
    degree: average degree (bernoulli) or exact in-degree (fixed_degree) per base edge; a number, or
      a mapping `{"u->v": k}`; a base edge's own `degree` wins over a plain number.
    """
    if law not in ("bernoulli", "fixed_degree"):
        raise LiftError(f"law {law!r}: choose 'bernoulli' or 'fixed_degree' (or use fully_connected_lift)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LiftError(f"seed {seed!r}: must be a non-negative integer")
    return Lift(base, _resolve_sizes(base, size), law, _resolve_degrees(base, degree, law), int(seed),
                _check_block_size(block_size))


def fully_connected_lift(base: BaseGraph, sizes: int | Mapping[str, int], block_size: int = 512) -> Lift:
    """The fully-connected lift: every pair between adjacent fibres is an edge.

    `fully_connected_lift(base, 1)` is the identity lift (the base network itself).
    """
    return Lift(base, _resolve_sizes(base, sizes), "full", {}, 0, _check_block_size(block_size))
