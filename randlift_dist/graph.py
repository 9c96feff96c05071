"""Base networks: the small DAG of vector-valued vertices that a lift enlarges.

A `BaseGraph` is the perceptron module of the random sparse lifts paper with the defaults
used throughout the project: activation space `Y_v = R^{d_v}`, linear edge maps
`M_e(w, y) = w @ y` with `w` of shape `[d_v, d_u]`, and additive vertex maps
`y_v = act(sum_e z_e + b_v)`.

Invariants (checked by `validate`, which every constructor calls):
- names are unique, every edge names known vertices, there is no duplicate edge and no cycle;
- input vertices have no in-edges; every other vertex has at least one;
- at least one input and one output; dimensions are positive integers;
- `order` lists the vertices in a topological order that keeps declaration order where it can,
  and `edges` are sorted by (position of target, position of source) in that order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
ROLES = ("input", "hidden", "output")


class GraphError(ValueError):
    """A base network description is invalid; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Vertex:
    name: str
    dim: int
    role: str = "hidden"
    activation: str = "identity"
    bias: bool = False


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    degree: float | None = None  # per-edge average degree; overrides the lift's degree

    @property
    def key(self) -> tuple[str, str]:
        return (self.src, self.dst)

    def __str__(self) -> str:
        return f"{self.src}->{self.dst}"


