"""The vertices and edges of a base network, and their mapping (YAML) form.

`Vertex` and `Edge` are plain frozen records; `parse_vertex` / `parse_edge` read one item of the
mapping form (`{vertices: [...], edges: [...]}`) with one-line errors naming the item and the fix,
and `vertex_dict` / `edge_dict` write it back, leaving out keys at their defaults (so a plain
graph's form, and the fingerprint of its lifts, do not change as fields are added). Conv and pool
windows are kept as written (`WindowSpec`) until `BaseGraph` resolves them against the source's
positions. Shape rules: `geometry.py`; validation of a whole graph: `graph.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .geometry import EDGE_KINDS, POOLS, SLOTS, WINDOW_KINDS, GraphError, Window, WindowSpec, positions_of


@dataclasses.dataclass(frozen=True)
class Vertex:
    name: str
    dim: int
    role: str = "hidden"
    activation: str = "identity"
    bias: bool = False
    positions: tuple[int, ...] | None = None  # declared (inputs: their positions; others: checked)
    kind: str = "sum"  # vertex map: sum or attention
    norm: str = "none"  # none or layer (over this vertex's d features, per position)
    causal: bool = False  # attention: each position attends to itself and earlier ones only
    tokens: int | None = None  # input of token ids in [0, tokens) (dim = tokens: one-hot)


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    degree: float | None = None  # per-edge average degree; overrides the lift's degree
    kind: str = "linear"
    window: Window | WindowSpec | None = None  # conv and pool edges (a spec is resolved by BaseGraph)
    pool: str | None = None  # pool edges: max or avg
    index: tuple[int, ...] | None = None  # select edges: the position taken
    slot: str | None = None  # edges into an attention vertex: q, k or v

    @property
    def key(self) -> tuple[str, ...]:
        return (self.src, self.dst) if self.slot is None else (self.src, self.dst, self.slot)

    def __str__(self) -> str:
        return f"{self.src}->{self.dst}" + (f":{self.slot}" if self.slot else "")


def edge_key(key: tuple[str, ...] | str | Edge) -> tuple[str, ...]:
    """Normalise an edge reference: an `Edge`, a pair `(u, v)`, a triple `(u, v, slot)`, or the
    string `"u->v"` / `"u->v:slot"`."""
    if isinstance(key, Edge):
        return key.key
    if isinstance(key, str):
        if "->" not in key:
            raise GraphError(f"edge reference {key!r}: write it as 'u->v' (or 'u->v:q') or as a pair (u, v)")
        u, v = (s.strip() for s in key.split("->", 1))
        head, _, slot = v.rpartition(":")
        return (u, head.strip(), slot.strip()) if head and slot.strip() in SLOTS else (u, v)
    if isinstance(key, Sequence) and len(key) in (2, 3):
        return tuple(str(k) for k in key)
    raise GraphError(f"edge reference {key!r}: write it as 'u->v' or as a pair (u, v)")


def vertex_dict(v: Vertex) -> dict[str, Any]:
    """The mapping form of a vertex, without keys at their defaults."""
    d: dict[str, Any] = {"name": v.name, "dim": v.dim, "role": v.role}
    for key, default in (("activation", "identity"), ("bias", False), ("kind", "sum"), ("norm", "none"),
                         ("causal", False), ("tokens", None)):
        if getattr(v, key) != default:
            d[key] = getattr(v, key)
    if v.positions is not None:
        d["positions"] = list(v.positions)
    return d


def edge_dict(e: Edge) -> Any:
    """`[src, dst]`, or a mapping with the keys not at their defaults."""
    extra: dict[str, Any] = {}
    if e.kind != "linear":
        extra["kind"] = e.kind
    if isinstance(e.window, Window):
        extra.update(e.window.to_dict())
    elif isinstance(e.window, WindowSpec):
        extra.update({k: list(v) if isinstance(v, tuple) else v for k in ("kernel", "stride", "padding", "dilation")
                      if (v := getattr(e.window, k)) is not None})
    for key in ("pool", "slot", "degree"):
        if getattr(e, key) is not None:
            extra[key] = getattr(e, key)
    if e.index is not None:
        extra["index"] = list(e.index)
    return [e.src, e.dst] if not extra else {"src": e.src, "dst": e.dst, **extra}


_VERTEX_KEYS = ("name", "dim", "role", "activation", "bias", "positions", "kind", "norm", "causal", "tokens")
_EDGE_KEYS = ("src", "dst", "degree", "kind", "kernel", "stride", "padding", "dilation", "pool", "index", "slot")


def parse_vertex(i: int, v: Any) -> Vertex:
    if not isinstance(v, Mapping):
        raise GraphError(f"vertices[{i}] = {v!r}: each vertex is a mapping like {{name: h, dim: 8}}")
    unknown = set(v) - set(_VERTEX_KEYS)
    if unknown:
        raise GraphError(f"vertices[{i}] has unknown keys {sorted(unknown)}: allowed are {', '.join(_VERTEX_KEYS)}")
    tokens = v.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise GraphError(f"vertices[{i}] has tokens {tokens!r}: the number of token ids, a positive integer")
    if "name" not in v or ("dim" not in v and tokens is None):
        raise GraphError(f"vertices[{i}] = {dict(v)!r} needs both 'name' and 'dim'")
    name = str(v["name"])
    for key in ("bias", "causal"):
        if not isinstance(v.get(key, False), bool):
            raise GraphError(f"vertex {name!r} has {key} {v[key]!r}: use true or false")
    pos = positions_of(v["positions"], f"vertex {name!r}") if "positions" in v else None
    return Vertex(name, v.get("dim", tokens), v.get("role", "hidden"), v.get("activation", "identity"),
                  v.get("bias", False), pos, v.get("kind", "sum"), v.get("norm", "none"), v.get("causal", False),
                  tokens)


def parse_edge(i: int, e: Any) -> Edge:
    if isinstance(e, Mapping):
        unknown = set(e) - set(_EDGE_KEYS)
        if unknown or "src" not in e or "dst" not in e:
            raise GraphError(f"edges[{i}] = {dict(e)!r}: an edge mapping has keys src, dst and optional "
                             f"{', '.join(_EDGE_KEYS[2:])}")
        return _edge_from_mapping(i, e)
    if isinstance(e, str):
        return Edge(*edge_key(e)[:2], slot=(edge_key(e)[2:] or (None,))[0])
    if isinstance(e, Sequence) and len(e) in (2, 3):
        deg = None
        if len(e) == 3:
            if not isinstance(e[2], Mapping) or set(e[2]) - {"degree"}:
                raise GraphError(f"edges[{i}] = {list(e)!r}: the third item must be {{degree: k}}")
            deg = _degree(i, e[2].get("degree"))
        return Edge(str(e[0]), str(e[1]), deg)
    raise GraphError(f"edges[{i}] = {e!r}: write an edge as [u, v], 'u->v' or {{src: u, dst: v, degree: k}}")


def _edge_from_mapping(i: int, e: Mapping) -> Edge:
    src, dst = str(e["src"]), str(e["dst"])
    where = f"edge {src}->{dst}"
    kind = e.get("kind", "linear")
    if kind not in EDGE_KINDS:
        raise GraphError(f"{where} has kind {kind!r}: choose one of {EDGE_KINDS}")
    slot = e.get("slot")
    if slot is not None and slot not in SLOTS:
        raise GraphError(f"{where} has slot {slot!r}: choose one of {SLOTS} (edges into an attention vertex)")
    window_keys = [k for k in ("kernel", "stride", "padding", "dilation") if k in e]
    if window_keys and kind not in WINDOW_KINDS:
        raise GraphError(f"{where} has {', '.join(window_keys)} but kind {kind!r}: only conv and pool edges take "
                         "a window (set kind: conv or kind: pool)")
    window = pool = index = None
    if kind in WINDOW_KINDS:
        if e.get("kernel") is None:
            raise GraphError(f"{where} ({kind}) needs a kernel: e.g. kernel: 3 (or [3, 3] on an image)")
        window = WindowSpec(kind, *(_hashable(e.get(k)) for k in ("kernel", "stride", "padding", "dilation")))
    if kind == "pool":
        pool = e.get("pool", "max")
        if pool not in POOLS:
            raise GraphError(f"{where} has pool {pool!r}: choose one of {POOLS}")
    elif "pool" in e:
        raise GraphError(f"{where} has pool {e['pool']!r} but kind {kind!r}: set kind: pool")
    if kind == "select":
        raw = e.get("index", -1)
        raw = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if isinstance(raw, str) or not isinstance(raw, Sequence) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in raw):
            raise GraphError(f"{where} has index {e.get('index')!r}: give a position, an integer (or [i, j])")
        index = tuple(int(x) for x in raw)
    elif "index" in e:
        raise GraphError(f"{where} has index {e['index']!r} but kind {kind!r}: set kind: select")
    return Edge(src, dst, _degree(i, e.get("degree")), kind, window, pool, index, slot)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _degree(i: int, d: Any) -> float | None:
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0:
        raise GraphError(f"edges[{i}] has degree {d!r}: a degree must be a number > 0")
    return d
