"""Edges out of a token input: a lifted linear edge from a one-hot vertex is a table lookup.

A token input vertex holds one token id per position (conceptually the one-hot vector of width
V); a lifted edge `i -> j` over an edge out of it carries a weight `[d_v, V]`, and its message at a
position is the column of that weight named by the token: an embedding table per lifted edge. All
members of an input fibre hold the same tokens, so a target's messages sum to the column of the
sum of its in-edges' tables: `z[j] = (sum_{e -> j} W_e)[:, tok]`.

`embed_aggregate(tok, w, rows, n_rows)`: `tok` int64 `[B * P]`, `w` `[m, d_v, V]`, `rows` int64 `[m]`
the target row of each edge -> `z [n_rows, d_v, B * P]`. Backward: `gS = scatter of gz over the
token ids` `[n_rows, d_v, V]`, `gw[e] = gS[rows[e]]`. Saves the tokens and the rows, nothing of size
`[m, d_v, B * P]`; deterministic on CPU (`index_add_` is a serial sum there; on CUDA atomic).
"""

from __future__ import annotations

import torch


class _Embed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, tok, rows, n_rows):
        ctx.save_for_backward(tok, rows)
        ctx.n_rows, ctx.v = n_rows, w.shape[2]
        tables = w.new_zeros(n_rows, w.shape[1], w.shape[2]).index_add_(0, rows, w)  # [n_rows, d_v, V]
        return tables.index_select(2, tok)  # [n_rows, d_v, B * P]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        tok, rows = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        gs = gz.new_zeros(ctx.n_rows, gz.shape[1], ctx.v).index_add_(2, tok, gz.contiguous())
        return gs.index_select(0, rows), None, None, None


def embed_aggregate(tok: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """See the module doc. Token ids outside `[0, V)` are refused in one line."""
    V = w.shape[2]
    if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= V):
        raise ValueError(f"token ids must lie in [0, {V}) (got {int(tok.min())}..{int(tok.max())}): check the "
                         "data or the input vertex's tokens")
    return _Embed.apply(w, tok, rows.to(tok.device), n_rows)
