"""The shapes of one rank, from the base graph and the lift: rows of each fibre, and per base edge
the counts every term needs (edges, halo, exchange mode) and what its kernel sees with positions.

What an edge computes with positions (`model_edges.EdgeMap`): its per-member map (pool, mean,
select, flatten; identity for linear and conv) turns a source member's `[d_u, B * P_u]` rows into
`row` values per sample (`BaseGraph.exchange_values`: what a halo row holds), then the kernel runs
on `F` features (`BaseGraph.weight_shape`: the weight is `[d_v, F]`) and `kcols` columns per sample
(`geometry.kernel_columns`): a linear edge is the plain kernel on `B * P` columns; a conv edge runs
it on the unfolded sources `[rows, d_u * taps, b * P_v]`, one call per chunk of `b` samples
(`ops.window._batch_chunks`, asked here on a tensor of the right shape that holds no memory); a
token input's edge is an embedding lookup (`ops/embed.py`: no kernel, no exchange).

Every runtime decision is asked of the runtime: rows per rank (`partition.equal_load_bounds`), the
exchange mode and volume (`exchange.choose_mode`, `exchange.rows_sent`), the conv chunks. Edge
counts are expectations of the lift law (`Lift.in_degree_of`; exact for `fixed_degree`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..exchange import choose_mode, rows_sent
from ..geometry import kernel_columns, numel
from ..model_edges import EdgeMap
from ..ops.window import Geometry, _batch_chunks
from ..partition import equal_load_bounds
from . import terms as tm


@dataclasses.dataclass(frozen=True)
class EdgeShape:
    """One base edge e = (u, v) on one rank: expected in-degree k, fibre sizes, this rank's target
    rows n_v and source rows own_u, the exchange (mode, expected halo rows of this rank), and the
    kernel's view with positions (see the module doc)."""

    name: str
    key: tuple[str, ...]
    kind: str
    d_u: int
    d_v: int
    features: int  # F: one lifted edge's weight is [d_v, F]
    row: int  # values per sample of one exchanged (mapped) source member
    kcols: int  # kernel columns per sample
    src_values: int  # values per sample of one raw source member, d_u * P_u
    dst_values: int  # values per sample of one target member, d_v * P_v
    geom: Geometry | None  # conv edges
    tokens: bool  # an embedding out of a token input
    k: float
    n_u: int
    n_v: int
    own_u: int
    max_own_u: int
    lift_parallel: int
    src_input: bool
    mode: str  # none, alltoall, allgather
    halo: float
    n_blocks: int

    @property
    def exchanging(self) -> bool:
        return self.mode != "none"

    @property
    def m(self) -> float:
        return self.n_v * self.k

    @property
    def s(self) -> int:
        """Parameters per lifted edge."""
        return self.d_v * self.features

    @property
    def m_local(self) -> float:
        return self.m * self.own_u / self.n_u if self.exchanging else self.m

    @property
    def received(self) -> float:
        """Rows of the received buffer (all-gather: every rank's shard, padded)."""
        return float(self.lift_parallel * self.max_own_u) if self.mode == "allgather" else self.halo

    @property
    def send_rows(self) -> float:
        """Rows of the send buffer (all-gather: this rank's shard padded to the largest)."""
        return float(self.max_own_u) if self.mode == "allgather" else self.sent

    @property
    def sent(self) -> float:
        """Rows sent per sample (by symmetry, what the peers need from this rank)."""
        if not self.exchanging:
            return 0.0
        if self.mode == "allgather":
            return float(rows_sent("allgather", 0, self.max_own_u, self.lift_parallel))
        return self.halo

    def chunks(self, rows: float, batch: int, device: str) -> list[int]:
        """Samples of each kernel call on `batch` samples over `rows` source rows: one call, or a
        conv edge's chunks (`ops.window._batch_chunks`, on a zero-stride tensor of the call's shape)."""
        if self.geom is None or batch <= 0:
            return [batch]
        n = max(1, int(round(rows)))
        fake = torch.empty((), device="cpu" if device == "cpu" else "meta").expand(n, self.d_u, batch * self.geom.p_in)
        return [b1 - b0 for b0, b1 in _batch_chunks(fake, self.geom)]

    def unfolded(self, rows: float, samples: int) -> float:
        """Values of the unfolded sources of `samples` samples over `rows` rows (conv edges)."""
        return rows * self.features * samples * self.kcols

    def padded_values(self, rows: float, samples: int) -> float:
        """Values of a conv edge's zero-padded source (the fold's buffer) of `samples` samples."""
        g = self.geom
        return rows * self.d_u * samples * math.prod(p + 2 * q for p, q in zip(g.in_pos, g.padding))


