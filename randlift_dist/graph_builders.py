"""Builders of common base networks, as mapping forms (`BaseGraph.from_dict` validates them).

`build(name, kwargs)` is the `{builder: name, ...}` form of a config. Every builder returns the
`{vertices, edges}` mapping, so what a builder makes can be printed, edited and saved as YAML.

- `mlp`: x -> h1 -> ... -> hL -> y.
- `residual_mlp`: the same chain with skip edges h_i -> h_{i+2} (and x -> h2).
- `cnn`: convolution vertices c1..cL on a signal `[L, C]` or an image `[H, W, C]`, then a head
  edge (flatten, mean or select) to the output vector y. A conv vertex's `dim` is the channels of
  one fibre member: the lift of size s of a conv vertex of dim d has s * d channels.
- `transformer`: token (or feature) input x -> embedding e -> (optional conv token mixer) r0, then
  per block b: attention a_b (q, k, v from r_{b-1}; one fibre member = one head), s_b =
  norm(r_{b-1} + a_b) (residual and output-projection edges), MLP m_b, r_b = norm(s_b + m_b); then
  a select (last position) or mean edge to the output y. Residual edges are ordinary (lifted,
  weighted) edges; norms are layer norms over one member's features (post-norm blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .geometry import GraphError

HEADS = ("flatten", "mean", "select")


def build(name: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    fns = {"mlp": mlp, "residual_mlp": residual_mlp, "cnn1d": cnn1d, "cnn2d": cnn2d, "transformer": transformer}
    if name not in fns:
        raise GraphError(f"unknown builder {name!r}: choose one of {sorted(fns)}")
    try:
        return fns[name](**kwargs)
    except TypeError as err:
        raise GraphError(f"builder {name!r}: {err}") from None


def _vertex(name: str, dim: int, role: str = "hidden", **kw) -> dict[str, Any]:
    return {"name": name, "dim": dim, "role": role, **{k: v for k, v in kw.items() if v not in (None, False, "identity")}}


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "relu",
        bias: bool = False) -> dict[str, Any]:
    vs = [_vertex("x", in_dim, "input")]
    vs += [_vertex(f"h{i + 1}", d, activation=activation, bias=bias) for i, d in enumerate(hidden_dims)]
    vs.append(_vertex("y", out_dim, "output"))
    names = [v["name"] for v in vs]
    return {"vertices": vs, "edges": [[a, b] for a, b in zip(names, names[1:])]}


def residual_mlp(in_dim: int, width: int, depth: int, out_dim: int, activation: str = "relu",
                 bias: bool = False) -> dict[str, Any]:
    if not isinstance(depth, int) or depth < 1:
        raise GraphError(f"residual_mlp depth {depth!r}: must be an integer >= 1")
    spec = mlp(in_dim, [width] * depth, out_dim, activation, bias)
    names = [v["name"] for v in spec["vertices"]]
    spec["edges"] += [[names[i], names[i + 2]] for i in range(0, len(names) - 2)]
    return spec


def cnn(positions: Sequence[int], channels: int, dims: Sequence[int], out_dim: int, kernel: Any = 3,
        stride: Any = 1, padding: Any = None, dilation: Any = 1, activation: str = "relu", bias: bool = True,
        head: str = "flatten") -> dict[str, Any]:
    """Conv vertices `c1..cL` of dims `dims` over an input `x` with `positions` and `channels`.

    `kernel`, `stride`, `padding`, `dilation`: one value for every layer or a list with one per layer
    (each an int, or `[h, w]` on images; a list of as many entries as layers is per layer);
    `padding` defaults to `kernel // 2` (dilated: `dilation *
    (kernel // 2)`). `head`: the edge from the last conv vertex to `y`."""
    if not isinstance(dims, (list, tuple)) or not dims:
        raise GraphError(f"cnn dims {dims!r}: give one dim (channels per fibre member) per conv layer, e.g. [1, 1, 1]")
    if head not in HEADS:
        raise GraphError(f"cnn head {head!r}: choose one of {HEADS}")
    n = len(dims)
    ks, ss, ds = (_layers(name, v, n) for name, v in (("kernel", kernel), ("stride", stride), ("dilation", dilation)))
    if padding is None:
        ps = [_half(k, d) for k, d in zip(ks, ds)]
    else:
        ps = _layers("padding", padding, n)
    vs = [_vertex("x", channels, "input", positions=list(positions))]
    vs += [_vertex(f"c{i + 1}", d, activation=activation, bias=bias) for i, d in enumerate(dims)]
    vs.append(_vertex("y", out_dim, "output"))
    names = [v["name"] for v in vs]
    edges = [{"src": a, "dst": b, "kind": "conv", "kernel": k, "stride": s, "padding": p, "dilation": d}
             for a, b, k, s, p, d in zip(names, names[1:-1], ks, ss, ps, ds)]
    edges.append({"src": names[-2], "dst": "y", "kind": head})
    return {"vertices": vs, "edges": edges}


def _layers(name: str, value: Any, n: int) -> list[Any]:
    """One value per layer: a list of n values is per layer (so on images with two layers write
    `[[3, 3], [3, 3]]`), anything else (an int, `[h, w]`) is every layer's."""
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, (int, list, tuple)) for v in value):
        return list(value)
    if isinstance(value, (int, list, tuple)) and not isinstance(value, bool):
        return [value] * n
    raise GraphError(f"cnn {name} {value!r}: give an integer, [h, w], or a list with one per layer")


