"""Attention vertices, layer norms and token inputs (one process).

- The fully-connected lift of size h of an attention base (one attention vertex of dim d fed by q,
  k, v edges, read out) equals `torch.nn.MultiheadAttention` with h heads of dim d and the same
  weights (in-projection blocks = the lifted q/k/v edges, in-projection bias = the attention
  vertex's biases, out-projection = the readout): outputs, input gradients and every weight
  gradient; self- and cross-attention (kdim, vdim), causal and not.
- The fully-connected lift of an edge out of token ids equals `torch.nn.Embedding` of width s * d.
- Random sparse lifts of transformer-like bases (tokens, conv mixer, attention, layer norms,
  residual edges) equal the independent slow forward of `lift_reference.py`, for every kernel.
- Validation: slots, norms, tokens and causal masks are refused where they do not belong, in one
  line naming the vertex or edge and the fix.
"""

from __future__ import annotations

import pytest
import torch

from lift_reference import reference_forward
from randlift_dist import BaseGraph, GraphError, LiftedNetwork, fully_connected_lift, random_sparse_lift

D = torch.float64


def attention_base(L, E, d, kdim=None, vdim=None, causal=False, bias=True, Lk=None):
    """q from x `[L, E]`; k and v from x, or from a memory m `[Lk, kdim]` (cross-attention)."""
    vs = [{"name": "x", "dim": E, "role": "input", "positions": [L]}]
    kv = "x"
    if kdim is not None:
        vs += [{"name": "mk", "dim": kdim, "role": "input", "positions": [Lk]},
               {"name": "mv", "dim": vdim, "role": "input", "positions": [Lk]}]
    vs.append({"name": "a", "dim": d, "role": "output", "kind": "attention", "causal": causal, "bias": bias})
    es = [{"src": "x", "dst": "a", "slot": "q"}]
    es += ([{"src": "mk", "dst": "a", "slot": "k"}, {"src": "mv", "dst": "a", "slot": "v"}] if kdim is not None
           else [{"src": kv, "dst": "a", "slot": "k"}, {"src": kv, "dst": "a", "slot": "v"}])
    return BaseGraph.from_dict({"vertices": vs, "edges": es})


def blocks(net, key, h, d):
    """The `[h d, F]` projection whose rows j*d..(j+1)*d are the lifted edge into head j."""
    src, dst = net.edge_index(key)
    W = net.edge_weight(key)
    assert sorted(dst.tolist()) == list(range(h)) and (src == 0).all()
    return torch.cat([W[int((dst == j).nonzero())] for j in range(h)])


