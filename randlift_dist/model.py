"""`LiftedNetwork`: the lifted module of a base network, as an `nn.Module` (one shard per rank).

What a lifted vertex computes: for each base in-edge `e = (u, v)` of `v = pi(j)`,
`z_e(j) = sum over lifted edges (i -> j) over e of M_e(W_ij, y_i)` (`model_edges.py`: linear at
every position, conv, pooling, mean, select, flatten, embeddings), then the vertex map
(`model_vertices.py`): `y_j = act_v(norm_v(sum_e z_e(j) + b_j))`, or attention over the q, k, v
sums. Input fibres hold the input `x_v` on every vertex. The output is the linear readout
`f(x) = c * sum_{t in pi^-1(T)} A_t y_t`, at every position of the output vertices.

Shapes: activations `[n_v_own, d_v, B * P_v]` (P_v = prod(positions), position fastest: a member's
rows stay contiguous, so the exchange sends whole members); `x` is `[B, in_dim]`, each input's
columns position-major (`[B, *P, d]` flattened; a token input: one column of ids per position);
the output is `[B, *P_out, out_dim]` (`[B, out_dim]` for vector outputs).

Parameters are flat per base edge (`[m_e, d_v, F_e]`, F_e the edge's features: `d_u`, or
`d_u * taps` for conv, `d_u * P_u` for flatten, V for token inputs), per vertex (`[n_v, d_v]`
biases, `[n_v, 3, d_v]` for attention's q/k/v; `[n_v, d_v]` norm gains and shifts) and per output
vertex (`[n_t, out_dim, d_t]` readout rows); they hold the rows this rank owns. Built from
`(base, lift, plan)`: with no plan the module owns everything (one process, the plain lifted
network); with a `ShardPlan` (`plan.py`) and a `Communicator` (`comm.py`) the same code runs one
shard, and the readout's partial sums are summed over the lift-parallel group so every rank
returns the same output. Building the module communicates nothing: the plan was agreed on before.

Initial values are drawn block-wise from counter-based streams keyed by
`(seed, stream, base edge or vertex, block)`, so they do not depend on how the lift is sharded.
A block's edge weights are drawn for all its edges in the sampled `(dst, src)` order (only the
in-degrees are needed to know how many), then restricted to this rank's targets and put in the
plan's parameter order. Edge weights have std `1/sqrt(expected fan-in)` of the pre-activation they
feed (per attention slot; a conv edge counts `d_u * taps` inputs, a token input 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .comm import Communicator, copy_to_lift_group, reduce_from_lift_group
from .geometry import numel
from .graph import ACTIVATIONS, BaseGraph, Edge, GraphError, edge_key
from .lift import STREAM_READOUT, STREAM_WEIGHTS, Lift, block_rng
from .model_edges import EdgeLayer, EdgeMap
from .model_vertices import attention, layer_norm
from .ops import IMPLS
from .plan import ShardPlan, build_plan

READOUT_SCALES = ("sum", "mean", "sqrt")
READOUT_INITS = ("zero", "normal")


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
            f"v{self._vid[v]}": nn.Parameter(torch.zeros(plan.n_own(v), *self._bias_shape(v), dtype=dtype))
            for v in base.order if base.vertices[v].bias
        })
        self.readouts = nn.ParameterDict({
            f"v{self._vid[t]}": nn.Parameter(self._init_readout(t, dtype)) for t in base.outputs
        })
        normed = [v for v in base.order if base.vertices[v].norm == "layer"]
        self.norm_gains = nn.ParameterDict({f"v{self._vid[v]}": nn.Parameter(torch.ones(
            plan.n_own(v), *base.vertex_parameters(v)["norm_gain"], dtype=dtype)) for v in normed})
        self.norm_shifts = nn.ParameterDict({f"v{self._vid[v]}": nn.Parameter(torch.zeros(
            plan.n_own(v), *base.vertex_parameters(v)["norm_shift"], dtype=dtype)) for v in normed})
        for p in self.parameters():
            p.model_parallel = plan.world_size > 1  # sharded over the lift-parallel group

    # ------------------------------------------------------------ construction
    def _bias_shape(self, v: str) -> tuple[int, ...]:
        return self.base.vertex_parameters(v)["bias"]

    def _scale(self, e: Edge) -> float:
        """Std of the initial weights of edge e: 1/sqrt(expected fan-in of the pre-activation it
        feeds: the in-edges of its target, or of its attention slot)."""
        if self.weight_scale is not None:
            return float(self.weight_scale)
        group = [f for f in self.base.in_edges(e.dst) if f.slot == e.slot]
        fan_in = sum(self.lift.in_degree_of(f) * self.base.fan_in_features(f) for f in group)
        return 1.0 / math.sqrt(max(fan_in, 1e-12))

    def _build_edge(self, e: Edge, dtype: torch.dtype) -> EdgeLayer:
        ep = self.plan.edges[e.key]
        w = torch.from_numpy(self._init_weights(e)).to(dtype)  # [m, d_v, F], sampled order
        if ep.local_first is not None:  # the plan's order: local-source edges first
            order = np.concatenate([np.flatnonzero(ep.local_first), np.flatnonzero(~ep.local_first)])
            w.copy_(w[torch.from_numpy(order)])
            del order
        ex = None if ep.exchange is None else self.comm.halo_exchange(e.key, ep.exchange)
        return EdgeLayer(w, ep, ex, self.impl, self.plan, EdgeMap.of(self.base, e))

    def _init_weights(self, e: Edge) -> np.ndarray:
        """Initial weights of this rank's edges over `e` in the sampled order: block by block,
        all of a block's edges drawn (its in-degrees say how many), those of own targets kept."""
        lift, plan = self.lift, self.plan
        d_v, f = self.base.weight_shape(e)
        out = np.empty((plan.edges[e.key].n_edges, d_v, f), dtype=np.float32)
        at = 0
        for b in plan.target_blocks(e.dst).tolist():
            deg = lift.block_degrees(e, b)
            w = block_rng(self.seed, STREAM_WEIGHTS, str(e), b).standard_normal((int(deg.sum()), d_v, f),
                                                                                 dtype=np.float32)
            keep = plan.block_keep(e.dst, b, deg.size)
            if keep is not None:
                w = w[np.repeat(keep, deg)]
            out[at:at + w.shape[0]] = w
            at += w.shape[0]
        if at != out.shape[0]:
            raise RuntimeError(f"edge {e}: drew {at} weights for {out.shape[0]} planned edges")
        out *= self._scale(e)
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
        """`[m, d_v, F]` weights aligned with `edge_index(e)` (the parameter itself)."""
        return self.edge_layer(e).weight

    def bias(self, v: str) -> torch.Tensor | None:
        """`[n_v, d_v]` biases of fibre v (`[n_v, 3, d_v]`: q, k, v of an attention vertex; this
        rank's rows), or None if v has no bias."""
        return self.biases[f"v{self._vid[v]}"] if self.base.vertices[v].bias else None

    def norm_gain(self, v: str) -> torch.Tensor | None:
        """`[n_v, d_v]` layer-norm gains of fibre v (this rank's rows), or None without a norm."""
        return self.norm_gains[f"v{self._vid[v]}"] if self.base.vertices[v].norm == "layer" else None

    def norm_shift(self, v: str) -> torch.Tensor | None:
        """`[n_v, d_v]` layer-norm shifts of fibre v (this rank's rows), or None without a norm."""
        return self.norm_shifts[f"v{self._vid[v]}"] if self.base.vertices[v].norm == "layer" else None

    def readout_weight(self, t: str) -> torch.Tensor:
        """`[n_t, out_dim, d_t]` readout rows of output fibre t (this rank's rows)."""
        return self.readouts[f"v{self._vid[t]}"]

    def vertex_of(self, key: str) -> str:
        """Vertex name of a per-vertex parameter key `v<i>` (biases, norms, readouts)."""
        return list(self.base.vertices)[int(key[1:])]

    def own_rows(self, v: str) -> torch.Tensor:
        """Global fibre indices of the rows of fibre v held by this rank (row order of bias/readout)."""
        return torch.from_numpy(self.plan.own(v))

    def num_edges(self) -> int:
        return sum(layer.weight.shape[0] for layer in self.edges)

    # ------------------------------------------------------------ forward
    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All activations `{v: [n_v_own, d_v, B * P_v]}` for a batch `x` of shape `[B, in_dim]`
        (a token input's entry: its ids, int64 `[B * P]`)."""
        base = self.base
        if x.dim() != 2 or x.shape[1] != base.in_dim:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected [batch, {base.in_dim}] "
                             f"(inputs {base.inputs} concatenated in declaration order, each position-major)")
        # every rank uses all of x: its gradient sums the shards' parts
        x = copy_to_lift_group(x.to(self._dtype()), self.comm.lift_group)
        B = x.shape[0]
        ys: dict[str, torch.Tensor] = {}
        off = 0
        for v in base.inputs:
            d, P, width = base.dim(v), numel(base.positions(v)), base.input_width(v)
            cols = x[:, off:off + width]
            if base.vertices[v].tokens is not None:  # ids held as floats: exact below 2**24
                ys[v] = cols.detach().round().long().reshape(B * P)
            else:  # [B, P, d] -> [d, B * P], the same on every member of the fibre
                ys[v] = cols.reshape(B, P, d).permute(2, 0, 1).reshape(d, B * P).unsqueeze(0).expand(
                    self.lift.n(v), d, B * P)
            off += width
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
        """The vertex map of v on its in-edges' messages (`model_vertices.py`): `[n_v_own, d_v, B * P_v]`."""
        vx = self.base.vertices[v]
        z: dict = {}
        for e, y_src in zip(self.base.in_edges(v), srcs):
            z_e = self.edges[self._eid[e.key]](y_src)  # [n_v_own, d_v, B * P_v]
            z[e.slot] = z_e if e.slot not in z else z[e.slot] + z_e
        b = self.bias(v)
        act = ACTIVATIONS[vx.activation]
        if vx.kind == "attention":
            q, k, val = z["q"], z["k"], z["v"]
            if b is not None:
                q, k, val = q + b[:, 0, :, None], k + b[:, 1, :, None], val + b[:, 2, :, None]
            P, Pk = numel(self.base.positions(v)), numel(self.base.key_positions(v))
            return act(attention(q, k, val, P, Pk, vx.causal))
        z = z[None]
        if b is not None:
            z = z + b.unsqueeze(-1)
        if vx.norm == "layer":
            z = layer_norm(z, self.norm_gain(v), self.norm_shift(v))
        return act(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_dim] -> [B, *P_out, out_dim]
        ys = self.activations(x)
        out = None
        for t in self.base.outputs:
            part = torch.einsum("nod,ndb->bo", self.readout_weight(t), ys[t])  # [B * P_out, out_dim]
            out = part if out is None else out + part
        out = out.reshape(x.shape[0], *self.base.output_positions, self.out_dim)
        return reduce_from_lift_group(out * self.c, self.comm.lift_group)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.readouts.values())).dtype