def _half(k: Any, d: Any) -> Any:
    if isinstance(k, (list, tuple)):
        dd = d if isinstance(d, (list, tuple)) else [d] * len(k)
        return [di * (ki // 2) for ki, di in zip(k, dd)]
    return (d if isinstance(d, int) else 1) * (k // 2)


def cnn1d(length: int, channels: int, dims: Sequence[int], out_dim: int, **kw) -> dict[str, Any]:
    return cnn([length], channels, dims, out_dim, **kw)


def cnn2d(shape: Sequence[int], channels: int, dims: Sequence[int], out_dim: int, **kw) -> dict[str, Any]:
    return cnn(list(shape), channels, dims, out_dim, **kw)


def transformer(seq_len: int, width: int, head_dim: int, out_dim: int, depth: int = 1, mlp_dim: int | None = None,
                tokens: int | None = None, in_dim: int | None = None, causal: bool = False, mixer_kernel: int = 0,
                activation: str = "gelu", readout: str = "select", norm: str = "layer",
                bias: bool = True) -> dict[str, Any]:
    """Transformer-like blocks (see the module doc). `tokens`: a token input of that many ids (else
    `in_dim` float features per position); `mixer_kernel` > 0 adds a conv edge of that (odd) kernel
    from the embedding to the residual stream (each position then sees its neighbours, which
    attention alone, without position encodings, cannot); `readout`: select (the last position) or mean."""
    if not isinstance(depth, int) or depth < 1:
        raise GraphError(f"transformer depth {depth!r}: must be an integer >= 1")
    if (tokens is None) == (in_dim is None):
        raise GraphError("transformer: give tokens (a token-id input) or in_dim (float features per position)")
    if readout not in ("select", "mean"):
        raise GraphError(f"transformer readout {readout!r}: choose select (last position) or mean")
    if not isinstance(mixer_kernel, int) or mixer_kernel < 0 or (mixer_kernel and mixer_kernel % 2 == 0):
        raise GraphError(f"transformer mixer_kernel {mixer_kernel!r}: 0 (none) or an odd kernel size")
    mlp_dim = mlp_dim or 2 * width
    x = {"name": "x", "role": "input", "positions": [seq_len]}
    x.update({"tokens": tokens} if tokens is not None else {"dim": in_dim})
    vs = [x, _vertex("e", width, bias=bias)]
    es: list[Any] = [["x", "e"]]
    r = "e"
    if mixer_kernel:
        vs.append(_vertex("r0", width, bias=bias))
        es.append({"src": "e", "dst": "r0", "kind": "conv", "kernel": mixer_kernel, "padding": mixer_kernel // 2})
        r = "r0"
    nrm = None if norm == "none" else norm
    for b in range(1, depth + 1):
        a, s, m, rb = f"a{b}", f"s{b}", f"m{b}", f"r{b}"
        vs += [_vertex(a, head_dim, kind="attention", causal=causal, bias=bias),
               _vertex(s, width, norm=nrm, bias=bias),
               _vertex(m, mlp_dim, activation=activation, bias=bias),
               _vertex(rb, width, norm=nrm, bias=bias)]
        es += [{"src": r, "dst": a, "slot": slot} for slot in ("q", "k", "v")]
        es += [[r, s], [a, s], [s, m], [s, rb], [m, rb]]
        r = rb
    vs.append(_vertex("y", out_dim, "output"))
    es.append({"src": r, "dst": "y", "kind": readout})
    return {"vertices": vs, "edges": es}
