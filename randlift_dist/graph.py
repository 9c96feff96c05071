"""Base networks: the small DAG of vertices that a lift enlarges.

A `BaseGraph` is a perceptron module of the random sparse lifts paper. A vertex's space is
`R^{positions x d}` (`geometry.py`: `()` a vector, `(L,)` a signal or sequence, `(H, W)` an image);
an edge's map is `linear` (`w @ y` at every position, `w` of shape `[d_v, d_u]`), `conv`, `pool`,
`mean`, `select` or `flatten` (the last three map positions to a vector), each with one weight
`[d_v, features]` (`geometry.edge_features`). Vertex maps: `sum` (default:
`act(norm(sum_e z_e + b_v))`, `norm` none or a layer norm over the vertex's own d features at each
position) or `attention` (three named in-edge slots q, k, v: `act(softmax(Q K^T / sqrt(d)) V)` over
the positions, optionally causal). A norm or an attention over a whole fibre would couple the
members of a fibre and break the locality of lifted vertices (and the paper's class of modules),
so both act on one vertex's (one fibre member's) own features. Inputs hold floats, or token ids
(`tokens: V`: the vertex is one-hot of width `dim = V`, so a linear edge out of it is a lookup
into its `[d_v, V]` weight: an embedding).

Invariants (checked when a graph is built):
- names are unique, every edge names known vertices, there is no duplicate edge (edges are keyed by
  `(src, dst)`, or `(src, dst, slot)` into an attention vertex) and no cycle;
- input vertices have no in-edges; every other vertex has at least one (an attention vertex at
  least one per slot); at least one input and one output; dims are positive integers;
- positions are declared on inputs and derived along edges; all in-edges of a vertex agree (and
  agree with positions declared on it); all output vertices have the same positions;
- `order` lists the vertices in a topological order that keeps declaration order where it can,
  and `edges` are sorted by (position of target, position of source, slot) in that order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import graph_builders as builders
from .geometry import (NORMS, SLOTS, VERTEX_KINDS, WINDOW_KINDS, GraphError, Window, WindowSpec, edge_features,
                       edge_positions, exchanged_values, numel)
from .graph_schema import Edge, Vertex, edge_key, edge_dict, parse_edge, parse_vertex, vertex_dict

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
ROLES = ("input", "hidden", "output")
_GROUPS = {None: "", "q": "q ", "kv": "k and v "}
__all__ = ["ACTIVATIONS", "ROLES", "BaseGraph", "Edge", "GraphError", "Vertex", "Window", "edge_key"]


class BaseGraph:
    """A validated DAG of vertices with dimensions, positions, roles and maps."""

    def __init__(self, vertices: Sequence[Vertex], edges: Sequence[Edge]):
        self.vertices: dict[str, Vertex] = {}
        for v in vertices:
            if v.name in self.vertices:
                raise GraphError(f"duplicate vertex name {v.name!r}: vertex names must be unique")
            self.vertices[v.name] = v
        self._check_vertices()
        seen: set[tuple[str, ...]] = set()
        for e in edges:
            for end in (e.src, e.dst):
                if end not in self.vertices:
                    raise GraphError(f"edge {e} names unknown vertex {end!r}; known vertices: {sorted(self.vertices)}")
            if e.key in seen:
                raise GraphError(f"duplicate edge {e}: list each edge once")
            if e.src == e.dst:
                raise GraphError(f"edge {e} is a self-loop: the base network must be a DAG")
            if e.degree is not None and not (e.degree > 0):
                raise GraphError(f"edge {e} has degree {e.degree!r}: a degree must be > 0")
            seen.add(e.key)
        self.order: list[str] = self._topological_order(edges)
        pos = {n: i for i, n in enumerate(self.order)}
        self.edges: list[Edge] = sorted(edges, key=lambda e: (pos[e.dst], pos[e.src], SLOTS.index(e.slot) if e.slot else -1))
        self._check_roles()
        self._resolved: dict[tuple[str, ...], Edge] = {}
        self._kv_positions: dict[str, tuple[int, ...]] = {}  # attention vertices: positions of keys and values
        self._positions = self._derive_positions()

    # ---------------------------------------------------------------- validation
    def _check_vertices(self) -> None:
        for v in self.vertices.values():
            if not isinstance(v.dim, int) or isinstance(v.dim, bool) or v.dim <= 0:
                raise GraphError(f"vertex {v.name!r} has dim {v.dim!r}: dim must be a positive integer")
            if v.role not in ROLES:
                raise GraphError(f"vertex {v.name!r} has role {v.role!r}: choose one of {ROLES}")
            if v.activation not in ACTIVATIONS:
                raise GraphError(f"vertex {v.name!r} has unknown activation {v.activation!r}: "
                                 f"choose one of {sorted(ACTIVATIONS)}")
            if v.kind not in VERTEX_KINDS:
                raise GraphError(f"vertex {v.name!r} has kind {v.kind!r}: choose one of {VERTEX_KINDS}")
            if v.norm not in NORMS:
                raise GraphError(f"vertex {v.name!r} has norm {v.norm!r}: choose one of {NORMS}")
            if v.norm == "layer" and v.dim < 2:
                raise GraphError(f"vertex {v.name!r}: a layer norm over its {v.dim} feature is constant; give it "
                                 "dim >= 2 or norm: none")
            if v.kind == "attention" and v.norm != "none":
                raise GraphError(f"attention vertex {v.name!r} has norm {v.norm!r}: put the norm on the vertex "
                                 "its output feeds (norm: none here)")
            if v.causal and v.kind != "attention":
                raise GraphError(f"vertex {v.name!r} is causal but not an attention vertex: drop causal or set "
                                 "kind: attention")
            if v.tokens is not None and (v.role != "input" or v.tokens != v.dim):
                raise GraphError(f"vertex {v.name!r} has tokens {v.tokens!r}: only an input vertex holds token ids, "
                                 "and its dim is the number of tokens")
            if v.role == "input" and (v.kind != "sum" or v.norm != "none" or v.bias or v.activation != "identity"):
                raise GraphError(f"input vertex {v.name!r} has a vertex map (kind, norm, bias or activation): "
                                 "inputs hold x as it is; put the map on a hidden vertex")

    def _topological_order(self, edges: Sequence[Edge]) -> list[str]:
        names = list(self.vertices)
        indeg = {n: 0 for n in names}
        succ: dict[str, list[str]] = {n: [] for n in names}
        for e in edges:
            indeg[e.dst] += 1
            succ[e.src].append(e.dst)
        order: list[str] = []
        ready = [n for n in names if indeg[n] == 0]
        decl = {n: i for i, n in enumerate(names)}
        while ready:
            ready.sort(key=decl.__getitem__)
            n = ready.pop(0)
            order.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
        if len(order) < len(names):
            cycle = self._find_cycle({n for n in names if indeg[n] > 0}, succ)
            raise GraphError("the base network has a cycle " + " -> ".join(cycle) + ": remove one of its edges")
        return order

    @staticmethod
    def _find_cycle(nodes: set[str], succ: dict[str, list[str]]) -> list[str]:
        """A cycle among `nodes`, the vertices Kahn's algorithm could not order: each has an in-edge
        from another of them, so walk backwards until a vertex repeats, then read the loop forwards."""
        pred: dict[str, list[str]] = {n: [] for n in nodes}
        for u in sorted(nodes):
            for m in succ[u]:
                if m in nodes:
                    pred[m].append(u)
        start = min(nodes)
        path, seen = [start], {start: 0}
        while True:
            prv = pred[path[-1]][0]
            if prv in seen:
                loop = path[seen[prv]:][::-1]  # forwards: prv -> ... -> path[-1] -> prv
                i = loop.index(min(loop))  # start at the smallest name: a stable message
                loop = loop[i:] + loop[:i]
                return loop + [loop[0]]
            seen[prv] = len(path)
            path.append(prv)

    def _check_roles(self) -> None:
        for v in self.vertices.values():
            n_in = len(self.in_edges(v.name))
            if v.role == "input" and n_in:
                raise GraphError(f"input vertex {v.name!r} has in-edges {[str(e) for e in self.in_edges(v.name)]}: "
                                 "inputs take no edges; make it a hidden vertex or drop those edges")
            if v.role != "input" and not n_in:
                raise GraphError(f"vertex {v.name!r} has no in-edges: give it an in-edge or declare role: input")
        if not self.inputs:
            raise GraphError("the base network has no input vertex: declare one with role: input")
        if not self.outputs:
            raise GraphError("the base network has no output vertex: declare one with role: output")

    def _derive_positions(self) -> dict[str, tuple[int, ...]]:
        """Positions of every vertex, along the edges in topological order; checks edge kinds and slots."""
        out: dict[str, tuple[int, ...]] = {}
        for name in self.order:
            v = self.vertices[name]
            if v.role == "input":
                out[name] = v.positions or ()
                continue
            got: dict[str | None, dict[tuple[int, ...], str]] = {}  # per group of slots: positions -> an edge
            for e in self.in_edges(name):
                e = self._resolve(e, out[e.src])
                self._check_edge(e, v)
                group = "kv" if e.slot in ("k", "v") else e.slot  # keys and values share their positions
                got.setdefault(group, {}).setdefault(
                    edge_positions(e.kind, e.window, e.index, out[e.src], f"edge {e}"), str(e))
            for group, ps in got.items():
                if len(ps) > 1:
                    raise GraphError(f"vertex {name!r}: its {_GROUPS[group]}in-edges give "
                                     "different positions " + ", ".join(f"{p or '()'} ({e})" for p, e in ps.items())
                                     + ": make them agree (kernel, stride, padding, or a mean/select/flatten edge)")
            if v.kind == "attention":
                missing = [s for s in SLOTS if not any(e.slot == s for e in self.in_edges(name))]
                if missing:
                    raise GraphError(f"attention vertex {name!r} has no in-edge for slot(s) {missing}: give it edges "
                                     "{src: u, dst: " + name + ", slot: q} (and k, v)")
                (p,), (kv,) = got["q"], got["kv"]
                if not p or not kv:
                    raise GraphError(f"attention vertex {name!r} has no positions: attention runs over positions "
                                     "(tokens); feed it from vertices with positions")
                if v.causal and numel(p) != numel(kv):
                    raise GraphError(f"causal attention vertex {name!r} has {numel(p)} query and {numel(kv)} key "
                                     "positions: a causal mask needs as many of each (or set causal: false)")
                self._kv_positions[name] = kv
            else:
                (p,) = got[None]
            if v.positions is not None and v.positions != p:
                raise GraphError(f"vertex {name!r} declares positions {v.positions or '()'} but its in-edges give "
                                 f"{p or '()'}: fix the declaration or the edges")
            out[name] = p
        self.edges = [self._resolved.get(e.key, e) for e in self.edges]
        outs = {out[t] for t in self.outputs}
        if len(outs) > 1:
            raise GraphError(f"output vertices have different positions {sorted(outs)}: the readout needs one shape; "
                             "end them with the same edges (e.g. a mean or flatten edge to vectors)")
        return out

    def _resolve(self, e: Edge, src_pos: tuple[int, ...]) -> Edge:
        """`e` with its window resolved against its source's positions (kept in `_resolved`)."""
        if isinstance(e.window, WindowSpec):
            e = dataclasses.replace(e, window=e.window.resolve(f"edge {e}", len(src_pos)))
            self._resolved[e.key] = e
        if e.kind == "pool" and e.pool == "avg" and any(d != 1 for d in e.window.dilation):
            raise GraphError(f"edge {e}: average pooling takes no dilation; drop it or use pool: max")
        if e.kind in WINDOW_KINDS and not isinstance(e.window, Window):
            raise GraphError(f"edge {e} ({e.kind}) needs a window: e.g. kernel: 3")
        return e

    def _check_edge(self, e: Edge, dst: Vertex) -> None:
        src = self.vertices[e.src]
        if dst.kind == "attention" and e.slot is None:
            raise GraphError(f"edge {e} goes into attention vertex {dst.name!r} without a slot: "
                             "give it slot: q, k or v")
        if dst.kind != "attention" and e.slot is not None:
            raise GraphError(f"edge {e} has slot {e.slot!r} but {dst.name!r} is not an attention vertex: "
                             "drop the slot or set kind: attention on it")
        if src.tokens is not None and e.kind != "linear":
            raise GraphError(f"edge {e} out of token input {src.name!r} is {e.kind}: edges out of token ids "
                             "are linear (embeddings); add a hidden vertex before the " + e.kind)

    # ---------------------------------------------------------------- queries
    @property
    def inputs(self) -> list[str]:
        """Input vertices in declaration order (the order of the column blocks of `x`)."""
        return [n for n, v in self.vertices.items() if v.role == "input"]

    @property
    def outputs(self) -> list[str]:
        return [n for n, v in self.vertices.items() if v.role == "output"]

    def positions(self, name: str) -> tuple[int, ...]:
        """The positions of vertex `name` (`()` for a vector)."""
        return self._positions[name]

    def key_positions(self, name: str) -> tuple[int, ...]:
        """Positions of the keys and values of attention vertex `name` (its own are the queries')."""
        return self._kv_positions[name]

    def input_width(self, name: str) -> int:
        """Columns of `x` for input `name`: `prod(positions) * dim`, position-major (`[*P, d]`);
        one column per position (the token id) for a token input."""
        v = self.vertices[name]
        return numel(self.positions(name)) * (1 if v.tokens is not None else v.dim)

    @property
    def in_dim(self) -> int:
        return sum(self.input_width(n) for n in self.inputs)

    @property
    def output_positions(self) -> tuple[int, ...]:
        """Positions of the output vertices (the network returns `[B, *positions, out_dim]`)."""
        return self.positions(self.outputs[0])

    def edge_features(self, e: Edge | tuple[str, ...] | str) -> int:
        """Input features of one lifted edge over `e` per target position (its weight is `[d_v, this]`)."""
        e = self.edge(e)
        return edge_features(e.kind, e.window, self.positions(e.src), self.dim(e.src))

    def weight_shape(self, e: Edge | tuple[str, ...] | str) -> tuple[int, int]:
        """Shape of one lifted edge's weight over `e`: `(d_v, edge_features(e))` (the model's
        parameter over `e` is `[m_e, *this]`; the estimator counts the same)."""
        e = self.edge(e)
        return self.dim(e.dst), self.edge_features(e)

    def vertex_parameters(self, name: str) -> dict[str, tuple[int, ...]]:
        """Per-member parameter shapes of vertex `name` (the model's are `[n_v, *shape]`): `bias`
        (`(d,)`, or `(3, d)` for an attention vertex's q, k, v biases), `norm_gain` and
        `norm_shift` (`(d,)`, a layer norm). Positions add none: one value per feature."""
        v, d = self.vertices[name], self.dim(name)
        out: dict[str, tuple[int, ...]] = {}
        if v.bias:
            out["bias"] = (3, d) if v.kind == "attention" else (d,)
        if v.norm == "layer":
            out["norm_gain"] = out["norm_shift"] = (d,)
        return out

    def exchange_values(self, e: Edge | tuple[str, ...] | str) -> int:
        """Values per sample of one source member's rows as `e` exchanges them (a halo row:
        `geometry.exchanged_values`)."""
        e = self.edge(e)
        return exchanged_values(e.kind, self.positions(e.src), self.positions(e.dst), self.dim(e.src))

    def fan_in_features(self, e: Edge) -> int:
        """Non-zero input features of one lifted edge (a token input is one-hot: 1)."""
        return 1 if self.vertices[e.src].tokens is not None else self.edge_features(e)

    def readout_dim(self, out_dim: int | None = None) -> int:
        """The readout width: `out_dim`, or the output vertices' dimension when they agree."""
        if out_dim is None:
            dims = sorted({self.dim(t) for t in self.outputs})
            if len(dims) > 1:
                raise GraphError(f"output vertices have dims {dims}: pass out_dim explicitly (model.out_dim in a config)")
            return dims[0]
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim <= 0:
            raise GraphError(f"out_dim {out_dim!r}: must be a positive integer")
        return out_dim

    def in_edges(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == name]

    def edge(self, key: tuple[str, ...] | str | Edge) -> Edge:
        key = edge_key(key)
        for e in self.edges:
            if e.key == key:
                return e
        raise GraphError(f"no edge {'->'.join(key[:2])}{':' + key[2] if len(key) > 2 else ''} in the base network; "
                         f"edges: {[str(e) for e in self.edges]}")

    def edge_id(self, key: tuple[str, ...] | str | Edge) -> int:
        return self.edges.index(self.edge(key))

    def dim(self, name: str) -> int:
        return self.vertices[name].dim

    def to_dict(self) -> dict[str, Any]:
        """The mapping form; keys at their defaults are left out (so plain graphs keep their old form)."""
        return {"vertices": [vertex_dict(v) for v in self.vertices.values()], "edges": [edge_dict(e) for e in self.edges]}

    def __repr__(self) -> str:
        return f"BaseGraph({len(self.vertices)} vertices, edges {[str(e) for e in self.edges]})"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "BaseGraph":
        """Build from a mapping `{vertices: [...], edges: [...]}` (the YAML form of the README), or
        from a builder form `{builder: mlp | residual_mlp | cnn1d | cnn2d | transformer, ...}`."""
        if not isinstance(spec, Mapping):
            raise GraphError(f"a base network must be a mapping with 'vertices' and 'edges', got {type(spec).__name__}")
        if "builder" in spec:
            kw = dict(spec)
            return cls.from_dict(builders.build(kw.pop("builder"), kw))
        unknown = set(spec) - {"vertices", "edges"}
        if unknown:
            raise GraphError(f"unknown keys {sorted(unknown)} in base network: expected 'vertices' and 'edges'")
        for key in ("vertices", "edges"):
            if key not in spec or not isinstance(spec[key], Sequence) or isinstance(spec[key], str):
                raise GraphError(f"base network needs a list under {key!r}")
        vertices = [parse_vertex(i, v) for i, v in enumerate(spec["vertices"])]
        edges = [parse_edge(i, e) for i, e in enumerate(spec["edges"])]
        return cls(vertices, edges)

    @classmethod
    def from_yaml(cls, path: str) -> "BaseGraph":
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    @classmethod
    def mlp(cls, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "relu",
            bias: bool = False) -> "BaseGraph":
        """A chain x -> h1 -> ... -> hL -> y, one vertex per layer."""
        return cls.from_dict(builders.mlp(in_dim, hidden_dims, out_dim, activation, bias))

    @classmethod
    def residual_mlp(cls, in_dim: int, width: int, depth: int, out_dim: int, activation: str = "relu",
                     bias: bool = False) -> "BaseGraph":
        """x -> h1 -> ... -> h_depth -> y with skip edges h_i -> h_{i+2} (and x -> h2)."""
        return cls.from_dict(builders.residual_mlp(in_dim, width, depth, out_dim, activation, bias))

    @classmethod
    def cnn1d(cls, length: int, channels: int, dims: Sequence[int], out_dim: int, **kw) -> "BaseGraph":
        """A 1-d CNN on `[length, channels]` signals (see `graph_builders.cnn`)."""
        return cls.from_dict(builders.cnn([length], channels, dims, out_dim, **kw))

    @classmethod
    def cnn2d(cls, shape: Sequence[int], channels: int, dims: Sequence[int], out_dim: int, **kw) -> "BaseGraph":
        """A 2-d CNN on `[H, W, channels]` images (see `graph_builders.cnn`)."""
        return cls.from_dict(builders.cnn(list(shape), channels, dims, out_dim, **kw))

    @classmethod
    def transformer(cls, seq_len: int, width: int, head_dim: int, out_dim: int, **kw) -> "BaseGraph":
        """Transformer-like blocks (attention, MLP, residual edges, layer norms; `graph_builders.transformer`)."""
        return cls.from_dict(builders.transformer(seq_len, width, head_dim, out_dim, **kw))


