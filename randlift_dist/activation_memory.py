"""What a lifted network's forward keeps for the backward, per position: the one model of saved
tensors, used by the estimator (`python -m randlift_dist.estimate`, per rank, with the rank's rows)
and checked here, for the whole lift on one process, against what autograd really saves.

Every function returns the sizes (bytes) of the tensors themselves, one entry per tensor, for `n`
rows of a fibre on one rank, `B` samples and element size `es`. With positions the activations
scale with `B * P` (P = prod(positions)): a vertex's rows are `[n, d, B * P]`.

Per non-input vertex v (n_v rows, d_v features, P_v positions; `A_v = n_v * d_v * B * P_v * es`,
one copy of its activations), `vertex_saved`:
- `vertex_output`: y_v itself, `A_v`, when something keeps it: its activation (relu, tanh and
  sigmoid save their output) or an out-edge whose backward needs its source (linear and conv
  kernels, pooling; not mean, select or flatten); `gelu` keeps its input too (`A_v`); the
  readout's einsum keeps its own rearranged copy of an output vertex's y (`A_v`).
- `layer_norm`: the centred and the normalised pre-activations (`A_v` each) and `1/std` (`A_v / d_v`).
- `attention`: the per-head copies of Q, K, V (`[n, B, P, d]`: `A_v`, and `A_v Pk / P_v` for K
  and V, Pk the key positions), the attention output (`A_v`) and its fp32 log-sum-exp (`n_v B P_v 4`).
- `readout`: a rearranged copy of the readout rows (`n_t out_dim d_t es`, whatever the batch).
Per edge (`edge_saved`; mapped before the exchange, kept by the edge's kernel): pooled rows
(`n_u d_u B P_v es`, plus int64 indices of that size for max pooling), flatten (`n_u d_u B P_u
es`), mean and select (`n_u d_u B es`); conv and linear edges keep nothing of their own (conv
saves y and w and unfolds again in the backward); edges out of token ids keep the ids (`B P 8`).
Per input (`input_saved`): its columns as `[d_x, B P_x]` (shared by its out-edges; a fibre of
n_x > 1 members also gets an `[n_x, d_x, B P_x]` copy per linear out-edge; token inputs: none).

`activation_bytes(base, lift, B)` sums them per term over the whole lift; `measured_saved_bytes`
counts what autograd actually saved in one forward (distinct storages, not parameters): the tests
compare the two. The transients (unfolded conv chunks, the backward's gradients) are the
estimator's (`estimate/phases.py`): they are never saved.
"""

from __future__ import annotations

import torch

from .geometry import numel
from .graph import BaseGraph
from .lift import Lift

SAVES_INPUT = frozenset({"gelu"})  # activations whose backward needs their input
SAVES_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})  # ... their output (identity: nothing)
KEEP_SOURCE = ("linear", "conv", "pool")  # edges whose backward needs the source rows (mean, select, flatten: not)
LSE_BYTES = 4  # attention's log-sum-exp is float32 whatever the dtype
TERMS = ("vertex_output", "layer_norm", "attention", "edge_maps", "inputs", "readout")


def kept(base: BaseGraph, v: str) -> bool:
    """Whether y_v itself is kept for the backward: by its activation or an out-edge (the readout
    keeps a copy of its own)."""
    vx = base.vertices[v]
    return vx.activation in SAVES_OUTPUT or any(e.src == v and e.kind in KEEP_SOURCE for e in base.edges)


def vertex_values(base: BaseGraph, v: str, n: int, B: int) -> float:
    """Values of one activation of vertex v: `[n, d_v, B * P_v]`."""
    return float(n * base.dim(v) * B * numel(base.positions(v)))


def vertex_saved(base: BaseGraph, v: str, n: int, B: int, es: int, out_dim: int = 1) -> dict[str, list[float]]:
    """`{term: [bytes of each tensor]}` the forward of non-input vertex v keeps (see the module doc)."""
    vx = base.vertices[v]
    a = vertex_values(base, v, n, B) * es
    copies = int(kept(base, v)) + int(vx.activation in SAVES_INPUT) + int(vx.role == "output")
    out = {"vertex_output": [a] * copies}
    if vx.norm == "layer":
        out["layer_norm"] = [a, a, a / vx.dim]
    if vx.kind == "attention":
        kv = a * numel(base.key_positions(v)) / numel(base.positions(v))
        out["attention"] = [a, kv, kv, a, float(n * B * numel(base.positions(v)) * LSE_BYTES)]
    if vx.role == "output":
        out["readout"] = [float(n * out_dim * vx.dim * es)]
    return out


def edge_saved(base: BaseGraph, e, n_u: int, B: int, es: int) -> list[float]:
    """Tensors the map of edge e keeps for its kernel's backward, for n_u source rows (module doc)."""
    d_u, P_u = base.dim(e.src), numel(base.positions(e.src))
    if base.vertices[e.src].tokens is not None:
        return [float(B * P_u * 8)]
    if e.kind == "pool":
        rows = float(n_u * d_u * B * numel(base.positions(e.dst)))
        return [rows * es] + ([rows * 8] if e.pool == "max" else [])
    if e.kind == "flatten":
        return [float(n_u * d_u * B * P_u * es)]
    if e.kind in ("mean", "select"):
        return [float(n_u * d_u * B * es)]
    return []


def input_saved(base: BaseGraph, v: str, n: int, B: int, es: int) -> list[float]:
    """x's columns of input v as `[d, B * P]` (shared by its out-edges), and for a fibre of n > 1
    members the contiguous copy `[n, d, B * P]` each linear out-edge makes."""
    vx = base.vertices[v]
    outs = [e for e in base.edges if e.src == v and e.kind in ("linear", "conv")]
    if vx.tokens is not None or not outs:
        return []
    one = float(vx.dim * B * numel(base.positions(v)) * es)
    copies = sum(e.kind == "linear" for e in outs) if n > 1 else 0
    return [one] + [n * one] * copies


def activation_bytes(base: BaseGraph, lift: Lift, B: int, es: int = 4, out_dim: int = 1) -> dict[str, float]:
    """Bytes kept for the backward by the whole lift on one process, per term, and their `total`."""
    out = dict.fromkeys(TERMS, 0.0)
    for v in base.order:
        if base.vertices[v].role == "input":
            out["inputs"] += sum(input_saved(base, v, lift.n(v), B, es))
            continue
        for term, sizes in vertex_saved(base, v, lift.n(v), B, es, out_dim).items():
            out[term] += sum(sizes)
    for e in base.edges:
        out["edge_maps"] += sum(edge_saved(base, e, lift.n(e.src), B, es))
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