def fibre_bounds(base, lift, L: int) -> dict[str, list[tuple[int, int]]]:
    """`[lo, hi)` of every fibre on each lift-parallel rank (an input fibre: all of it, everywhere)."""
    out = {}
    for v in base.vertices:
        n = lift.n(v)
        if base.vertices[v].role == "input":
            out[v] = [(0, n)] * L
        else:
            b = equal_load_bounds(n, L, lift.block_size).tolist()
            out[v] = [(b[r], b[r + 1]) for r in range(L)]
    return out


def _blocks(lo: int, hi: int, block: int) -> int:
    """Sampling blocks holding rows `[lo, hi)` (`ShardPlan.target_blocks`)."""
    return -(-hi // block) - lo // block if hi > lo else 0


def edge_shapes(L: int, exchange: str, threshold: float, base, lift,
                bounds: dict[str, list[tuple[int, int]]]) -> list[list[EdgeShape]]:
    """`[rank][edge]` shapes; the exchange mode is the runtime's choice from every rank's halo."""
    rows = {v: [hi - lo for lo, hi in b] for v, b in bounds.items()}
    per_rank: list[list[EdgeShape]] = [[] for _ in range(L)]
    for e in base.edges:
        u, v = e.src, e.dst
        n_u, p = lift.n(u), lift.prob(e)
        src_input = base.vertices[u].role == "input"
        exch = L > 1 and not src_input
        halo = [tm.expected_halo_rows(n_u, rows[u][r], rows[v][r], p) if exch else 0.0 for r in range(L)]
        max_own = max(rows[u])
        mode = choose_mode(round(sum(halo)), L * (L - 1) * max_own, exchange, threshold) if exch else "none"
        d_v, F = base.weight_shape(e)
        emap = EdgeMap.of(base, e)
        common = dict(name=str(e), key=e.key, kind=e.kind, d_u=base.dim(u), d_v=d_v, features=F,
                      row=base.exchange_values(e), kcols=kernel_columns(e.kind, base.positions(v)),
                      src_values=base.dim(u) * numel(base.positions(u)), dst_values=d_v * numel(base.positions(v)),
                      geom=emap.geom, tokens=emap.tokens, k=lift.in_degree_of(e), n_u=n_u, max_own_u=max_own,
                      lift_parallel=L, src_input=src_input, mode=mode)
        for r in range(L):
            per_rank[r].append(EdgeShape(**common, n_v=rows[v][r], own_u=rows[u][r], halo=halo[r],
                                         n_blocks=_blocks(*bounds[v][r], lift.block_size)))
    return per_rank


def vertex_param_sizes(base, v: str, rows: int) -> list[int]:
    """Values of each per-vertex parameter of fibre v on `rows` rows (`BaseGraph.vertex_parameters`)."""
    return [rows * numel(shape) for shape in base.vertex_parameters(v).values()]


def expected_params(base, lift, out_dim: int) -> float:
    """Parameters of the whole lift: edge weights `E[m_e] x prod(weight_shape(e))`, per-vertex
    parameters (biases, norms) and the readout rows `[n_t, out_dim, d_t]`."""
    total = sum(lift.expected_edges(e) * math.prod(base.weight_shape(e)) for e in base.edges)
    total += sum(sum(vertex_param_sizes(base, v, lift.n(v))) for v in base.vertices)
    return total + sum(lift.n(t) * out_dim * base.dim(t) for t in base.outputs)
