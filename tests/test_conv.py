"""Vertices with positions: conv, pooling, mean, select and flatten edges (one process).

- The fully-connected lift of a conv base with fibre size s equals `torch.nn.Conv1d/Conv2d` with
  s * d channels and the same weights: outputs, input gradients and weight and bias gradients, on
  several kernels, strides, paddings and dilations, 1-d and 2-d; pooling, mean, select and flatten
  heads equal torch's ops on the same weights; a CNN of the MNIST-1D paper's shape has its 5,210
  parameters.
- Random sparse lifts of such bases equal an independent slow forward (`lift_reference.py`: one
  torch conv per lifted edge) for every kernel implementation, in float64.
- The conv op saves only y and w, gives the same result in batch chunks, passes gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lift_reference import reference_forward
from randlift_dist import BaseGraph, GraphError, LiftedNetwork, fully_connected_lift, random_sparse_lift
from randlift_dist.ops import CSR, Geometry, Stored, windowed_aggregate
from randlift_dist.ops import workspace as ws

D = torch.float64


def dense_weight(net, e, n_u, n_v, d_u, d_v, kernel):
    """torch's conv weight `[n_v d_v, n_u d_u, *kernel]` of a fully-connected lifted conv edge."""
    src, dst = net.edge_index(e)
    W = net.edge_weight(e).detach()
    out = torch.zeros(n_v * d_v, n_u * d_u, *kernel, dtype=W.dtype)
    for k, (i, j) in enumerate(zip(src.tolist(), dst.tolist())):
        out[j * d_v:(j + 1) * d_v, i * d_u:(i + 1) * d_u] = W[k].view(d_v, d_u, *kernel)
    return out


def to_torch(a, n, d, B, P):
    """`[n, d, B * P]` activations -> torch's `[B, n d, *P]`."""
    return a.reshape(n, d, B, *P).movedim(2, 0).reshape(B, n * d, *P)


CONV_CASES = [  # positions, channels, (dim, kernel, stride, padding, dilation) per conv layer, s
    ((23,), 2, [(1, 3, 1, 1, 1), (2, 5, 2, 2, 1)], 3),
    ((17,), 1, [(2, 4, 3, 0, 2)], 4),
    ((9, 11), 3, [(1, (3, 2), (2, 1), (1, 0), (1, 2)), (2, 3, 1, 1, 1)], 2),
    ((7, 6), 2, [(3, 1, 1, 0, 1), (1, (2, 3), (1, 2), (0, 1), 1)], 3),
]


