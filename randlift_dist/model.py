"""`LiftedNetwork`: the lifted module of a base network, as an `nn.Module` (one shard per rank).

What a lifted vertex computes: for each base in-edge `e = (u, v)` of `v = pi(j)`,
`z_e(j) = sum over lifted edges (i -> j) over e of W_ij @ y_i`, then `y_j = act_v(sum_e z_e(j) + b_j)`.
Input fibres hold the input `x_v` on every vertex. The output is the linear readout
`f(x) = c * sum_{t in pi^-1(T)} A_t y_t`.

Parameters are flat per base edge (`[m_e, d_v, d_u]`), per vertex (`[n_v, d_v]` biases) and per
output vertex (`[n_t, out_dim, d_t]` readout rows); they hold the rows this rank owns. Built from
`(base, lift, plan)`: with no plan the module owns everything (one process, the plain lifted
network); with a `ShardPlan` (`plan.py`) and a `Communicator` (`comm.py`) the same code runs one
shard, and the readout's partial sums are summed over the lift-parallel group so every rank
returns the same output. Building the module communicates nothing: the plan was agreed on before.

Initial values are drawn block-wise from counter-based streams keyed by
`(seed, stream, base edge or vertex, block)`, so they do not depend on how the lift is sharded.
A block's edge weights are drawn for all its edges in the sampled `(dst, src)` order (only the
in-degrees are needed to know how many), then restricted to this rank's targets and put in the
plan's parameter order.
"""

from __future__ import annotations

import collections
import math
import os

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .comm import Communicator, HaloExchange, copy_to_lift_group, reduce_from_lift_group
from .graph import ACTIVATIONS, BaseGraph, Edge, GraphError, edge_key
from .lift import STREAM_READOUT, STREAM_WEIGHTS, Lift, block_rng
from .ops import CSR, IMPLS, aggregate, regenerated_aggregate
from .ops.workspace import DRAW_AHEAD
from .plan import EdgePlan, ShardPlan, build_plan

READOUT_SCALES = ("sum", "mean", "sqrt")
READOUT_INITS = ("zero", "normal")


