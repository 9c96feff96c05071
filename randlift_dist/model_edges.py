"""Edge maps of a lifted network: `EdgeLayer`, the lifted edges over one base edge on one rank.

What an edge computes, by kind (`geometry.py` for the shapes): first a map of each source member's
own rows (`pre`: pooling, global mean, one position, or flatten to channel-major features; identity
for linear and conv edges), then the exchange of the (mapped) rows whose members live on other
ranks, then the aggregation `z[j] = sum_{i -> j} W_ij @ u[i]` at every target position, where `u` is
the mapped source (linear, pool, mean, select, flatten) or its unfolding (conv,
`ops.windowed_aggregate`: raw rows are exchanged and unfolded after receipt). Token inputs:
`ops.embed_aggregate`. Mapping before the exchange is exact (the map is per member) and sends fewer
bytes (pooled rows, a mean).

Activations are `[n, d, B * P]` (P = prod(positions), position fastest); the exchange moves whole
member rows and does not see positions. Stored topology: parameter rows are ordered: edges whose
source is on this rank first (sorted by target, then source), then edges whose source is remote
(same order); `csr_local` indexes the source rows held here, `csr_remote` the rows delivered by
`exchange`, and the local part is computed while the remote rows are in flight. Regenerated topology
(`plan.BlockTopology`): rows in the sampled order, no index arrays; the halo is received first and
the edges are drawn again chunk by chunk over `[own rows | received rows]`.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .comm import HaloExchange
from .geometry import flat_index, numel
from .graph import BaseGraph, Edge
from .ops.workspace import DRAW_AHEAD
from .ops import CSR, Geometry, Regenerated, Stored, aggregate, embed_aggregate, regenerated_aggregate, windowed_aggregate
from .plan import EdgePlan, ShardPlan


@dataclasses.dataclass(frozen=True)
class EdgeMap:
    """What one base edge computes, in the terms of the kernels."""

    kind: str
    p_src: int  # positions of the source (product)
    src_pos: tuple[int, ...]
    geom: Geometry | None = None  # conv edges
    pool: tuple | None = None  # pool edges: (max|avg, kernel, stride, padding, dilation)
    index: int | None = None  # select edges: the flat position
    tokens: bool = False

    @classmethod
    def of(cls, base: BaseGraph, e: Edge) -> "EdgeMap":
        sp, w = base.positions(e.src), e.window
        tokens = base.vertices[e.src].tokens is not None
        if e.kind == "conv":
            geom = Geometry(sp, base.positions(e.dst), w.kernel, w.stride, w.padding, w.dilation)
            return cls("conv", numel(sp), sp, geom=geom)
        if e.kind == "pool":
            return cls("pool", numel(sp), sp, pool=(e.pool, w.kernel, w.stride, w.padding, w.dilation))
        if e.kind == "select":
            return cls("select", numel(sp), sp, index=flat_index(e.index, sp))
        return cls(e.kind, numel(sp), sp, tokens=tokens)

    def pre(self, y: torch.Tensor) -> torch.Tensor:
        """The per-member map applied before the exchange: `[n, d, B * P_src] -> [n, d', B * P']`."""
        if self.kind in ("linear", "conv"):
            return y
        n, d, cols = y.shape
        B = cols // self.p_src
        if self.kind == "pool":
            how, k, s, p, dil = self.pool
            x = y.reshape(n * d, B, *self.src_pos)  # pooling treats (member, feature) as the batch, B as channels
            if how == "max":
                fn = F.max_pool1d if len(k) == 1 else F.max_pool2d
                out = fn(x, k, s, p, dil)
            else:
                fn = F.avg_pool1d if len(k) == 1 else F.avg_pool2d
                out = fn(x, k, s, p)
            return out.reshape(n, d, -1)
        x = y.view(n, d, B, self.p_src)
        if self.kind == "mean":
            return x.mean(3)
        if self.kind == "select":
            return x[..., self.index].contiguous()
        if self.kind == "flatten":  # features (c, p), channel-major: torch's flatten(1) of [B, C, *P]
            return x.transpose(2, 3).reshape(n, d * self.p_src, B)
        raise ValueError(f"unknown edge kind {self.kind!r}")


class BlockChunks:
    """The edges of one regenerated base edge, for `ops.regenerated_aggregate`: runs of
    consecutive sampling blocks, drawn again from the lift's streams on every call (see
    `plan.BlockTopology`); nothing per edge is kept between calls."""

    def __init__(self, plan: ShardPlan, key: tuple[str, ...]):
        ep = plan.edges[key]
        self.plan, self.key, self.n_rows = plan, key, ep.n_rows
        self.edge_ptr, self.row_ptr = ep.blocks.edge_ptr, ep.blocks.row_ptr

    def chunks(self, max_edges: int, prepare):
        """Yield `prepare(r0, r1, e0, e1, row, col)` per run of blocks (see `ops/regen.py`). The
        next `DRAW_AHEAD` runs are drawn and prepared on helper threads while the caller computes
        on this one (numpy's generators and sorts release the GIL)."""
        ptr, nb = self.edge_ptr, self.edge_ptr.size - 1
        spans, i0 = [], 0
        while i0 < nb:  # as many whole blocks as fit in max_edges, at least one
            i1 = max(i0 + 1, int(np.searchsorted(ptr, ptr[i0] + max_edges, side="right")) - 1)
            spans.append((i0, i1))
            i0 = i1

        def make(i0: int, i1: int):
            row, col = self.plan.block_edges(self.key, i0, i1)
            return prepare(int(self.row_ptr[i0]), int(self.row_ptr[i1]), int(ptr[i0]), int(ptr[i1]), row, col)

        if len(spans) == 1:
            yield make(*spans[0])
            return
        pool, ahead = _drawing_pool(), collections.deque()
        for j, span in enumerate(spans):
            while len(ahead) < DRAW_AHEAD and j + len(ahead) < len(spans):
                ahead.append(pool.submit(make, *spans[j + len(ahead)]))
            yield ahead.popleft().result()

    def rows(self) -> torch.Tensor:
        """The target row of every edge, in parameter order (drawn again)."""
        parts = list(self.chunks(1 << 22, lambda r0, r1, e0, e1, row, col: row))
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))