class BaseGraph:
    """A validated DAG of vertices with dimensions, roles and activations."""

    def __init__(self, vertices: Sequence[Vertex], edges: Sequence[Edge]):
        self.vertices: dict[str, Vertex] = {}
        for v in vertices:
            if v.name in self.vertices:
                raise GraphError(f"duplicate vertex name {v.name!r}: vertex names must be unique")
            self.vertices[v.name] = v
        self._check_vertices()
        seen: set[tuple[str, str]] = set()
        for e in edges:
            for end in (e.src, e.dst):
                if end not in self.vertices:
                    raise GraphError(
                        f"edge {e} names unknown vertex {end!r}; known vertices: "
                        f"{sorted(self.vertices)}"
                    )
            if e.key in seen:
                raise GraphError(f"duplicate edge {e}: list each edge once")
            if e.src == e.dst:
                raise GraphError(f"edge {e} is a self-loop: the base network must be a DAG")
            if e.degree is not None and not (e.degree > 0):
                raise GraphError(f"edge {e} has degree {e.degree!r}: a degree must be > 0")
            seen.add(e.key)
        self.order: list[str] = self._topological_order(edges)
        pos = {n: i for i, n in enumerate(self.order)}
        self.edges: list[Edge] = sorted(edges, key=lambda e: (pos[e.dst], pos[e.src]))
        self._check_roles()

    # ---------------------------------------------------------------- validation
    def _check_vertices(self) -> None:
        for v in self.vertices.values():
            if not isinstance(v.dim, int) or isinstance(v.dim, bool) or v.dim <= 0:
                raise GraphError(f"vertex {v.name!r} has dim {v.dim!r}: dim must be a positive integer")
            if v.role not in ROLES:
                raise GraphError(f"vertex {v.name!r} has role {v.role!r}: choose one of {ROLES}")
            if v.activation not in ACTIVATIONS:
                raise GraphError(
                    f"vertex {v.name!r} has unknown activation {v.activation!r}: "
                    f"choose one of {sorted(ACTIVATIONS)}"
                )

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
            raise GraphError(
                "the base network has a cycle " + " -> ".join(cycle) + ": remove one of its edges"
            )
        return order

    @staticmethod
    def _find_cycle(nodes: set[str], succ: dict[str, list[str]]) -> list[str]:
        """A cycle among `nodes`, the vertices Kahn's algorithm could not order.

        Each of them has an in-edge from another of them (else it would have been ordered), but
        not necessarily an out-edge (a vertex downstream of a cycle), so walk backwards along
        in-edges until a vertex repeats, then read the loop forwards.
        """
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
                raise GraphError(
                    f"input vertex {v.name!r} has in-edges {[str(e) for e in self.in_edges(v.name)]}: "
                    "inputs take no edges; make it a hidden vertex or drop those edges"
                )
            if v.role != "input" and not n_in:
                raise GraphError(
                    f"vertex {v.name!r} has no in-edges: give it an in-edge or declare role: input"
                )
        if not self.inputs:
            raise GraphError("the base network has no input vertex: declare one with role: input")
        if not self.outputs:
            raise GraphError("the base network has no output vertex: declare one with role: output")

    # ---------------------------------------------------------------- queries
    @property
    def inputs(self) -> list[str]:
        """Input vertices in declaration order (the order of the columns of `x`)."""
        return [n for n, v in self.vertices.items() if v.role == "input"]

    @property
    def outputs(self) -> list[str]:
        return [n for n, v in self.vertices.items() if v.role == "output"]

    @property
    def in_dim(self) -> int:
        return sum(self.vertices[n].dim for n in self.inputs)

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

    def edge(self, key: tuple[str, str] | str | Edge) -> Edge:
        key = edge_key(key)
        for e in self.edges:
            if e.key == key:
                return e
        raise GraphError(f"no edge {key[0]}->{key[1]} in the base network; edges: {[str(e) for e in self.edges]}")

    def edge_id(self, key: tuple[str, str] | str | Edge) -> int:
        return self.edges.index(self.edge(key))

    def dim(self, name: str) -> int:
        return self.vertices[name].dim

    def to_dict(self) -> dict[str, Any]:
        vs = []
        for v in self.vertices.values():
            d: dict[str, Any] = {"name": v.name, "dim": v.dim, "role": v.role}
            if v.activation != "identity":
                d["activation"] = v.activation
            if v.bias:
                d["bias"] = True
            vs.append(d)
        es: list[Any] = [
            [e.src, e.dst] if e.degree is None else {"src": e.src, "dst": e.dst, "degree": e.degree}
            for e in self.edges
        ]
        return {"vertices": vs, "edges": es}

    def __repr__(self) -> str:
        return f"BaseGraph({len(self.vertices)} vertices, edges {[str(e) for e in self.edges]})"

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "BaseGraph":
        """Build from a mapping `{vertices: [...], edges: [...]}` (the YAML form of the README).

        A builder form is accepted too: `{builder: mlp, in_dim: 3, hidden_dims: [8, 8], out_dim: 1,
        activation: tanh}` or `{builder: residual_mlp, ...}`.
        """
        if not isinstance(spec, Mapping):
            raise GraphError(f"a base network must be a mapping with 'vertices' and 'edges', got {type(spec).__name__}")
        if "builder" in spec:
            kw = dict(spec)
            name = kw.pop("builder")
            builders = {"mlp": cls.mlp, "residual_mlp": cls.residual_mlp}
            if name not in builders:
                raise GraphError(f"unknown builder {name!r}: choose one of {sorted(builders)}")
            try:
                return builders[name](**kw)
            except TypeError as err:
                raise GraphError(f"builder {name!r}: {err}") from None
        unknown = set(spec) - {"vertices", "edges"}
        if unknown:
            raise GraphError(f"unknown keys {sorted(unknown)} in base network: expected 'vertices' and 'edges'")
        for key in ("vertices", "edges"):
            if key not in spec or not isinstance(spec[key], Sequence) or isinstance(spec[key], str):
                raise GraphError(f"base network needs a list under {key!r}")
        vertices = [_parse_vertex(i, v) for i, v in enumerate(spec["vertices"])]
        edges = [_parse_edge(i, e) for i, e in enumerate(spec["edges"])]
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
        dims = list(hidden_dims)
        vs = [Vertex("x", in_dim, "input")]
        vs += [Vertex(f"h{i + 1}", d, "hidden", activation, bias) for i, d in enumerate(dims)]
        vs.append(Vertex("y", out_dim, "output"))
        names = [v.name for v in vs]
        return cls(vs, [Edge(a, b) for a, b in zip(names, names[1:])])

    @classmethod
    def residual_mlp(cls, in_dim: int, width: int, depth: int, out_dim: int,
                     activation: str = "relu", bias: bool = False) -> "BaseGraph":
        """x -> h1 -> ... -> h_depth -> y with skip edges h_i -> h_{i+2} (and x -> h2)."""
        if not isinstance(depth, int) or depth < 1:
            raise GraphError(f"residual_mlp depth {depth!r}: must be an integer >= 1")
        vs = [Vertex("x", in_dim, "input")]
        vs += [Vertex(f"h{i + 1}", width, "hidden", activation, bias) for i in range(depth)]
        vs.append(Vertex("y", out_dim, "output"))
        names = [v.name for v in vs]
        edges = [Edge(a, b) for a, b in zip(names, names[1:])]
        edges += [Edge(names[i], names[i + 2]) for i in range(0, len(names) - 2)]
        return cls(vs, edges)