class BlockChunks:
    """The edges of one regenerated base edge, for `ops.regenerated_aggregate`: runs of
    consecutive sampling blocks, drawn again from the lift's streams on every call (see
    `plan.BlockTopology`); nothing per edge is kept between calls."""

    def __init__(self, plan: ShardPlan, key: tuple[str, str]):
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
    """The lifted edges over one base edge that end at this rank's vertices.

    Stored topology: parameter rows are ordered: edges whose source is on this rank first (sorted
    by target, then source), then edges whose source is remote (same order). `csr_local` indexes
    the source rows held here, `csr_remote` the rows delivered by `exchange`, and the local part
    is computed while the remote rows are in flight. Regenerated topology (`plan.BlockTopology`):
    rows in the sampled order, no index arrays; the halo is received first and the edges are
    drawn again chunk by chunk over `[own rows | received rows]`.
    """

    def __init__(self, weight: torch.Tensor, ep: EdgePlan, exchange: HaloExchange | None, impl: str,
                 plan: ShardPlan | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.key, self.n_local, self.impl = ep.key, ep.n_local, impl
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

    def forward(self, y_src: torch.Tensor) -> torch.Tensor:  # [n_u_own, d_u, B] -> [n_v_own, d_v, B]
        w = self.weight
        if self.blocks is not None:
            if self.exchange is not None:
                y_src = torch.cat([y_src, self.exchange.finish(self.exchange.start(y_src))])
            return regenerated_aggregate(y_src, w, self.blocks)
        if self.exchange is None:
            return aggregate(y_src, w, self.csr_local, self.impl)
        started = self.exchange.start(y_src)  # remote rows in flight while local edges compute
        z = aggregate(y_src, w[: self.n_local], self.csr_local, self.impl)
        halo = self.exchange.finish(started)  # [n_halo, d_u, B]
        return z + aggregate(halo, w[self.n_local:], self.csr_remote, self.impl)


class LiftedNetwork(nn.Module):
    """The lifted network of `lift` (a `Lift` of `base`), trainable, with a linear readout.

    Args:
      plan: this rank's `ShardPlan` (None: own everything, one process).
      comm: the `Communicator` made from the same plan (needed when the plan has exchanges).
      out_dim: readout width (default: the dimension of the output vertices, if they agree).
      readout_scale: `c` in the readout: `sum` (1), `mean` (1/N), `sqrt` (1/sqrt N), N the number
        of lifted output vertices.
      weight_scale: standard deviation of the initial edge weights; default
        `1/sqrt(expected scalar fan-in)` of the target vertex.
      seed: seed of the initial weights (the lift's own seed fixes the edges).
      readout_init: `zero` (default) or `normal` (standard Gaussian readout rows).
      impl: aggregation kernel (`ops.IMPLS`).
      recompute: keep only the vertex outputs between forward and backward, recomputing each
        vertex's aggregation, bias and activation in the backward (less memory, one more forward,
        and for sharded vertices one more exchange).
    """

    def __init__(self, base: BaseGraph, lift: Lift, plan: ShardPlan | None = None, comm: Communicator | None = None,
                 out_dim: int | None = None, readout_scale: str = "sum", weight_scale: float | None = None,
                 seed: int = 0, readout_init: str = "zero", impl: str = "auto", dtype: torch.dtype = torch.float32,
                 recompute: bool = False):
        super().__init__()
        if lift.base is not base and lift.base.to_dict() != base.to_dict():
            raise ValueError("the lift was built from another base network: pass the same BaseGraph")
        if readout_scale not in READOUT_SCALES:
            raise ValueError(f"readout_scale {readout_scale!r}: choose one of {READOUT_SCALES}")
        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r}: choose one of {IMPLS}")
        if readout_init not in READOUT_INITS:
            raise ValueError(f"readout_init {readout_init!r}: choose one of {READOUT_INITS}")
        if weight_scale is not None and not (isinstance(weight_scale, (int, float)) and weight_scale > 0):
            raise ValueError(f"weight_scale {weight_scale!r}: must be a number > 0 (or None for 1/sqrt(fan-in))")
        try:
            out_dim = base.readout_dim(out_dim)
        except GraphError as err:
            raise ValueError(str(err)) from None
        if plan is None:
            plan = build_plan(lift)  # one process: no layout, no collective
        if plan.lift.fingerprint() != lift.fingerprint():
            raise ValueError("the plan was built for another lift: build it with plan.build_plan(lift, layout)")
        exchanging = [k for k, ep in plan.edges.items() if ep.exchange is not None]
        if exchanging and comm is None:
            raise ValueError("a sharded plan needs its Communicator: comm=Communicator.create(plan, layout) "
                             "(collective), or use parallelize.shard_network")
        self.base, self.lift, self.plan, self.out_dim = base, lift, plan, out_dim
        self.comm = comm or Communicator()
        self.readout_scale, self.seed, self.impl, self.recompute = readout_scale, seed, impl, recompute
        self.weight_scale, self.readout_init = weight_scale, readout_init
        n_out = sum(lift.n(t) for t in base.outputs)
        self.c = {"sum": 1.0, "mean": 1.0 / n_out, "sqrt": 1.0 / math.sqrt(n_out)}[readout_scale]

        self._vid = {v: i for i, v in enumerate(base.vertices)}
        self._eid = {e.key: i for i, e in enumerate(base.edges)}
        self.edges = nn.ModuleList(self._build_edge(e, dtype) for e in base.edges)
        self.biases = nn.ParameterDict({
            f"v{self._vid[v]}": nn.Parameter(torch.zeros(plan.n_own(v), base.dim(v), dtype=dtype))
            for v in base.order if base.vertices[v].bias
        })
        self.readouts = nn.ParameterDict({
            f"v{self._vid[t]}": nn.Parameter(self._init_readout(t, dtype)) for t in base.outputs
        })
        for p in self.parameters():
            p.model_parallel = plan.world_size > 1  # sharded over the lift-parallel group

    # ------------------------------------------------------------ construction
    def _scale(self, v: str) -> float:
        if self.weight_scale is not None:
            return float(self.weight_scale)
        return 1.0 / math.sqrt(max(self.lift.expected_fan_in(v), 1e-12))

    def _build_edge(self, e: Edge, dtype: torch.dtype) -> EdgeLayer:
        ep = self.plan.edges[e.key]
        w = torch.from_numpy(self._init_weights(e)).to(dtype)  # [m, d_v, d_u], sampled order
        if ep.local_first is not None:  # the plan's order: local-source edges first
            order = np.concatenate([np.flatnonzero(ep.local_first), np.flatnonzero(~ep.local_first)])
            w.copy_(w[torch.from_numpy(order)])
            del order
        ex = None if ep.exchange is None else self.comm.halo_exchange(e.key, ep.exchange)
        return EdgeLayer(w, ep, ex, self.impl, self.plan)

    def _init_weights(self, e: Edge) -> np.ndarray:
        """Initial weights of this rank's edges over `e` in the sampled order: block by block,
        all of a block's edges drawn (its in-degrees say how many), those of own targets kept."""
        lift, plan = self.lift, self.plan
        d_v, d_u = self.base.dim(e.dst), self.base.dim(e.src)
        out = np.empty((plan.edges[e.key].n_edges, d_v, d_u), dtype=np.float32)
        at = 0
        for b in plan.target_blocks(e.dst).tolist():
            deg = lift.block_degrees(e, b)
            w = block_rng(self.seed, STREAM_WEIGHTS, str(e), b).standard_normal((int(deg.sum()), d_v, d_u),
                                                                                 dtype=np.float32)
            keep = plan.block_keep(e.dst, b, deg.size)
            if keep is not None:
                w = w[np.repeat(keep, deg)]
            out[at:at + w.shape[0]] = w
            at += w.shape[0]
        if at != out.shape[0]:
            raise RuntimeError(f"edge {e}: drew {at} weights for {out.shape[0]} planned edges")
        out *= self._scale(e.dst)
        return out

    def _init_readout(self, t: str, dtype: torch.dtype) -> torch.Tensor:
        shape = (self.plan.n_own(t), self.out_dim, self.base.dim(t))
        if self.readout_init == "zero":
            return torch.zeros(shape, dtype=dtype)
        B = self.lift.block_size
        rows = []
        for b in self.plan.target_blocks(t).tolist():
            n_b = min(B, self.lift.n(t) - b * B)
            r = block_rng(self.seed, STREAM_READOUT, f"readout:{t}", b).standard_normal(
                (n_b,) + shape[1:], dtype=np.float32)
            keep = self.plan.block_keep(t, b, n_b)
            rows.append(r if keep is None else r[keep])
        return torch.from_numpy(np.concatenate(rows) if rows else np.zeros(shape, np.float32)).to(dtype)

    # ------------------------------------------------------------ introspection
    def edge_layer(self, e) -> EdgeLayer:
        return self.edges[self._eid[edge_key(e)]]

    def edge_index(self, e) -> tuple[torch.Tensor, torch.Tensor]:
        """`(src, dst)` int64 fibre indices of this rank's lifted edges over base edge `e`."""
        src, dst = self.plan.global_edges(edge_key(e))
        return torch.from_numpy(src), torch.from_numpy(dst)

    def edge_weight(self, e) -> torch.Tensor:
        """`[m, d_v, d_u]` weights aligned with `edge_index(e)` (the parameter itself)."""
        return self.edge_layer(e).weight

    def bias(self, v: str) -> torch.Tensor | None:
        """`[n_v, d_v]` biases of fibre v (this rank's rows), or None if v has no bias."""
        return self.biases[f"v{self._vid[v]}"] if self.base.vertices[v].bias else None

    def readout_weight(self, t: str) -> torch.Tensor:
        """`[n_t, out_dim, d_t]` readout rows of output fibre t (this rank's rows)."""
        return self.readouts[f"v{self._vid[t]}"]

    def vertex_of(self, key: str) -> str:
        """Vertex name of a bias / readout parameter key `v<i>`."""
        return list(self.base.vertices)[int(key[1:])]

    def own_rows(self, v: str) -> torch.Tensor:
        """Global fibre indices of the rows of fibre v held by this rank (row order of bias/readout)."""
        return torch.from_numpy(self.plan.own(v))

    def num_edges(self) -> int:
        return sum(layer.weight.shape[0] for layer in self.edges)

    # ------------------------------------------------------------ forward
    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All activations `{v: [n_v_own, d_v, B]}` for a batch `x` of shape `[B, in_dim]`."""
        base = self.base
        if x.dim() != 2 or x.shape[1] != base.in_dim:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected [batch, {base.in_dim}] "
                             f"(inputs {base.inputs} concatenated in declaration order)")
        # every rank uses all of x: its gradient sums the shards' parts
        x = copy_to_lift_group(x.to(self._dtype()), self.comm.lift_group)
        ys: dict[str, torch.Tensor] = {}
        off = 0
        for v in base.inputs:
            d = base.dim(v)
            ys[v] = x[:, off:off + d].t().unsqueeze(0).expand(self.lift.n(v), d, x.shape[0])
            off += d
        for v in base.order:
            if v in ys:
                continue
            srcs = [ys[e.src] for e in base.in_edges(v)]
            if self.recompute and torch.is_grad_enabled():
                ys[v] = checkpoint(self._vertex, v, *srcs, use_reentrant=False)
            else:
                ys[v] = self._vertex(v, *srcs)
        return ys

    def _vertex(self, v: str, *srcs: torch.Tensor) -> torch.Tensor:
        """`act_v(sum over in-edges of the aggregation + b_v)`: `[n_v_own, d_v, B]`."""
        z = None
        for e, y_src in zip(self.base.in_edges(v), srcs):
            z_e = self.edges[self._eid[e.key]](y_src)  # [n_v_own, d_v, B]
            z = z_e if z is None else z + z_e
        b = self.bias(v)
        if b is not None:
            z = z + b.unsqueeze(-1)
        return ACTIVATIONS[self.base.vertices[v].activation](z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_dim] -> [B, out_dim]
        ys = self.activations(x)
        out = None
        for t in self.base.outputs:
            part = torch.einsum("nod,ndb->bo", self.readout_weight(t), ys[t])
            out = part if out is None else out + part
        return reduce_from_lift_group(out * self.c, self.comm.lift_group)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.readouts.values())).dtype
