"""Vertex maps of a lifted network: what a lifted vertex does with its in-edges' messages.

Every map here acts on one fibre member's own rows (`[n, d, B * P]`, member by member, position
fastest) and needs no communication:

- `sum` vertices: `y = act(norm(sum_e z_e + b))`, `norm` none or a layer norm over the member's d
  features at each position (`layer_norm`, with a gain and a shift per member and feature). A norm
  over the whole fibre would mix the members of a fibre: it would not be a perceptron vertex map,
  would break the locality of the lift (a member's value would depend on vertices it has no edge
  from), and sharded it would need a collective per vertex.
- `attention` vertices: per member (a head) and sample, `y = act(softmax(Q K^T / sqrt(d)) V)` over
  the positions (queries at the vertex's positions, keys and values at theirs: cross-attention
  when they differ), with Q, K, V the sums of the messages of the q, k and v in-edges (plus a bias per
  slot); causal: position p attends to positions <= p (row-major order of the positions).
  Computed by `scaled_dot_product_attention` on `[n, B, P, d]` copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def layer_norm(z: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """Normalise each member's d features at every position: `z [n, d, X]`, gain/shift `[n, d]`."""
    mu = z.mean(1, keepdim=True)
    zc = z - mu
    var = zc.pow(2).mean(1, keepdim=True)  # biased, as torch.nn.LayerNorm
    return zc * torch.rsqrt(var + eps) * gain.unsqueeze(-1) + shift.unsqueeze(-1)


def _heads(z: torch.Tensor, P: int) -> torch.Tensor:
    """`[n, d, B * P] -> [n, B, P, d]` (one attention problem per member and sample). Four dims:
    with three, torch's CPU attention takes its math path, which keeps the `[P, Pk]` probabilities
    of every problem for the backward; with four it takes the flash path (the output and the
    log-sum-exp only)."""
    n, d, cols = z.shape
    return z.view(n, d, cols // P, P).permute(0, 2, 3, 1).contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: int, Pk: int, causal: bool) -> torch.Tensor:
    """`softmax(Q K^T / sqrt(d)) V` per member and sample: q `[n, d, B * P]`, k and v `[n, d, B * Pk]`
    (P query and Pk key positions) -> `[n, d, B * P]`."""
    n, d, cols = q.shape
    out = F.scaled_dot_product_attention(_heads(q, P), _heads(k, Pk), _heads(v, Pk), is_causal=causal)
    return out.permute(0, 3, 1, 2).reshape(n, d, cols)  # [n, B, P, d] -> [n, d, B * P]