def edge_key(key: tuple[str, str] | str | Edge) -> tuple[str, str]:
    """Normalise an edge reference: an `Edge`, a pair `(u, v)` or the string `"u->v"`."""
    if isinstance(key, Edge):
        return key.key
    if isinstance(key, str):
        if "->" not in key:
            raise GraphError(f"edge reference {key!r}: write it as 'u->v' or as a pair (u, v)")
        u, v = key.split("->", 1)
        return (u.strip(), v.strip())
    if isinstance(key, Sequence) and len(key) == 2:
        return (str(key[0]), str(key[1]))
    raise GraphError(f"edge reference {key!r}: write it as 'u->v' or as a pair (u, v)")


def _parse_vertex(i: int, v: Any) -> Vertex:
    if not isinstance(v, Mapping):
        raise GraphError(f"vertices[{i}] = {v!r}: each vertex is a mapping like {{name: h, dim: 8}}")
    unknown = set(v) - {"name", "dim", "role", "activation", "bias"}
    if unknown:
        raise GraphError(f"vertices[{i}] has unknown keys {sorted(unknown)}: allowed are name, dim, role, activation, bias")
    if "name" not in v or "dim" not in v:
        raise GraphError(f"vertices[{i}] = {dict(v)!r} needs both 'name' and 'dim'")
    bias = v.get("bias", False)
    if not isinstance(bias, bool):
        raise GraphError(f"vertex {v['name']!r} has bias {bias!r}: use true or false")
    return Vertex(str(v["name"]), v["dim"], v.get("role", "hidden"), v.get("activation", "identity"), bias)


def _parse_edge(i: int, e: Any) -> Edge:
    if isinstance(e, Mapping):
        unknown = set(e) - {"src", "dst", "degree"}
        if unknown or "src" not in e or "dst" not in e:
            raise GraphError(f"edges[{i}] = {dict(e)!r}: an edge mapping has keys src, dst and optional degree")
        return Edge(str(e["src"]), str(e["dst"]), _degree(i, e.get("degree")))
    if isinstance(e, str):
        u, v = edge_key(e)
        return Edge(u, v)
    if isinstance(e, Sequence) and len(e) in (2, 3):
        deg = None
        if len(e) == 3:
            if not isinstance(e[2], Mapping) or set(e[2]) - {"degree"}:
                raise GraphError(f"edges[{i}] = {list(e)!r}: the third item must be {{degree: k}}")
            deg = _degree(i, e[2].get("degree"))
        return Edge(str(e[0]), str(e[1]), deg)
    raise GraphError(f"edges[{i}] = {e!r}: write an edge as [u, v], 'u->v' or {{src: u, dst: v, degree: k}}")


def _degree(i: int, d: Any) -> float | None:
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0:
        raise GraphError(f"edges[{i}] has degree {d!r}: a degree must be a number > 0")
    return d
