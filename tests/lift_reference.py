"""An independent, slow forward of a lifted network with positions, written from the definitions.

It reads the network only through its public introspection (`edge_index`, `edge_weight`, `bias`,
`norm_gain`, `norm_shift`, `readout_weight`) and the base graph's declared shapes, and computes one
lifted edge at a time with torch's own functional ops in float64: `F.conv1d/conv2d` for a conv
edge (its weight `[d_v, d_u * taps]` read as torch's `[d_v, d_u, *kernel]`), `F.max_pool*/avg_pool*`
then the edge's matrix for pooling, a mean, one position or torch's `flatten(1)` then the matrix,
a one-hot lookup for token inputs, a layer norm with `F.layer_norm`, and attention per member and
sample with an explicit softmax. Activations are `{v: [n_v, B, d_v, *P_v]}` (torch's layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {"identity": lambda z: z, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _edge_message(e, y: torch.Tensor, W: torch.Tensor, base) -> torch.Tensor:
    """One lifted edge's message: y `[B, d_u, *P_u]`, W `[d_v, F]` -> `[B, d_v, *P_v]`."""
    d_v = W.shape[0]
    if e.kind == "conv":
        w = e.window
        k = W.view(d_v, y.shape[1], *w.kernel)
        fn = F.conv1d if len(w.kernel) == 1 else F.conv2d
        return fn(y, k, stride=w.stride, padding=w.padding, dilation=w.dilation)
    if e.kind == "pool":
        w = e.window
        if e.pool == "max":
            fn = F.max_pool1d if len(w.kernel) == 1 else F.max_pool2d
            p = fn(y, w.kernel, w.stride, w.padding, w.dilation)
        else:
            fn = F.avg_pool1d if len(w.kernel) == 1 else F.avg_pool2d
            p = fn(y, w.kernel, w.stride, w.padding)
        return torch.einsum("oc,bc...->bo...", W, p)
    if e.kind == "mean":
        return y.flatten(2).mean(2) @ W.t()
    if e.kind == "select":
        idx = tuple(i % n for i, n in zip(e.index, y.shape[2:]))
        return y[(slice(None), slice(None), *idx)] @ W.t()
    if e.kind == "flatten":
        return y.flatten(1) @ W.t()
    return torch.einsum("oc,bc...->bo...", W, y)  # linear at every position


def _attention(q, k, v, causal: bool) -> torch.Tensor:
    """Per sample, q `[B, d, *P]`, k and v `[B, d, *Pk]` -> `softmax(Q K^T / sqrt(d)) V` over the
    flattened positions, `[B, d, *P]`."""
    B, d = q.shape[:2]
    Q, K, V = (t.flatten(2).transpose(1, 2) for t in (q, k, v))  # [B, P, d]
    s = Q @ K.transpose(1, 2) / math.sqrt(d)
    if causal:
        P = s.shape[-1]
        s = s.masked_fill(torch.ones(P, P, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, dim=-1) @ V  # [B, P, d]
    return out.transpose(1, 2).reshape(q.shape)


def reference_forward(net, x: torch.Tensor):
    """`(output [B, *P_out, out_dim], {v: [n_v, B, d_v, *P_v]})` of `net` (one process) on `x`."""
    base = net.base
    x = x.double()
    B = x.shape[0]
    ys, off = {}, 0
    for v in base.inputs:
        P, d = base.positions(v), base.dim(v)
        n = net.lift.n(v)
        if base.vertices[v].tokens is not None:
            cols = x[:, off:off + math.prod(P)].round().long()  # [B, P]
            onehot = F.one_hot(cols, d).double().reshape(B, *P, d)  # the one-hot vector of each id
            ys[v] = onehot.movedim(-1, 1).unsqueeze(0).expand(n, B, d, *P)
            off += math.prod(P)
        else:
            block = x[:, off:off + math.prod(P) * d].reshape(B, *P, d)  # position-major columns
            ys[v] = block.movedim(-1, 1).unsqueeze(0).expand(n, B, d, *P)
            off += math.prod(P) * d
    for v in base.order:
        if v in ys:
            continue
        vx, n, d, P = base.vertices[v], net.lift.n(v), base.dim(v), base.positions(v)
        z = {}
        for e in base.in_edges(v):
            src, dst = net.edge_index(e.key)
            W = net.edge_weight(e.key).detach().double()
            for k in range(src.numel()):
                msg = _edge_message(e, ys[e.src][int(src[k])], W[k], base)
                j = int(dst[k])
                z.setdefault(e.slot, torch.zeros(n, *msg.shape, dtype=torch.float64))
                z[e.slot][j] += msg
        for slot in ([None] if vx.kind == "sum" else ["q", "k", "v"]):
            Ps = base.key_positions(v) if slot in ("k", "v") else P
            z.setdefault(slot, torch.zeros(n, B, d, *Ps, dtype=torch.float64))
        b = net.bias(v)
        out = torch.zeros(n, B, d, *P, dtype=torch.float64)
        for j in range(n):
            if vx.kind == "attention":
                q, k_, val = (z[s][j] + (0 if b is None else b[j, i].detach().double().view(1, d, *([1] * (z[s].dim() - 3))))
                              for i, s in enumerate("qkv"))
                out[j] = ACT[vx.activation](_attention(q, k_, val, vx.causal))
                continue
            zz = z[None][j] + (0 if b is None else b[j].detach().double().view(1, d, *([1] * len(P))))
            if vx.norm == "layer":
                g, s = net.norm_gain(v)[j].detach().double(), net.norm_shift(v)[j].detach().double()
                zz = F.layer_norm(zz.movedim(1, -1), (d,), g, s, eps=1e-5).movedim(-1, 1)
            out[j] = ACT[vx.activation](zz)
        ys[v] = out
    N = sum(net.lift.n(t) for t in base.outputs)
    c = {"sum": 1.0, "mean": 1.0 / N, "sqrt": 1.0 / math.sqrt(N)}[net.readout_scale]
    res = 0.0
    for t in base.outputs:
        A = net.readout_weight(t).detach().double()  # [n_t, out_dim, d_t]
        for j in range(net.lift.n(t)):
            res = res + torch.einsum("od,bd...->b...o", A[j], ys[t][j])
    return c * res, ys