CASES = [  # L, h, d, kdim, vdim, Lk, causal
    (5, 2, 3, None, None, None, False),
    (7, 3, 2, None, None, None, True),
    (4, 2, 4, 3, 5, 6, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
def test_fully_connected_attention_lift_equals_multihead_attention(case, impl):
    L, h, d, kdim, vdim, Lk, causal = CASES[case]
    E = h * d
    base = attention_base(L, E, d, kdim, vdim, causal, Lk=Lk)
    net = LiftedNetwork(base, fully_connected_lift(base, h), out_dim=E, readout_init="normal", readout_scale="sum",
                        seed=case, impl=impl, dtype=D)
    g = torch.Generator().manual_seed(case)
    with torch.no_grad():
        net.bias("a").copy_(torch.randn(net.bias("a").shape, generator=g, dtype=D))
    mha = torch.nn.MultiheadAttention(E, h, bias=True, batch_first=True, kdim=kdim, vdim=vdim, dtype=D)
    with torch.no_grad():
        q, k, v = (blocks(net, ("x" if s == "q" or kdim is None else f"m{s}", "a", s), h, d) for s in "qkv")
        if kdim is None:
            mha.in_proj_weight.copy_(torch.cat([q, k, v]))
        else:
            mha.q_proj_weight.copy_(q), mha.k_proj_weight.copy_(k), mha.v_proj_weight.copy_(v)
        mha.in_proj_bias.copy_(net.bias("a").permute(1, 0, 2).reshape(-1))  # [h, 3, d] -> q | k | v, head-major
        A = net.readout_weight("a")  # [h, E, d]: out_proj columns of head j
        mha.out_proj.weight.copy_(A.permute(1, 0, 2).reshape(E, E))
        mha.out_proj.bias.zero_()
    B = 3
    xq = torch.randn(B, L, E, generator=g, dtype=D)
    mem = None if kdim is None else (torch.randn(B, Lk, kdim, generator=g, dtype=D),
                                     torch.randn(B, Lk, vdim, generator=g, dtype=D))
    flat = torch.cat([xq.reshape(B, -1)] + ([] if mem is None else [m.reshape(B, -1) for m in mem]), 1)
    flat.requires_grad_()
    out = net(flat)  # [B, L, E]
    xt = xq.clone().requires_grad_()
    kt, vt = (xt, xt) if mem is None else (mem[0].clone().requires_grad_(), mem[1].clone().requires_grad_())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=D) if causal else None
    want, _ = mha(xt, kt, vt, need_weights=False, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    G = torch.randn(want.shape, generator=g, dtype=D)
    (out * G).sum().backward()
    (want * G).sum().backward()
    gx = [xt.grad] if mem is None else [xt.grad, kt.grad, vt.grad]
    torch.testing.assert_close(flat.grad, torch.cat([t.reshape(B, -1) for t in gx], 1), rtol=1e-10, atol=1e-12)
    # weight gradients, mapped the same way
    for s, grad in zip("qkv", ([mha.in_proj_weight.grad[i * E:(i + 1) * E] for i in range(3)] if kdim is None else
                                [mha.q_proj_weight.grad, mha.k_proj_weight.grad, mha.v_proj_weight.grad])):
        key = ("x" if s == "q" or kdim is None else f"m{s}", "a", s)
        src, dst = net.edge_index(key)
        for k_, j in enumerate(dst.tolist()):
            torch.testing.assert_close(net.edge_weight(key).grad[k_], grad[j * d:(j + 1) * d], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.bias("a").grad.permute(1, 0, 2).reshape(-1), mha.in_proj_bias.grad,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.readout_weight("a").grad.permute(1, 0, 2).reshape(E, E), mha.out_proj.weight.grad,
                               rtol=1e-10, atol=1e-12)


def test_fully_connected_token_edge_equals_embedding():
    V, L, s, d = 11, 6, 3, 4
    base = BaseGraph.from_dict({"vertices": [
        {"name": "t", "role": "input", "tokens": V, "positions": [L]},
        {"name": "e", "dim": d, "role": "output"}], "edges": [["t", "e"]]})
    assert base.in_dim == L and base.dim("t") == V
    net = LiftedNetwork(base, fully_connected_lift(base, s), readout_init="normal", dtype=D)
    W = net.edge_weight("t->e")  # [s, d, V]: member j's table
    emb = torch.nn.Embedding(V, s * d, dtype=D)
    with torch.no_grad():
        emb.weight.copy_(W.detach().permute(2, 0, 1).reshape(V, s * d))
    tok = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(0))
    acts = net.activations(tok.double())["e"]  # [s, d, B * L]
    want = emb(tok)  # [B, L, s d]
    got = acts.reshape(s, d, 5, L).permute(2, 3, 0, 1).reshape(5, L, s * d)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    G = torch.randn(want.shape, dtype=D)
    (got * G).sum().backward()
    (want * G).sum().backward()
    torch.testing.assert_close(W.grad.permute(2, 0, 1).reshape(V, s * d), emb.weight.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        net(torch.full((2, L), 11.0, dtype=D))


TRANSFORMERS = {
    "tokens_causal": lambda: BaseGraph.transformer(6, 4, 3, 2, tokens=9, causal=True, mixer_kernel=3, depth=2),
    "features_mean": lambda: BaseGraph.transformer(5, 3, 2, 3, in_dim=2, readout="mean", activation="relu"),
    "image_attention": lambda: BaseGraph.from_dict({"vertices": [
        {"name": "x", "dim": 2, "role": "input", "positions": [3, 4]},
        {"name": "c", "dim": 3, "activation": "tanh", "norm": "layer", "bias": True},
        {"name": "a", "dim": 2, "kind": "attention", "activation": "gelu"},
        {"name": "y", "dim": 2, "role": "output"}],
        "edges": [{"src": "x", "dst": "c", "kind": "conv", "kernel": [2, 3], "padding": [1, 1]},
                  {"src": "c", "dst": "a", "slot": "q"}, {"src": "c", "dst": "a", "slot": "k"},
                  {"src": "x", "dst": "a", "slot": "v", "kind": "conv", "kernel": [2, 3], "padding": 1},
                  {"src": "a", "dst": "y", "kind": "flatten"}, {"src": "c", "dst": "y", "kind": "mean"}]}),
}


@pytest.mark.parametrize("impl", ["reference", "blocked", "auto"])
@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_random_sparse_transformer_equals_independent_forward(name, impl):
    base = TRANSFORMERS[name]()
    lift = random_sparse_lift(base, 5, 2.2, seed=4, block_size=2)
    net = LiftedNetwork(base, lift, readout_init="normal", seed=2, impl=impl, dtype=D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(net.biases.values()) + list(net.norm_gains.values()) + list(net.norm_shifts.values()):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(4, base.in_dim, generator=g, dtype=D)
    if base.vertices["x"].tokens is not None:
        x = torch.randint(0, base.vertices["x"].tokens, x.shape, generator=g).double()
    want, ys = reference_forward(net, x)
    acts = net.activations(x)
    for v in base.order:
        if base.vertices[v].role == "input":
            continue
        got = acts[v].reshape(net.lift.n(v), base.dim(v), 4, *base.positions(v)).movedim(2, 1)
        torch.testing.assert_close(got, ys[v], rtol=1e-11, atol=1e-12, msg=lambda m: f"{v}: {m}")
    torch.testing.assert_close(net(x), want, rtol=1e-11, atol=1e-12)


def test_gradcheck_attention_and_norm():
    base = TRANSFORMERS["image_attention"]()
    net = LiftedNetwork(base, random_sparse_lift(base, 3, 2, seed=1), readout_init="normal", dtype=D)
    x = torch.randn(2, base.in_dim, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net(t), (x,))
    out = net(x)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_validation_messages():
    X = {"name": "x", "dim": 2, "role": "input", "positions": [4]}
    A = {"name": "a", "dim": 2, "role": "output", "kind": "attention"}

    def build(vs, es):
        return BaseGraph.from_dict({"vertices": vs, "edges": es})

    qkv = [{"src": "x", "dst": "a", "slot": s} for s in "qkv"]
    assert build([X, A], qkv).edges[0].key == ("x", "a", "q")
    with pytest.raises(GraphError, match=r"attention vertex 'a' has no in-edge for slot\(s\) \['v'\]"):
        build([X, A], qkv[:2])
    with pytest.raises(GraphError, match=r"edge x->a goes into attention vertex 'a' without a slot"):
        build([X, A], qkv + [["x", "a"]])
    with pytest.raises(GraphError, match=r"edge x->h:q has slot 'q' but 'h' is not an attention vertex"):
        build([X, {"name": "h", "dim": 2, "role": "output"}], [{"src": "x", "dst": "h", "slot": "q"}])
    with pytest.raises(GraphError, match=r"edge x->a has slot 'w': choose one of"):
        build([X, A], [{"src": "x", "dst": "a", "slot": "w"}])
    with pytest.raises(GraphError, match=r"attention vertex 'a' has norm 'layer': put the norm"):
        build([X, {**A, "norm": "layer"}], qkv)
    with pytest.raises(GraphError, match=r"attention vertex 'a' has no positions"):
        build([{**X, "positions": []}, A], qkv)
    with pytest.raises(GraphError, match=r"vertex 'h' is causal but not an attention vertex"):
        build([X, {"name": "h", "dim": 2, "role": "output", "causal": True}], [["x", "h"]])
    with pytest.raises(GraphError, match=r"vertex 'h': a layer norm over its 1 feature is constant"):
        build([X, {"name": "h", "dim": 1, "role": "output", "norm": "layer"}], [["x", "h"]])
    T = {"name": "t", "role": "input", "tokens": 5, "positions": [4]}
    with pytest.raises(GraphError, match=r"edge t->h out of token input 't' is conv"):
        build([T, {"name": "h", "dim": 2, "role": "output"}], [{"src": "t", "dst": "h", "kind": "conv", "kernel": 2}])
    with pytest.raises(GraphError, match=r"vertices\[0\] has tokens 0"):
        build([{**T, "tokens": 0}, {"name": "h", "dim": 2, "role": "output"}], [["t", "h"]])
    with pytest.raises(GraphError, match=r"input vertex 'x' has a vertex map"):
        build([{**X, "norm": "layer"}, {"name": "h", "dim": 2, "role": "output"}], [["x", "h"]])
    with pytest.raises(GraphError, match=r"transformer: give tokens .* or in_dim"):
        BaseGraph.transformer(4, 4, 2, 1)
    g = build([X, A], qkv)
    assert BaseGraph.from_dict(g.to_dict()).to_dict() == g.to_dict()
    assert g.edge("x->a:k").slot == "k" and g.edge(("x", "a", "v")).slot == "v"
