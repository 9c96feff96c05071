"""`LiftedNetwork`: the lifted module of a base network, as an `nn.Module` (one shard per rank).

What a lifted vertex computes (NOTES.md section 2): for each base in-edge `e = (u, v)` of
`v = pi(j)`, `z_e(j) = sum over lifted edges (i -> j) over e of W_ij @ y_i`, then
`y_j = act_v(sum_e z_e(j) + b_j)`. Input fibres hold the input `x_v` on every vertex. The output
is the linear readout `f(x) = c * sum_{t in pi^-1(T)} A_t y_t`.

Parameters are flat per base edge (`[m_e, d_v, d_u]`), per vertex (`[n_v, d_v]` biases) and per
output vertex (`[n_t, out_dim, d_t]` readout rows); they hold the rows this rank owns. On one
process the rank owns everything and the model is the plain lifted network; with a partition
(see `partition.py` and `comm.py`) the same code runs a shard, and the readout's partial sums are
all-reduced over the lift-parallel group so every rank returns the same output.

Initial values are drawn block-wise from counter-based streams keyed by
`(seed, stream, base edge or vertex, block)`, so they do not depend on how the lift is sharded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .graph import ACTIVATIONS, BaseGraph, Edge, edge_key
from .lift import STREAM_READOUT, STREAM_WEIGHTS, Lift, block_rng
from .ops import CSR, aggregate

READOUT_SCALES = ("sum", "mean", "sqrt")
READOUT_INITS = ("zero", "normal")


class EdgeLayer(nn.Module):
    """The lifted edges over one base edge that end at this rank's vertices.

    Parameter rows are ordered: edges whose source is on this rank first (sorted by target, then
    source), then edges whose source is remote (same order). `csr_local` indexes the owner rows
    of the source fibre, `csr_remote` the halo rows delivered by `exchange`.
    """

    def __init__(self, weight: torch.Tensor, n_local: int, csr_local: CSR, csr_remote: CSR | None,
                 exchange: Any = None, impl: str = "auto", index: Any = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.n_local = n_local
        self.csr_local, self.csr_remote = csr_local, csr_remote
        self.exchange = exchange
        self.impl = impl
        self._index = index  # () -> global (src, dst) in parameter order, computed on demand

    def global_index(self) -> tuple[np.ndarray, np.ndarray]:
        """`(src, dst)` global fibre indices of the rows of `weight` (not stored: derived)."""
        return self._index(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        dev = self.weight.device
        self.csr_local = self.csr_local.to(dev)
        if self.csr_remote is not None:
            self.csr_remote = self.csr_remote.to(dev)
        return self

    def forward(self, y_src: torch.Tensor) -> torch.Tensor:  # [n_u_own, d_u, B] -> [n_v_own, d_v, B]
        w = self.weight
        if self.exchange is None:
            return aggregate(y_src, w, self.csr_local, self.impl)
        pending = self.exchange.start(y_src)  # remote rows in flight while local edges compute
        z = aggregate(y_src, w[: self.n_local], self.csr_local, self.impl)
        halo = self.exchange.finish(pending)  # [n_halo, d_u, B]
        return z + aggregate(halo, w[self.n_local:], self.csr_remote, self.impl)


class LiftedNetwork(nn.Module):
    """The lifted network of `lift` (a `Lift` of `base`), trainable, with a linear readout.

    Args:
      out_dim: readout width (default: the dimension of the output vertices, if they agree).
      readout_scale: `c` in the readout: `sum` (1), `mean` (1/N), `sqrt` (1/sqrt N), N the number
        of lifted output vertices.
      weight_scale: standard deviation of the initial edge weights; default
        `1/sqrt(expected scalar fan-in)` of the target vertex.
      seed: seed of the initial weights (the lift's own seed fixes the edges).
      readout_init: `zero` (default) or `normal` (standard Gaussian readout rows).
      impl: aggregation kernel (`ops.IMPLS`).
      shard: a `partition.Shard` (ownership and exchange plan of this rank); None: own everything.
    """

    def __init__(self, base: BaseGraph, lift: Lift, out_dim: int | None = None,
                 readout_scale: str = "sum", weight_scale: float | None = None, seed: int = 0,
                 readout_init: str = "zero", impl: str = "auto", shard: Any = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if lift.base is not base and lift.base.to_dict() != base.to_dict():
            raise ValueError("the lift was built from another base network: pass the same BaseGraph")
        if readout_scale not in READOUT_SCALES:
            raise ValueError(f"readout_scale {readout_scale!r}: choose one of {READOUT_SCALES}")
        from .ops import IMPLS

        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r}: choose one of {IMPLS}")
        if readout_init not in READOUT_INITS:
            raise ValueError(f"readout_init {readout_init!r}: choose one of {READOUT_INITS}")
        if weight_scale is not None and not (isinstance(weight_scale, (int, float)) and weight_scale > 0):
            raise ValueError(f"weight_scale {weight_scale!r}: must be a number > 0 (or None for 1/sqrt(fan-in))")
        out_dims = {base.dim(t) for t in base.outputs}
        if out_dim is None:
            if len(out_dims) > 1:
                raise ValueError(f"output vertices have dims {sorted(out_dims)}: pass out_dim explicitly")
            out_dim = out_dims.pop()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim <= 0:
            raise ValueError(f"out_dim {out_dim!r}: must be a positive integer")
        self.base, self.lift, self.out_dim = base, lift, out_dim
        self.readout_scale, self.seed, self.impl = readout_scale, seed, impl
        self.weight_scale, self.readout_init = weight_scale, readout_init
        if shard is None:
            from .partition import Shard

            shard = Shard.single(lift)
        self.shard = shard
        n_out = sum(lift.n(t) for t in base.outputs)
        self.c = {"sum": 1.0, "mean": 1.0 / n_out, "sqrt": 1.0 / math.sqrt(n_out)}[readout_scale]

        self._vid = {v: i for i, v in enumerate(base.vertices)}
        self._eid = {e.key: i for i, e in enumerate(base.edges)}
        self.edges = nn.ModuleList(self._build_edge(e, dtype) for e in base.edges)
        self.biases = nn.ParameterDict({
            f"v{self._vid[v]}": nn.Parameter(torch.zeros(len(shard.own(v)), base.dim(v), dtype=dtype))
            for v in base.order if base.vertices[v].bias
        })
        self.readouts = nn.ParameterDict({
            f"v{self._vid[t]}": nn.Parameter(self._init_readout(t, dtype)) for t in base.outputs
        })
        for p in self.parameters():
            p.model_parallel = shard.world_size > 1  # sharded over the lift-parallel group

    # ------------------------------------------------------------ construction
    def _scale(self, v: str) -> float:
        if self.weight_scale is not None:
            return float(self.weight_scale)
        return 1.0 / math.sqrt(max(self.lift.expected_fan_in(v), 1e-12))

    def _build_edge(self, e: Edge, dtype: torch.dtype) -> EdgeLayer:
        lift, shard = self.lift, self.shard
        d_v, d_u = self.base.dim(e.dst), self.base.dim(e.src)
        srcs, dsts, ws = [], [], []
        for b, src, dst, keep in lift.iter_blocks(e, shard.own_or_none(e.dst)):
            w = block_rng(self.seed, STREAM_WEIGHTS, str(e), b).standard_normal((src.size, d_v, d_u), dtype=np.float32)
            if keep is not None:
                src, dst, w = src[keep], dst[keep], w[keep]
            srcs.append(src), dsts.append(dst), ws.append(w)
        src = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
        dst = np.concatenate(dsts) if dsts else np.zeros(0, np.int64)
        w = np.concatenate(ws) if ws else np.zeros((0, d_v, d_u), np.float32)
        del srcs, dsts, ws  # setup memory: only the concatenated arrays from here on
        w *= self._scale(e.dst)
        weight = torch.from_numpy(w).to(dtype)
        del w
        return shard.edge_layer(e, weight, src, dst, self.impl)

    def _init_readout(self, t: str, dtype: torch.dtype) -> torch.Tensor:
        own = self.shard.own(t)
        shape = (len(own), self.out_dim, self.base.dim(t))
        if self.readout_init == "zero":
            return torch.zeros(shape, dtype=dtype)
        B = self.lift.block_size
        rows = []
        for b in np.unique(own // B).tolist():
            n_b = min(B, self.lift.n(t) - b * B)
            r = block_rng(self.seed, STREAM_READOUT, f"readout:{t}", b).standard_normal(
                (n_b,) + shape[1:], dtype=np.float32)
            sel = own[(own >= b * B) & (own < b * B + n_b)] - b * B
            rows.append(r[sel])
        return torch.from_numpy(np.concatenate(rows) if rows else np.zeros(shape, np.float32)).to(dtype)

    # ------------------------------------------------------------ introspection
    def edge_layer(self, e) -> EdgeLayer:
        return self.edges[self._eid[edge_key(e)]]

    def edge_index(self, e) -> tuple[torch.Tensor, torch.Tensor]:
        """`(src, dst)` int64 fibre indices of this rank's lifted edges over base edge `e`."""
        src, dst = self.edge_layer(e).global_index()
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

    def _vname(self, key: str) -> str:
        """Vertex name of a parameter key `v<i>`."""
        return list(self.base.vertices)[int(key[1:])]

    def vertices(self, v: str) -> torch.Tensor:
        """Global fibre indices of the rows of fibre v held by this rank (row order of bias/readout)."""
        return torch.from_numpy(self.shard.own(v))

    def num_edges(self) -> int:
        return sum(layer.weight.shape[0] for layer in self.edges)

    # ------------------------------------------------------------ forward
    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All activations `{v: [n_v_own, d_v, B]}` for a batch `x` of shape `[B, in_dim]`."""
        base = self.base
        if x.dim() != 2 or x.shape[1] != base.in_dim:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected [batch, {base.in_dim}] "
                             f"(inputs {base.inputs} concatenated in declaration order)")
        x = x.to(self._dtype())
        if self.shard.world_size > 1:  # every rank uses all of x: its gradient sums the shards' parts
            from .comm import copy_to_group

            x = copy_to_group(x, self.shard.group)
        ys: dict[str, torch.Tensor] = {}
        off = 0
        for v in base.inputs:
            d = base.dim(v)
            ys[v] = x[:, off:off + d].t().unsqueeze(0).expand(len(self.shard.own(v)), d, x.shape[0])
            off += d
        for v in base.order:
            if v in ys:
                continue
            z = None
            for e in base.in_edges(v):
                z_e = self.edges[self._eid[e.key]](ys[e.src])  # [n_v_own, d_v, B]
                z = z_e if z is None else z + z_e
            b = self.bias(v)
            if b is not None:
                z = z + b.unsqueeze(-1)
            ys[v] = ACTIVATIONS[base.vertices[v].activation](z)
        return ys

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_dim] -> [B, out_dim]
        ys = self.activations(x)
        out = None
        for t in self.base.outputs:
            part = torch.einsum("nod,ndb->bo", self.readout_weight(t), ys[t])
            out = part if out is None else out + part
        return self.shard.reduce_readout(out * self.c)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.readouts.values())).dtype
