"""Memory of lifts whose vertices carry positions: activations kept for the backward, per term.

One function per term (bytes on one rank at lift-parallel 1, for `B` samples per micro-batch and
element size `es`), for the estimator (`python -m randlift_dist.estimate`), which predicts every
other term (weights, optimizer state, indices, halos) without positions. With positions the
activations scale with `B * P` (P = prod(positions)): a vertex's rows are `[n, d, B * P]`.

What autograd keeps between the forward and the backward, per non-input vertex v (n_v rows, d_v
features, P_v positions; `A_v = n_v * d_v * B * P_v * es`, one copy of its activations):
- `vertex_output`: y_v itself, `A_v`, when something keeps it: its activation (relu, tanh and
  sigmoid save their output), the readout (an output vertex), or an out-edge whose backward needs
  its source (linear and conv kernels, pooling; not mean, select or flatten); `gelu` keeps its
  input too (`A_v`).
- `layer_norm`: the centred and the normalised pre-activations (`2 A_v`) and `1/std` (`A_v / d_v`).
- `attention`: the per-head copies of Q, K, V (`[n B, P, d]`), the attention output and its
  log-sum-exp (`A_v * (2 + 2 Pk / P_v) + n_v B P_v * 4`), Pk the key positions.
- `edge_maps` (per edge, mapped before the exchange, kept by the edge's kernel): pooled rows
  (`n_u d_u B P_v es`, plus int64 indices of that size for max pooling), flatten (`n_u d_u B P_u
  es`), mean and select (`n_u d_u B es`); conv and linear edges keep nothing (conv saves y and w,
  and unfolds again in the backward); edges out of token ids keep the ids (`B P * 8`).
- `inputs`: an input's columns as `[d_x, B P_x]` (shared by its out-edges; a fibre of n_x > 1
  members also gets an `[n_x, d_x, B P_x]` copy per linear out-edge; token inputs: none).
- `readout`: a rearranged copy of the readout rows (`n_t out_dim d_t es`, whatever the batch).
The transient of a conv edge (`conv_transient`): the unfolded chunk and its gradient, at most
`2 * min(n_u d_u taps B P_v, WINDOW_CHUNK_ELEMS) * es` at once, never kept.
`measured_saved_bytes` counts what autograd actually saved in one forward (distinct storages, not
parameters), which is what `activation_bytes` predicts: the tests compare the two.
"""

from __future__ import annotations

import torch

from .geometry import numel
from .graph import BaseGraph
from .lift import Lift
from .ops import workspace as ws

_SAVES_INPUT = ("gelu",)  # activations whose backward needs their input
_SAVES_OUTPUT = ("relu", "tanh", "sigmoid")  # ... their output (identity: nothing)
_KEEP_SOURCE = ("linear", "conv", "pool")  # edges whose backward needs the source rows (mean, select, flatten: not)


def kept(base: BaseGraph, v: str) -> bool:
    """Whether y_v is kept for the backward: by its activation, the readout, or an out-edge."""
    vx = base.vertices[v]
    return (vx.activation in _SAVES_OUTPUT or vx.role == "output"
            or any(e.src == v and e.kind in _KEEP_SOURCE for e in base.edges))


def vertex_output(base: BaseGraph, lift: Lift, B: int, es: int) -> float:
    total = 0.0
    for v in base.order:
        vx = base.vertices[v]
        if vx.role == "input":
            continue
        a = lift.n(v) * vx.dim * B * numel(base.positions(v)) * es
        total += a * (kept(base, v) + (vx.activation in _SAVES_INPUT))
    return total


def layer_norm(base: BaseGraph, lift: Lift, B: int, es: int) -> float:
    total = 0.0
    for v in base.order:
        vx = base.vertices[v]
        if vx.norm == "layer":
            a = lift.n(v) * vx.dim * B * numel(base.positions(v)) * es
            total += 2 * a + a / vx.dim
    return total


def attention(base: BaseGraph, lift: Lift, B: int, es: int) -> float:
    total = 0.0
    for v in base.order:
        vx = base.vertices[v]
        if vx.kind == "attention":
            P, Pk = numel(base.positions(v)), numel(base.key_positions(v))
            a = lift.n(v) * vx.dim * B * P * es
            total += a * (2 + 2 * Pk / P) + lift.n(v) * B * P * 4
    return total