_POOL: dict = {}


def _drawing_pool():
    """The threads that draw the next runs of blocks of a regenerated edge, one pool per process
    (keyed by pid: a forked child gets its own, the parent's threads do not exist there)."""
    pid = os.getpid()
    if pid not in _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.clear()
        _POOL[pid] = ThreadPoolExecutor(max_workers=DRAW_AHEAD, thread_name_prefix="randlift-draw")
    return _POOL[pid]


class EdgeLayer(nn.Module):
    """The lifted edges over one base edge that end at this rank's vertices (see the module doc)."""

    def __init__(self, weight: torch.Tensor, ep: EdgePlan, exchange: HaloExchange | None, impl: str,
                 plan: ShardPlan | None = None, emap: EdgeMap | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.key, self.n_local, self.impl, self.n_rows = ep.key, ep.n_local, impl, ep.n_rows
        self.emap = emap or EdgeMap("linear", 1, ())
        self.exchange = exchange
        self.csr_local = self.csr_remote = self.blocks = None
        if ep.regenerated:
            self.blocks = BlockChunks(plan, ep.key)
            return
        self.csr_local = CSR(torch.from_numpy(ep.row_local), torch.from_numpy(ep.col_local), ep.n_rows,
                             ep.n_cols_local)
        if ep.exchange is not None:
            self.csr_remote = CSR(torch.from_numpy(ep.row_remote), torch.from_numpy(ep.col_remote), ep.n_rows,
                                  ep.n_cols_remote)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        dev = self.weight.device
        if self.csr_local is not None:
            self.csr_local = self.csr_local.to(dev)
        if self.csr_remote is not None:
            self.csr_remote = self.csr_remote.to(dev)
        return self

    def _stored(self, y: torch.Tensor, w: torch.Tensor, csr: CSR) -> torch.Tensor:
        if self.emap.geom is not None:
            return windowed_aggregate(y, w, self.emap.geom, Stored(csr, self.impl))
        return aggregate(y, w, csr, self.impl)

    def forward(self, y_src: torch.Tensor) -> torch.Tensor:  # [n_u_own, d_u, B*P_u] -> [n_v_own, d_v, B*P_v]
        w = self.weight
        if self.emap.tokens:  # y_src: token ids [B * P]; input fibres are never exchanged
            rows = self.blocks.rows() if self.blocks is not None else self.csr_local.row
            return embed_aggregate(y_src, w, rows, self.n_rows)
        y = self.emap.pre(y_src)
        if self.blocks is not None:
            if self.exchange is not None:
                y = torch.cat([y, self.exchange.finish(self.exchange.start(y))])
            if self.emap.geom is not None:
                return windowed_aggregate(y, w, self.emap.geom, Regenerated(self.blocks))
            return regenerated_aggregate(y, w, self.blocks)
        if self.exchange is None:
            return self._stored(y, w, self.csr_local)
        started = self.exchange.start(y)  # remote rows in flight while local edges compute
        z = self._stored(y, w[: self.n_local], self.csr_local)
        halo = self.exchange.finish(started)  # [n_halo, d_u, B * P]
        return z + self._stored(halo, w[self.n_local:], self.csr_remote)
