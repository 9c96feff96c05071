"""LiftedNetwork against an independent implementation of the lifted module (properties 1, 2, 5, 6, 7, 8 below).

`reference_forward` below is written from the definitions only: it reads the lifted network
through the public introspection (`edge_index`, `edge_weight`, `bias`, `readout_weight`) and the
test's own description of the base network (vertex list in declaration order, edge list), orders
the vertices itself, and computes in float64 numpy, one lifted edge message at a time.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from randlift_dist import BaseGraph, Lift, LiftedNetwork, fully_connected_lift, random_sparse_lift

ACTS = ("identity", "relu", "gelu", "tanh", "sigmoid")
_erf = np.vectorize(math.erf)
NP_ACT = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
}
TORCH_ACT = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


# ---------------------------------------------------------------- random base networks
def random_spec(rng: np.random.Generator, n_in=2, n_hidden=3, n_out=2, dims=(1, 2, 3), acts=ACTS):
    """A random DAG description (the `from_dict` form): skip edges, mixed dims, all activations.

    Vertices are declared in a shuffled order (so `order` must be computed); outputs may sit
    between hidden vertices and feed them; edges use every accepted form, some with a degree.
    """
    topo = [f"x{i}" for i in range(n_in)]
    rest = [f"h{i}" for i in range(n_hidden)] + [f"y{i}" for i in range(n_out)]
    rng.shuffle(rest)
    topo += rest
    a0 = int(rng.integers(len(acts)))
    vertices, k = [], 0
    for v in topo:
        role = {"x": "input", "h": "hidden", "y": "output"}[v[0]]
        d = {"name": v, "dim": int(rng.choice(dims)), "role": role}
        if role != "input":
            d["activation"] = acts[(a0 + k) % len(acts)]
            k += 1
            if rng.random() < 0.6:
                d["bias"] = True
        vertices.append(d)
    edges = []
    for i in range(n_in, len(topo)):
        srcs = rng.choice(i, size=int(rng.integers(1, min(3, i) + 1)), replace=False)
        edges += [(topo[s], topo[i]) for s in sorted(srcs)]
    forms = []
    for j, (u, v) in enumerate(edges):
        forms.append([[u, v], f"{u}->{v}", {"src": u, "dst": v},
                      {"src": u, "dst": v, "degree": int(rng.integers(1, 4))}][j % 4])
    order = rng.permutation(len(vertices))
    return {"vertices": [vertices[i] for i in order], "edges": forms}, edges


def random_setup(seed, law="bernoulli", impl="auto", scalar=False, readout_scale=None,
                 dtype=torch.float32, acts=ACTS, sizes=(3, 10), n_hidden=3):
    rng = np.random.default_rng(seed)
    spec, edges = random_spec(rng, dims=(1,) if scalar else (1, 2, 3), acts=acts, n_hidden=n_hidden)
    base = BaseGraph.from_dict(spec)
    size = {v["name"]: int(rng.integers(1, 3)) if v["role"] == "input" else int(rng.integers(*sizes))
            for v in spec["vertices"]}
    degree = int(rng.integers(1, 4)) if law == "fixed_degree" else float(rng.uniform(1.2, 3.0))
    lift = random_sparse_lift(base, size, degree, seed=seed, law=law, block_size=4)
    out_dims = {v["dim"] for v in spec["vertices"] if v["role"] == "output"}
    out_dim = None if len(out_dims) == 1 and rng.random() < 0.5 else int(rng.integers(1, 4))
    readout_scale = readout_scale or ("sum", "mean", "sqrt")[seed % 3]
    net = LiftedNetwork(base, lift, out_dim=out_dim, readout_scale=readout_scale, seed=seed + 100,
                        readout_init="normal", impl=impl, dtype=dtype)
    randomize_biases(net, seed)
    return spec, edges, net


def randomize_biases(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in net.base.vertices:
            b = net.bias(v)
            if b is not None:
                b.copy_(0.5 * torch.randn(b.shape, generator=g, dtype=b.dtype))


# ---------------------------------------------------------------- the independent implementation
def describe(spec, edges, net):
    """Everything the definition needs, read through the public introspection, as float64 numpy."""
    verts = {v["name"]: v for v in spec["vertices"]}
    d = {"verts": verts, "inputs": [v["name"] for v in spec["vertices"] if v.get("role", "hidden") == "input"],
         "outputs": [v["name"] for v in spec["vertices"] if v.get("role", "hidden") == "output"],
         "n": {v: net.lift.n(v) for v in verts}, "edges": {}, "bias": {}, "readout": {},
         "scale": net.readout_scale}
    for u, v in edges:
        src, dst = net.edge_index((u, v))
        d["edges"][(u, v)] = (src.numpy(), dst.numpy(), net.edge_weight((u, v)).detach().double().numpy())
    for name, vx in verts.items():
        b = net.bias(name)
        assert (b is not None) == bool(vx.get("bias", False))
        if b is not None:
            d["bias"][name] = b.detach().double().numpy()
    for t in d["outputs"]:
        d["readout"][t] = net.readout_weight(t).detach().double().numpy()
    return d


def reference_forward(d, x: np.ndarray):
    """f(x) and activations {v: [n_v, B, d_v]}, straight from the definitions (perceptron module, lift, readout)."""
    B = x.shape[0]
    preds = {v: [e for e in d["edges"] if e[1] == v] for v in d["verts"]}
    ys, off = {}, 0
    for v in d["inputs"]:  # every vertex of an input fibre holds x_v
        dv = d["verts"][v]["dim"]
        ys[v] = np.broadcast_to(x[:, off:off + dv], (d["n"][v], B, dv)).copy()
        off += dv
    assert off == x.shape[1]
    todo = [v for v in d["verts"] if v not in ys]
    while todo:  # topological order, found here
        v = next(v for v in todo if all(u in ys for u, _ in preds[v]))
        todo.remove(v)
        vx = d["verts"][v]
        z = np.zeros((d["n"][v], B, vx["dim"]))
        for e in preds[v]:
            src, dst, w = d["edges"][e]
            for k in range(src.size):  # message of lifted edge src[k] -> dst[k]
                z[dst[k]] += ys[e[0]][src[k]] @ w[k].T
        if v in d["bias"]:
            z += d["bias"][v][:, None, :]
        ys[v] = NP_ACT[vx.get("activation", "identity")](z)
    N = sum(d["n"][t] for t in d["outputs"])
    c = {"sum": 1.0, "mean": 1.0 / N, "sqrt": 1.0 / math.sqrt(N)}[d["scale"]]
    out = 0.0
    for t in d["outputs"]:
        A = d["readout"][t]  # [n_t, out_dim, d_t]
        for j in range(d["n"][t]):
            out = out + ys[t][j] @ A[j].T
    return c * out, ys


def assert_close_rel(got, want, rel, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-12)
    err = np.abs(got - want).max(initial=0.0)
    assert got.shape == want.shape, f"{what}: shapes {got.shape} != {want.shape}"
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def check_against_reference(spec, edges, net, B=4, seed=0):
    x = torch.randn(B, net.base.in_dim, generator=torch.Generator().manual_seed(seed))
    d = describe(spec, edges, net)
    want, ys = reference_forward(d, x.double().numpy())
    with torch.no_grad():
        got = net(x.to(net.readout_weight(d["outputs"][0]).dtype))
        acts = net.activations(x)
    assert got.shape == (B, net.out_dim)
    rel = 1e-5 if got.dtype == torch.float32 else 1e-12
    assert_close_rel(got.numpy(), want, rel, "output")
    for v, y in ys.items():
        assert_close_rel(acts[v].double().numpy().transpose(0, 2, 1), y, rel, f"activations of {v}")
    return d


# ---------------------------------------------------------------- property: forward = definition
@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
@pytest.mark.parametrize("seed", range(4))
def test_forward_matches_independent_implementation(seed, law, impl):
    spec, edges, net = random_setup(seed, law, impl)
    d = check_against_reference(spec, edges, net, seed=seed)
    # the network is not trivial: every activation was used and several lifted vertices differ
    assert {v.get("activation") for v in spec["vertices"] if v["role"] != "input"} == set(ACTS)
    assert sum(src.size for src, _, _ in d["edges"].values()) > 20


@pytest.mark.parametrize("impl", ["reference", "blocked", "csr", "auto"])
@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
@pytest.mark.parametrize("seed", range(3))
def test_forward_scalar_networks_every_impl(seed, law, impl):
    spec, edges, net = random_setup(seed + 10, law, impl, scalar=True)
    check_against_reference(spec, edges, net, seed=seed)


@pytest.mark.parametrize("scale", ["sum", "mean", "sqrt"])
def test_readout_scales_and_zero_init(scale):
    spec, edges, net = random_setup(3, readout_scale=scale)
    check_against_reference(spec, edges, net)
    zero = LiftedNetwork(net.base, net.lift, out_dim=net.out_dim, readout_scale=scale)
    for t in net.base.outputs:
        assert not zero.readout_weight(t).any()
    assert not zero(torch.randn(3, net.base.in_dim)).any()


def test_larger_lift_float64():
    spec, edges, net = random_setup(7, sizes=(30, 60), dtype=torch.float64)
    check_against_reference(spec, edges, net)


def test_introspection_matches_lift():
    spec, edges, net = random_setup(1)
    n_params = 0
    for u, v in edges:
        src, dst = net.edge_index((u, v))
        s, t = net.lift.edges((u, v))
        assert src.dtype == dst.dtype == torch.int64
        np.testing.assert_array_equal(src.numpy(), s)
        np.testing.assert_array_equal(dst.numpy(), t)
        w = net.edge_weight(f"{u}->{v}")
        assert isinstance(w, nn.Parameter)
        assert w.shape == (s.size, net.base.dim(v), net.base.dim(u))
        n_params += w.numel()
    for v in net.base.vertices:
        b = net.bias(v)
        if b is not None:
            assert isinstance(b, nn.Parameter) and b.shape == (net.lift.n(v), net.base.dim(v))
            n_params += b.numel()
    for t in net.base.outputs:
        assert net.readout_weight(t).shape == (net.lift.n(t), net.out_dim, net.base.dim(t))
        n_params += net.readout_weight(t).numel()
    assert n_params == sum(p.numel() for p in net.parameters())
    acts = net.activations(torch.randn(5, net.base.in_dim))
    for v in net.base.vertices:
        assert acts[v].shape == (net.lift.n(v), net.base.dim(v), 5)


# ---------------------------------------------------------------- property 1: identity lift
class BaseModule(nn.Module):
    """The base perceptron module, hand-written: y_v = act(sum_e W_e y_u + b_v), f = c sum A_t y_t."""

    def __init__(self, spec, edges, net):
        super().__init__()
        self.verts = {v["name"]: v for v in spec["vertices"]}
        self.inputs = [v["name"] for v in spec["vertices"] if v.get("role", "hidden") == "input"]
        self.outputs = [v["name"] for v in spec["vertices"] if v.get("role", "hidden") == "output"]
        self.edge_list = list(edges)
        self.W = nn.ParameterList(nn.Parameter(net.edge_weight(e).detach()[0].clone()) for e in edges)
        self.b = nn.ParameterDict({v: nn.Parameter(net.bias(v).detach()[0].clone())
                                   for v in self.verts if net.bias(v) is not None})
        self.A = nn.ParameterDict({t: nn.Parameter(net.readout_weight(t).detach()[0].clone())
                                   for t in self.outputs})
        N = len(self.outputs)
        self.c = {"sum": 1.0, "mean": 1.0 / N, "sqrt": 1.0 / math.sqrt(N)}[net.readout_scale]

    def forward(self, x):  # [B, in_dim] -> [B, out_dim]
        ys, off = {}, 0
        for v in self.inputs:
            ys[v] = x[:, off:off + self.verts[v]["dim"]]
            off += self.verts[v]["dim"]
        todo = [v for v in self.verts if v not in ys]
        while todo:
            v = next(v for v in todo if all(u in ys for u, w in self.edge_list if w == v))
            todo.remove(v)
            z = sum(ys[u] @ W.T for (u, w), W in zip(self.edge_list, self.W) if w == v)
            if v in self.b:
                z = z + self.b[v]
            ys[v] = TORCH_ACT[self.verts[v].get("activation", "identity")](z)
        return self.c * sum(ys[t] @ self.A[t].T for t in self.outputs)


@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
@pytest.mark.parametrize("seed", range(3))
def test_identity_lift_is_the_base_module(seed, impl):
    rng = np.random.default_rng(seed)
    spec, edges = random_spec(rng)
    base = BaseGraph.from_dict(spec)
    lift = fully_connected_lift(base, 1)
    out_dim = 2
    net = LiftedNetwork(base, lift, out_dim=out_dim, readout_scale=("sum", "mean", "sqrt")[seed],
                        readout_init="normal", seed=seed, impl=impl, dtype=torch.float64)
    randomize_biases(net, seed)
    ref = BaseModule(spec, edges, net)
    x = torch.randn(5, base.in_dim, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = net(x1), ref(x2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    def grad(p):  # a parameter that does not reach the output gets no gradient: read it as 0
        return torch.zeros_like(p) if p.grad is None else p.grad

    for e, W in zip(edges, ref.W):
        assert net.edge_weight(e).shape[0] == 1
        torch.testing.assert_close(grad(net.edge_weight(e))[0], grad(W), rtol=1e-10, atol=1e-12)
    for v, b in ref.b.items():
        torch.testing.assert_close(grad(net.bias(v))[0], grad(b), rtol=1e-10, atol=1e-12)
    for t, A in ref.A.items():
        torch.testing.assert_close(grad(net.readout_weight(t))[0], grad(A), rtol=1e-10, atol=1e-12)
    assert x1.grad.abs().sum() > 0


# ---------------------------------------------------------------- property 2: dense MLP
class _Fn(nn.Module):
    """A pointwise function as a module (for nn.Sequential)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def dense_block_matrix(net, e, n_u, n_v, d_u, d_v):
    """The [n_v d_v, n_u d_u] matrix of a fully-connected lifted layer (blocks W_ij at (j, i))."""
    src, dst = net.edge_index(e)
    W = net.edge_weight(e).detach()
    M = torch.zeros(n_v * d_v, n_u * d_u, dtype=W.dtype)
    for k, (i, j) in enumerate(zip(src.tolist(), dst.tolist())):
        M[j * d_v:(j + 1) * d_v, i * d_u:(i + 1) * d_u] = W[k]
    return M