def conv_base(positions, channels, layers, head="mean"):
    vs = [{"name": "x", "dim": channels, "role": "input", "positions": list(positions)}]
    es = []
    prev = "x"
    for i, (d, k, s, p, dil) in enumerate(layers):
        vs.append({"name": f"c{i}", "dim": d, "activation": ("tanh", "relu")[i % 2], "bias": True})
        es.append({"src": prev, "dst": f"c{i}", "kind": "conv", "kernel": k, "stride": s, "padding": p,
                   "dilation": dil})
        prev = f"c{i}"
    vs.append({"name": "y", "dim": 2, "role": "output"})
    es.append({"src": prev, "dst": "y", "kind": head})
    return BaseGraph.from_dict({"vertices": vs, "edges": es})


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
def test_fully_connected_conv_lift_equals_torch_conv(case, impl):
    positions, C, layers, s = CONV_CASES[case]
    base = conv_base(positions, C, layers)
    lift = fully_connected_lift(base, s)
    net = LiftedNetwork(base, lift, readout_init="normal", seed=case, impl=impl, dtype=D)
    g = torch.Generator().manual_seed(case)
    with torch.no_grad():
        for v in base.vertices:
            if net.bias(v) is not None:
                net.bias(v).copy_(torch.randn(net.bias(v).shape, generator=g, dtype=D))
    B = 3
    x = torch.randn(B, base.in_dim, generator=g, dtype=D, requires_grad=True)
    acts = net.activations(x)
    # torch: the same network as Conv layers with s * d channels
    xt = x.detach().clone().reshape(B, *positions, C).movedim(-1, 1).requires_grad_()
    h, ws_, bs, prev_n, prev_d = xt, [], [], 1, C
    for i, (d, k, st, p, dil) in enumerate(layers):
        e = base.edge(f"{'x' if i == 0 else f'c{i - 1}'}->c{i}")
        kern = e.window.kernel
        W = dense_weight(net, e.key, prev_n if i else 1, s, prev_d, d, kern).requires_grad_()
        b = net.bias(f"c{i}").detach().reshape(-1).clone().requires_grad_()
        conv = F.conv1d if len(positions) == 1 else F.conv2d
        h = conv(h, W, b, stride=e.window.stride, padding=e.window.padding, dilation=e.window.dilation)
        h = (torch.tanh, torch.relu)[i % 2](h)
        ws_.append(W)
        bs.append(b)
        mine = to_torch(acts[f"c{i}"], s, d, B, base.positions(f"c{i}"))
        assert mine.shape == h.shape
        torch.testing.assert_close(mine, h, rtol=1e-12, atol=1e-12)
        prev_n, prev_d = s, d
    G = torch.randn(h.shape, generator=g, dtype=D)
    (mine * G).sum().backward()
    (h * G).sum().backward()
    torch.testing.assert_close(x.grad, xt.grad.movedim(1, -1).reshape(B, -1), rtol=1e-10, atol=1e-12)
    prev_n, prev_d = 1, C
    for i, (d, *_rest) in enumerate(layers):
        e = base.edge(f"{'x' if i == 0 else f'c{i - 1}'}->c{i}")
        gmine = net.edge_weight(e.key).grad
        src, dst = net.edge_index(e.key)
        for k, (a, j) in enumerate(zip(src.tolist(), dst.tolist())):
            want = ws_[i].grad[j * d:(j + 1) * d, a * prev_d:(a + 1) * prev_d].reshape(d, -1)
            torch.testing.assert_close(gmine[k], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(net.bias(f"c{i}").grad.reshape(-1), bs[i].grad, rtol=1e-10, atol=1e-12)
        prev_n, prev_d = s, d


@pytest.mark.parametrize("head", ["pool_max", "pool_avg", "mean", "select", "flatten"])
def test_fully_connected_heads_equal_torch(head):
    """x (1-d signal) -> h (conv) -> p (pool/mean/select/flatten then the edge's matrix): torch ops."""
    s, d, dp = 3, 2, 2
    kind, extra = {"pool_max": ("pool", {"pool": "max", "kernel": 3, "stride": 2, "padding": 1, "dilation": 1}),
                   "pool_avg": ("pool", {"pool": "avg", "kernel": 2}), "mean": ("mean", {}),
                   "select": ("select", {"index": -2}), "flatten": ("flatten", {})}[head]
    base = BaseGraph.from_dict({"vertices": [
        {"name": "x", "dim": 2, "role": "input", "positions": [12]},
        {"name": "h", "dim": d, "activation": "tanh"},
        {"name": "p", "dim": dp, "role": "output"}],
        "edges": [{"src": "x", "dst": "h", "kind": "conv", "kernel": 3, "padding": 1},
                  {"src": "h", "dst": "p", "kind": kind, **extra}]})
    net = LiftedNetwork(base, fully_connected_lift(base, s), readout_init="normal", dtype=D)
    B = 4
    x = torch.randn(B, base.in_dim, dtype=D)
    acts = net.activations(x)
    h = to_torch(acts["h"], s, d, B, (12,))
    e = base.edge("h->p")
    if kind == "pool":
        fn = F.max_pool1d if e.pool == "max" else F.avg_pool1d
        args = (e.window.kernel, e.window.stride, e.window.padding) + ((e.window.dilation,) if e.pool == "max" else ())
        feat = fn(h, *args)  # [B, s d, L']
    elif kind == "mean":
        feat = h.mean(2)
    elif kind == "select":
        feat = h[:, :, -2]
    else:
        feat = h  # flatten: per member, channel-major features
    src, dst = net.edge_index("h->p")
    W = net.edge_weight("h->p").detach()
    want = torch.zeros((B, s * dp) + tuple(feat.shape[2:]) if kind == "pool" else (B, s * dp), dtype=D)
    for k, (i, j) in enumerate(zip(src.tolist(), dst.tolist())):
        fi = feat[:, i * d:(i + 1) * d]
        contrib = torch.einsum("oc,bc...->bo...", W[k], fi) if kind != "flatten" else fi.flatten(1) @ W[k].t()
        want[:, j * dp:(j + 1) * dp] += contrib
    got = to_torch(acts["p"], s, dp, B, base.positions("p"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out = net(x)
    assert out.shape == (B, *base.positions("p"), dp)


def test_mnist1d_cnn_shape_has_5210_parameters():
    """The MNIST-1D paper's CNN (3 convs of 25 channels, kernels 5/3/3, stride 2, padding 1, then a
    linear layer on the flattened 25 x 5 features) is the fully-connected lift of size 25 of
    `cnn1d(40, 1, [1, 1, 1], 10, ...)`; with a readout of the output fibre it has 5,210 weights."""
    base = BaseGraph.cnn1d(40, 1, [1, 1, 1], 1, kernel=[5, 3, 3], stride=2, padding=1, head="flatten")
    assert [base.positions(v) for v in base.order] == [(40,), (19,), (10,), (5,), ()]
    net = LiftedNetwork(base, fully_connected_lift(base, {"c1": 25, "c2": 25, "c3": 25, "y": 10}))
    edges = sum(net.edge_weight(e.key).numel() for e in base.edges)
    biases = sum(net.bias(v).numel() for v in ("c1", "c2", "c3"))
    assert edges + biases == 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 125 * 10 == 5200  # + 10 output biases in torch
    out = net(torch.randn(4, 40))
    assert out.shape == (4, 1)


SPARSE = [
    ("conv1d", lambda: conv_base((19,), 2, [(2, 3, 2, 1, 1), (1, 2, 1, 0, 2)], head="flatten")),
    ("conv2d", lambda: conv_base((6, 7), 1, [(2, (3, 3), 1, 1, 1), (3, (2, 3), (2, 1), 0, 1)], head="mean")),
    ("pool_select", lambda: BaseGraph.from_dict({"vertices": [
        {"name": "x", "dim": 3, "role": "input", "positions": [10]},
        {"name": "h", "dim": 2, "activation": "relu", "bias": True},
        {"name": "p", "dim": 3, "activation": "tanh"},
        {"name": "y", "dim": 2, "role": "output"}],
        "edges": [{"src": "x", "dst": "h", "kind": "conv", "kernel": 3},
                  {"src": "h", "dst": "p", "kind": "pool", "pool": "max", "kernel": 2},
                  {"src": "x", "dst": "p", "kind": "pool", "pool": "avg", "kernel": 3, "stride": 3, "padding": 1},
                  {"src": "p", "dst": "y", "kind": "select", "index": 1},
                  {"src": "h", "dst": "y", "kind": "mean"}]})),
]


@pytest.mark.parametrize("impl", ["reference", "blocked", "csr", "auto"])
@pytest.mark.parametrize("name", [n for n, _ in SPARSE])
def test_random_sparse_lift_equals_independent_forward(name, impl):
    base = dict(SPARSE)[name]()
    if impl == "csr" and any(base.dim(v) != 1 for v in base.vertices if base.vertices[v].role != "input"):
        base = BaseGraph.from_dict({**base.to_dict(), "vertices": [
            {**v, "dim": 1} if v["role"] != "input" else v for v in base.to_dict()["vertices"]]})
    lift = random_sparse_lift(base, 6, 2.5, seed=3, block_size=4)
    net = LiftedNetwork(base, lift, readout_init="normal", seed=1, impl=impl, dtype=D, readout_scale="sqrt")
    x = torch.randn(5, base.in_dim, dtype=D, generator=torch.Generator().manual_seed(2))
    want, ys = reference_forward(net, x)
    acts = net.activations(x)
    for v in base.order:
        if base.vertices[v].role == "input":
            continue
        got = acts[v].reshape(net.lift.n(v), base.dim(v), 5, *base.positions(v)).movedim(2, 1)
        torch.testing.assert_close(got, ys[v], rtol=1e-12, atol=1e-12, msg=lambda m: f"{v}: {m}")
    torch.testing.assert_close(net(x), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the conv op itself
def _conv_case(seed=0, n_u=7, n_v=5, d_u=3, d_v=2, B=4, geom=None, deg=3):
    g = torch.Generator().manual_seed(seed)
    geom = geom or Geometry((11,), (6,), (3,), (2,), (1,), (1,))
    row = torch.arange(n_v).repeat_interleave(deg)
    col = torch.cat([torch.randperm(n_u, generator=g)[:deg].sort().values for _ in range(n_v)])
    csr = CSR(row, col, n_v, n_u)
    y = torch.randn(n_u, d_u, B * geom.p_in, generator=g, dtype=D)
    w = torch.randn(n_v * deg, d_v, d_u * geom.taps, generator=g, dtype=D)
    return y, w, csr, geom


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_conv_op_gradcheck_and_chunks(impl, monkeypatch):
    y, w, csr, geom = _conv_case(n_u=4, n_v=3, d_u=2, d_v=2, B=2, deg=2)
    y.requires_grad_()
    w.requires_grad_()
    fn = lambda a, b: windowed_aggregate(a, b, geom, Stored(csr, impl))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, w))
    z = fn(y, w)
    gz = torch.randn_like(z)
    gy, gw = torch.autograd.grad(z, (y, w), gz)
    monkeypatch.setattr(ws, "WINDOW_CHUNK_ELEMS", 1)  # one sample per chunk
    z2 = fn(y, w)
    gy2, gw2 = torch.autograd.grad(z2, (y, w), gz)
    torch.testing.assert_close(z2, z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gy2, gy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw2, gw, rtol=1e-12, atol=1e-12)


def test_conv_op_saves_only_y_and_w():
    y, w, csr, geom = _conv_case(B=8)
    y.requires_grad_()
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        windowed_aggregate(y, w, geom, Stored(csr, "blocked"))
    assert sorted(saved) == sorted([y.shape, w.shape]), saved


def test_positions_validation_messages():
    X = {"name": "x", "dim": 2, "role": "input", "positions": [8]}
    Y = {"name": "y", "dim": 1, "role": "output"}

    def build(vs, es):
        return BaseGraph.from_dict({"vertices": vs, "edges": es})

    h = {"name": "h", "dim": 2}
    with pytest.raises(GraphError, match=r"edge x->h: kernel 9 .* does not fit in 8 positions"):
        build([X, h, Y], [{"src": "x", "dst": "h", "kind": "conv", "kernel": 9}, {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"vertex 'h': its in-edges give different positions"):
        build([X, {"name": "g", "dim": 1}, h, Y], [["x", "g"], {"src": "x", "dst": "h", "kind": "conv", "kernel": 3},
                                                 ["g", "h"], {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"output vertices have different positions"):
        build([X, h, Y, {"name": "y2", "dim": 1, "role": "output"}], [["x", "h"], ["h", "y"],
                                                                    {"src": "h", "dst": "y2", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"edge h->y: a mean edge .* no positions"):
        build([{**X, "positions": []}, h, Y], [["x", "h"], {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"edge x->h has stride \[1, 2, 3\]"):
        build([X, h, Y], [{"src": "x", "dst": "h", "kind": "conv", "kernel": 3, "stride": [1, 2, 3]},
                          {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"edge x->h has kernel but kind 'linear'"):
        build([X, h, Y], [{"src": "x", "dst": "h", "kernel": 3}, {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"vertex 'x' has positions \[0\]"):
        build([{**X, "positions": [0]}, h, Y], [["x", "h"], {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"select index \[8\]"):
        build([X, h, Y], [["x", "h"], {"src": "h", "dst": "y", "kind": "select", "index": 8}])
    with pytest.raises(GraphError, match=r"declares positions \(4,\) but its in-edges give \(8,\)"):
        build([X, {**h, "positions": [4]}, Y], [["x", "h"], {"src": "h", "dst": "y", "kind": "mean"}])
    with pytest.raises(GraphError, match=r"pooling padding must be at most half"):
        build([X, h, Y], [{"src": "x", "dst": "h", "kind": "pool", "kernel": 2, "padding": 2},
                          {"src": "h", "dst": "y", "kind": "mean"}])
    g = build([X, h, Y], [{"src": "x", "dst": "h", "kind": "conv", "kernel": 3, "padding": 1}, ["h", "y"]])
    assert g.in_dim == 16 and g.output_positions == (8,) and g.edge_features("x->h") == 6
    assert BaseGraph.from_dict(g.to_dict()).to_dict() == g.to_dict()
    net = LiftedNetwork(g, random_sparse_lift(g, 3, 2, seed=0), readout_init="normal")
    assert net(torch.randn(2, 16)).shape == (2, 8, 1)
    with pytest.raises(ValueError, match=r"expected \[batch, 16\]"):
        net(torch.randn(2, 8))


def test_weight_scale_counts_taps():
    base = conv_base((30,), 4, [(8, 5, 1, 2, 1)])
    lift = random_sparse_lift(base, 64, 6, seed=0, law="fixed_degree")
    net = LiftedNetwork(base, lift)
    w = net.edge_weight("x->c0")  # fan-in = 1 source x 4 channels x 5 taps
    assert abs(float(w.detach().std()) - 1 / math.sqrt(20)) < 0.02