def edge_maps(base: BaseGraph, lift: Lift, B: int, es: int) -> float:
    total = 0.0
    for e in base.edges:
        n_u, d_u, P_u = lift.n(e.src), base.dim(e.src), numel(base.positions(e.src))
        if base.vertices[e.src].tokens is not None:
            total += B * P_u * 8
        elif e.kind == "pool":
            rows = n_u * d_u * B * numel(base.positions(e.dst))
            total += rows * es + (rows * 8 if e.pool == "max" else 0)
        elif e.kind == "flatten":
            total += n_u * d_u * B * P_u * es
        elif e.kind in ("mean", "select"):
            total += n_u * d_u * B * es
    return total


def inputs(base: BaseGraph, lift: Lift, B: int, es: int) -> float:
    """x's columns of an input as `[d, B * P]` (shared by its out-edges), and for a fibre of n > 1
    members the contiguous copy `[n, d, B * P]` each linear out-edge makes."""
    total = 0.0
    for v in base.inputs:
        vx = base.vertices[v]
        outs = [e for e in base.edges if e.src == v and e.kind in ("linear", "conv")]
        if vx.tokens is None and outs:
            one = vx.dim * B * numel(base.positions(v)) * es
            total += one + (lift.n(v) * one * sum(e.kind == "linear" for e in outs) if lift.n(v) > 1 else 0)
    return total


def readout(base: BaseGraph, lift: Lift, B: int, es: int, out_dim: int = 1) -> float:
    """The readout's einsum keeps a rearranged copy of the readout rows (not of the batch)."""
    return sum(lift.n(t) * out_dim * base.dim(t) * es for t in base.outputs)


def conv_transient(base: BaseGraph, lift: Lift, B: int, es: int, device: str = "cpu") -> float:
    """The largest unfolded chunk and its gradient (one conv edge at a time, not kept)."""
    budget = ws.WINDOW_CHUNK_ELEMS if device == "cpu" else ws.WINDOW_CHUNK_ELEMS_ACCEL
    worst = 0
    for e in base.edges:
        if e.kind == "conv":
            full = lift.n(e.src) * base.dim(e.src) * e.window.taps * B * numel(base.positions(e.dst))
            per_sample = full // B
            worst = max(worst, min(B, max(1, budget // max(per_sample, 1))) * per_sample)
    return 2.0 * worst * es


TERMS = {"vertex_output": vertex_output, "layer_norm": layer_norm, "attention": attention, "edge_maps": edge_maps,
         "inputs": inputs}


def activation_bytes(base: BaseGraph, lift: Lift, B: int, es: int = 4, out_dim: int = 1) -> dict[str, float]:
    """Bytes kept for the backward, per term, and their `total` (see the module doc)."""
    out = {k: fn(base, lift, B, es) for k, fn in TERMS.items()}
    out["readout"] = readout(base, lift, B, es, out_dim)
    out["total"] = sum(out.values())
    return out


def measured_saved_bytes(net, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in one forward of `net` on `x` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    del out
    return sum(seen.values())


def expected_params(base: BaseGraph, lift: Lift, out_dim: int) -> float:
    """Expected parameter count: edge weights `E[m_e] d_v F_e`, biases, norms and the readout."""
    total = sum(lift.expected_edges(e) * base.dim(e.dst) * base.edge_features(e) for e in base.edges)
    for v, vx in base.vertices.items():
        total += lift.n(v) * vx.dim * ((3 if vx.kind == "attention" else 1) * vx.bias + 2 * (vx.norm == "layer"))
    return total + sum(lift.n(t) * out_dim * base.dim(t) for t in base.outputs)


def gpu_estimate(base: BaseGraph, lift: Lift, out_dim: int, B: int, bytes_per_param: float = 16.0,
                 act_es: int = 2, index_bytes_per_edge: float = 48.0, context: float = 2 ** 30) -> dict[str, float]:
    """One GPU, lift-parallel 1: parameters x `bytes_per_param` (bf16 weights and gradients, fp32
    master weights and Adam moments: 16), stored indices (CSR, its transpose, the Triton kernels'
    int32 copies: ~48 B per lifted edge), activations (`act_es` bytes per value), the conv transient
    and the CUDA context. A model, not a measurement."""
    params = expected_params(base, lift, out_dim)
    edges = sum(lift.expected_edges(e) for e in base.edges)
    act = activation_bytes(base, lift, B, act_es, out_dim)
    out = {"params": params, "edges": edges, "state": params * bytes_per_param, "indices": edges * index_bytes_per_edge,
           "activations": act["total"], "transient": conv_transient(base, lift, B, act_es, "cuda"), "context": context}
    out["total"] = out["state"] + out["indices"] + out["activations"] + out["transient"] + out["context"]
    return out