def block_rows(M, net, e, d_u, d_v):
    """Inverse of dense_block_matrix for gradients: [m, d_v, d_u] in edge order."""
    src, dst = net.edge_index(e)
    return torch.stack([M[j * d_v:(j + 1) * d_v, i * d_u:(i + 1) * d_u]
                        for i, j in zip(src.tolist(), dst.tolist())])


@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
@pytest.mark.parametrize("hidden,act", [([1, 1], "tanh"), ([2, 3], "relu"), ([3, 1], "gelu")],
                         ids=["scalar", "vector-relu", "vector-gelu"])
def test_fully_connected_lift_is_a_dense_mlp(hidden, act, impl):
    in_dim, out_dim, d_y = 3, 2, hidden[-1]
    base = BaseGraph.mlp(in_dim, hidden, d_y, act, bias=True)
    sizes = {"h1": 5, "h2": 7, "y": 4}
    net = LiftedNetwork(base, fully_connected_lift(base, sizes), out_dim=out_dim, readout_scale="sqrt",
                        readout_init="normal", seed=3, impl=impl)
    randomize_biases(net, 3)
    dims = {"x": in_dim, "h1": hidden[0], "h2": hidden[1], "y": d_y}
    n = {"x": 1, **sizes}
    layers = []
    for e in base.edges:
        u, v = e.key
        lin = nn.Linear(n[u] * dims[u], n[v] * dims[v], bias=net.bias(v) is not None)
        with torch.no_grad():
            lin.weight.copy_(dense_block_matrix(net, e.key, n[u], n[v], dims[u], dims[v]))
            if lin.bias is not None:
                lin.bias.copy_(net.bias(v).detach().reshape(-1))  # row j * d_v + a
        layers.append(lin)
    readout = nn.Linear(n["y"] * d_y, out_dim, bias=False)
    with torch.no_grad():  # R[o, t d + a] = A_t[o, a]
        readout.weight.copy_(net.readout_weight("y").detach().permute(1, 0, 2).reshape(out_dim, -1))
    phi = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu}[act]
    mlp = nn.Sequential(layers[0], _Fn(phi), layers[1], _Fn(phi), layers[2], readout)
    c = 1 / math.sqrt(sizes["y"])

    x = torch.randn(6, in_dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = net(x1), c * mlp(x2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for e, lin in zip(base.edges, layers):
        u, v = e.key
        torch.testing.assert_close(net.edge_weight(e.key).grad,
                                   block_rows(lin.weight.grad, net, e.key, dims[u], dims[v]),
                                   rtol=1e-5, atol=1e-6)
        if lin.bias is not None:
            torch.testing.assert_close(net.bias(v).grad.reshape(-1), lin.bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.readout_weight("y").grad.permute(1, 0, 2).reshape(out_dim, -1),
                               readout.weight.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- property 5: fibre permutations
@dataclasses.dataclass(frozen=True)
class RelabelledLift(Lift):
    """The lift with the vertices of some fibres renamed: old index i becomes perm[v][i].

    One block holds everything, so `LiftedNetwork` builds it; its parameters are then set from
    the original network, carried along with the vertices.
    """

    perm: dict = dataclasses.field(default_factory=dict)

    def iter_blocks(self, e, targets=None):
        assert targets is None
        e = self.base.edge(e)
        src, dst = self.relabel(e, *self.as_lift().edges(e))
        order = np.lexsort((src, dst))
        yield 0, src[order], dst[order], None

    def relabel(self, e, src, dst):
        ps, pd = self.perm.get(e.src), self.perm.get(e.dst)
        return (src if ps is None else ps[src]), (dst if pd is None else pd[dst])

    def as_lift(self) -> Lift:
        return Lift(self.base, self.sizes, self.law, self.degrees, self.seed, self.block_size)


def relabelled_network(net, perm):
    lift = net.lift
    lift2 = RelabelledLift(lift.base, lift.sizes, lift.law, lift.degrees, lift.seed, lift.block_size,
                           perm=perm)
    net2 = LiftedNetwork(net.base, lift2, out_dim=net.out_dim, readout_scale=net.readout_scale,
                         seed=net.seed, impl=net.impl)
    with torch.no_grad():
        for e in net.base.edges:
            src, dst = (a.numpy() for a in net.edge_index(e.key))
            s2, d2 = lift2.relabel(e, src, dst)
            src2, dst2 = (a.numpy() for a in net2.edge_index(e.key))
            key2 = dst2 * lift.n(e.src) + src2
            pos = np.searchsorted(key2, d2 * lift.n(e.src) + s2)
            np.testing.assert_array_equal(key2[pos], d2 * lift.n(e.src) + s2)  # same edge set
            net2.edge_weight(e.key)[torch.from_numpy(pos)] = net.edge_weight(e.key)
        for v in net.base.vertices:
            p = torch.from_numpy(perm.get(v, np.arange(lift.n(v))))
            if net.bias(v) is not None:
                net2.bias(v)[p] = net.bias(v)
            if v in net.base.outputs:
                net2.readout_weight(v)[p] = net.readout_weight(v)
    return net2


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", ["one-hidden", "all"])
def test_fibre_permutation_invariance(seed, which):
    spec, edges, net = random_setup(seed + 20, impl=("reference", "blocked", "auto")[seed])
    rng = np.random.default_rng(seed)
    hidden = [v for v in net.base.order if net.base.vertices[v].role == "hidden"]
    fibres = hidden[:1] if which == "one-hidden" else [v for v in net.base.order
                                                      if net.base.vertices[v].role != "input"]
    perm = {}
    for v in fibres:
        p = rng.permutation(net.lift.n(v))
        while np.array_equal(p, np.arange(p.size)):
            p = rng.permutation(net.lift.n(v))
        perm[v] = p
    net2 = relabelled_network(net, perm)
    # the structure really moved
    moved = [e for e in net.base.edges if e.src in perm or e.dst in perm]
    assert any(not torch.equal(net.edge_index(e.key)[1], net2.edge_index(e.key)[1])
               or not torch.equal(net.edge_index(e.key)[0], net2.edge_index(e.key)[0]) for e in moved)
    x = torch.randn(5, net.base.in_dim)
    with torch.no_grad():
        torch.testing.assert_close(net2(x), net(x), rtol=1e-5, atol=1e-6)
        a1, a2 = net.activations(x), net2.activations(x)
    for v in net.base.vertices:
        p = torch.from_numpy(perm.get(v, np.arange(net.lift.n(v))))
        torch.testing.assert_close(a2[v][p], a1[v], rtol=1e-5, atol=1e-6)
    # and the independent implementation agrees on the relabelled network
    check_against_reference(spec, edges, net2)


# ---------------------------------------------------------------- property 6: locality
def lifted_adjacency(net):
    succ, pred = {}, {}
    for e in net.base.edges:
        src, dst = net.edge_index(e.key)
        for i, j in zip(src.tolist(), dst.tolist()):
            succ.setdefault((e.src, i), []).append((e.dst, j))
            pred.setdefault((e.dst, j), []).append((e.src, i))
    return succ, pred


def reachable(start, nxt):
    seen, stack = {start}, [start]
    while stack:
        for m in nxt.get(stack.pop(), []):
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


def changed_vertices(a, b):
    return {(v, i) for v in a for i in range(a[v].shape[0]) if not torch.equal(a[v][i], b[v][i])}


@pytest.mark.parametrize("impl,scalar", [("reference", False), ("blocked", False), ("csr", True)])
def test_locality_perturbation_outside_backward_cone(impl, scalar):
    dims = 1 if scalar else 2
    base = BaseGraph.residual_mlp(2 if not scalar else 1, dims, 3, dims, "tanh", bias=True)
    net = LiftedNetwork(base, random_sparse_lift(base, 40, 1.3, seed=5, block_size=8), impl=impl,
                        readout_init="normal", seed=2)
    randomize_biases(net, 1)
    succ, pred = lifted_adjacency(net)
    x = torch.randn(3, base.in_dim)
    with torch.no_grad():
        a0 = net.activations(x)
    rng = np.random.default_rng(0)
    n_inside = n_outside = 0
    for e in base.edges[1:]:
        src, dst = net.edge_index(e.key)
        for k in rng.choice(src.numel(), size=min(4, src.numel()), replace=False).tolist():
            j = (e.dst, int(dst[k]))
            cone = reachable(j, succ)  # every lifted vertex whose backward cone holds edge k
            with torch.no_grad():
                w_k = net.edge_weight(e.key)[k].clone()
                net.edge_weight(e.key)[k] += 0.7
                a1 = net.activations(x)
                net.edge_weight(e.key)[k] = w_k  # restored bit for bit
            assert changed_vertices(a0, a1) == cone
            outs = [(t, i) for t in base.outputs for i in range(net.lift.n(t))]
            n_inside += sum(o in cone for o in outs)
            n_outside += sum(o not in cone for o in outs)
    assert n_inside > 0 and n_outside > 0  # both cases occurred
    # biases: same rule
    v = "h1"
    with torch.no_grad():
        net.bias(v)[3] += 0.7
        a1 = net.activations(x)
    assert changed_vertices(a0, a1) == reachable((v, 3), succ)


def test_locality_gradient_support_is_the_backward_cone():
    base = BaseGraph.residual_mlp(2, 2, 3, 1, "tanh", bias=True)
    net = LiftedNetwork(base, random_sparse_lift(base, 30, 1.5, seed=3, block_size=8), seed=1,
                        readout_init="normal")
    randomize_biases(net, 2)
    _, pred = lifted_adjacency(net)
    for t_idx in (0, 7, 19):
        net.zero_grad()
        net.activations(torch.randn(4, 2))["y"][t_idx].sum().backward()
        cone = reachable(("y", t_idx), pred)
        for e in base.edges:
            src, dst = net.edge_index(e.key)
            g = net.edge_weight(e.key).grad
            inside = torch.tensor([(e.dst, j) in cone for j in dst.tolist()], dtype=torch.bool)
            assert not g[~inside].any(), f"gradient outside the backward cone on {e}"
            assert (g[inside].flatten(1).abs().sum(1) > 0).all(), f"zero gradient inside the cone on {e}"


# ---------------------------------------------------------------- property 7: gradcheck
@pytest.fixture
def one_thread():
    """gradcheck runs hundreds of forwards on tiny tensors; with several intra-op threads on a
    busy 2-core machine each sparse op waits milliseconds for its thread pool (measured: 3 ms vs
    0.07 ms per CSR SpMM). One thread changes no result, only the wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("impl,scalar", [("reference", False), ("blocked", False), ("reference", True),
                                         ("blocked", True), ("csr", True)])
@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
def test_gradcheck_float64(impl, scalar, law, one_thread):
    _, _, net = random_setup(31 if scalar else 30, law, impl, scalar=scalar, sizes=(2, 5), n_hidden=2)
    net = net.double()
    names, params = zip(*net.named_parameters())
    assert sum(p.numel() for p in params) < 400
    x = torch.randn(3, net.base.in_dim, dtype=torch.float64, requires_grad=True)
    leaves = [p.detach().clone().requires_grad_() for p in params]

    def f(x, *ps):
        return torch.func.functional_call(net, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- property 8 (one process): seeds
def params_of(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def test_same_seed_same_network_different_seed_different():
    base = BaseGraph.residual_mlp(3, 4, 2, 2, "gelu", bias=True)
    lift = random_sparse_lift(base, 200, 3, seed=4, block_size=32)
    a = LiftedNetwork(base, lift, seed=7, readout_init="normal")
    b = LiftedNetwork(base, random_sparse_lift(base, 200, 3, seed=4, block_size=32), seed=7,
                      readout_init="normal")
    c = LiftedNetwork(base, lift, seed=8, readout_init="normal")
    pa, pb, pc = params_of(a), params_of(b), params_of(c)
    assert pa.keys() == pb.keys() == pc.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
        if "bias" not in k and not k.startswith("biases"):
            assert not torch.equal(pa[k], pc[k]), k
    for e in base.edges:
        assert torch.equal(a.edge_index(e.key)[0], c.edge_index(e.key)[0])
    x = torch.randn(4, 3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    d = LiftedNetwork(base, random_sparse_lift(base, 200, 3, seed=5, block_size=32), seed=7)
    assert any(not torch.equal(a.edge_index(e.key)[0], d.edge_index(e.key)[0]) or
               not torch.equal(a.edge_index(e.key)[1], d.edge_index(e.key)[1]) for e in base.edges[1:])


def test_initial_weight_scale():
    base = BaseGraph.mlp(3, [8, 8], 2)
    lift = random_sparse_lift(base, 600, 4, seed=0)
    net = LiftedNetwork(base, lift, seed=1)
    w = net.edge_weight("h1->h2").detach().double()
    # default scale 1/sqrt(expected fan-in) = 1/sqrt(4 * 8); about 150k i.i.d. N(0, s^2) entries
    s = 1 / math.sqrt(32)
    n = w.numel()
    assert abs(w.mean().item()) < 5 * s / math.sqrt(n)
    assert abs(w.std().item() / s - 1) < 5 / math.sqrt(2 * n)
    kurt = ((w - w.mean()) ** 4).mean().item() / w.var().item() ** 2
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    w0 = net.edge_weight("x->h1").detach()  # fan-in of h1: 1 input copy of dim 3
    assert abs(w0.std().item() * math.sqrt(3) - 1) < 0.05
    w1 = LiftedNetwork(base, lift, seed=1, weight_scale=0.1).edge_weight("h1->h2").detach()
    torch.testing.assert_close(w1, 0.1 / s * net.edge_weight("h1->h2").detach(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- validation
def test_network_validation_errors():
    base = BaseGraph.mlp(3, [4], 2)
    lift = random_sparse_lift(base, 10, 2)
    with pytest.raises(ValueError, match="readout_scale 'median'"):
        LiftedNetwork(base, lift, readout_scale="median")
    with pytest.raises(ValueError, match="readout_init 'uniform'"):
        LiftedNetwork(base, lift, readout_init="uniform")
    with pytest.raises(ValueError, match="weight_scale -1"):
        LiftedNetwork(base, lift, weight_scale=-1)
    with pytest.raises(ValueError, match="out_dim 0"):
        LiftedNetwork(base, lift, out_dim=0)
    with pytest.raises(ValueError, match="another base network"):
        LiftedNetwork(BaseGraph.mlp(3, [5], 2), lift)
    two = BaseGraph.from_dict({"vertices": [{"name": "x", "dim": 2, "role": "input"},
                                            {"name": "a", "dim": 1, "role": "output"},
                                            {"name": "b", "dim": 3, "role": "output"}],
                               "edges": [["x", "a"], ["x", "b"]]})
    with pytest.raises(ValueError, match=r"output vertices have dims \[1, 3\]: pass out_dim"):
        LiftedNetwork(two, fully_connected_lift(two, 2))
    assert LiftedNetwork(two, fully_connected_lift(two, 2), out_dim=4)(torch.randn(2, 2)).shape == (2, 4)
    net = LiftedNetwork(base, lift)
    with pytest.raises(ValueError, match=r"input of shape \(5, 4\): expected \[batch, 3\]"):
        net(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"input of shape \(3,\): expected \[batch, 3\]"):
        net(torch.randn(3))
    with pytest.raises(ValueError, match="impl='csr' needs scalar vertices"):
        LiftedNetwork(base, lift, impl="csr")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="impl 'fast': choose one of"):  # at construction
        LiftedNetwork(base, lift, impl="fast")


def test_inputs_concatenated_in_declaration_order():
    spec = {"vertices": [{"name": "b", "dim": 1, "role": "input"}, {"name": "h", "dim": 1},
                         {"name": "a", "dim": 2, "role": "input"}, {"name": "y", "dim": 1, "role": "output"}],
            "edges": [["a", "h"], ["h", "y"], ["b", "y"]]}
    base = BaseGraph.from_dict(spec)
    net = LiftedNetwork(base, fully_connected_lift(base, {"b": 3, "h": 1, "y": 1}), readout_init="normal",
                        impl="reference")
    acts = net.activations(torch.tensor([[1.0, 2.0, 3.0]]))
    assert acts["b"].shape == (3, 1, 1) and (acts["b"] == 1.0).all()
    assert acts["a"].shape == (1, 2, 1) and acts["a"].flatten().tolist() == [2.0, 3.0]
    check_against_reference(spec, [("a", "h"), ("h", "y"), ("b", "y")], net)
