"""Convolution edges on the aggregation kernels: unfold the sources, aggregate, never keep the unfold.

Activations with positions are `[n, d, B * P]` (P = prod(positions), position fastest), so a
member's rows stay contiguous (the exchange moves whole `[d, B * P]` blocks) and a position-wise
linear edge is the plain kernel on a batch of `B * P` columns. A conv edge is a position-wise
linear edge on the *unfolded* sources: `unfold(y)` is `[n, d * taps, B * P_out]` (feature index
`c * taps + t`: channel-major, tap `t` the row-major kernel offset), and the lifted edge's weight
`[d_v, d * taps]` multiplies it, so every kernel (`reference`, `csr`, `blocked`, `triton`, and the
regenerated topology) serves conv edges unchanged.

`windowed_aggregate(y, w, geom, agg)` is one autograd function that saves only `y` and `w`: the
k-fold unfolded copy is made in the forward, used and dropped, and made again in the backward (chunk
by chunk over the batch when it would exceed `workspace.WINDOW_CHUNK_ELEMS`), so no
`[sources, d * taps, B * P]` tensor (let alone a per-edge one) lives between forward and backward.
`unfold` is `taps` strided copies out of the zero-padded input; `fold`, its adjoint, adds them back
tap by tap (each tap's positions are distinct, so the sums are deterministic on every device).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F

from . import workspace as ws
from .csr import CSR
from .kernels import agg_backward, agg_forward
from .regen import regen_forward, regen_grads


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A sliding window from `in_pos` to `out_pos` positions (1 or 2 dims, one entry per dim)."""

    in_pos: tuple[int, ...]
    out_pos: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def p_in(self) -> int:
        return math.prod(self.in_pos)

    @property
    def p_out(self) -> int:
        return math.prod(self.out_pos)

    def tap_slices(self):
        """Per tap (row-major kernel offsets), the slices of the padded input it reads."""
        for off in itertools.product(*(range(k) for k in self.kernel)):
            yield tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                        for o, d, s, n in zip(off, self.dilation, self.stride, self.out_pos))


def unfold(y: torch.Tensor, g: Geometry) -> torch.Tensor:
    """`[n, d, b * P_in]` (the last dim may be a strided slice) -> `[n, d * taps, b * P_out]`."""
    n, d, cols = y.shape
    b = cols // g.p_in
    x = y.unflatten(2, (b, *g.in_pos))  # [n, d, b, *in]
    if any(g.padding):
        pad = [p for q in reversed(g.padding) for p in (q, q)]
        x = F.pad(x, pad)
    u = y.new_empty(n, d, g.taps, b, *g.out_pos)
    for t, sl in enumerate(g.tap_slices()):
        u[:, :, t].copy_(x[(Ellipsis, *sl)])
    return u.view(n, d * g.taps, b * g.p_out)


def fold(gu: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The adjoint of `unfold`: `[n, d * taps, b * P_out]` -> `[n, d, b * P_in]`."""
    n, dk, cols = gu.shape
    d, b = dk // g.taps, cols // g.p_out
    u = gu.view(n, d, g.taps, b, *g.out_pos)
    padded = tuple(p + 2 * q for p, q in zip(g.in_pos, g.padding))
    gx = gu.new_zeros(n, d, b, *padded)
    for t, sl in enumerate(g.tap_slices()):
        gx[(Ellipsis, *sl)] += u[:, :, t]
    if any(g.padding):
        gx = gx[(Ellipsis, *(slice(q, q + p) for p, q in zip(g.in_pos, g.padding)))].contiguous()
    return gx.view(n, d, b * g.p_in)


class Stored:
    """Aggregation over a stored CSR with one of the kernels (`ops.kernels`)."""

    def __init__(self, csr: CSR, impl: str):
        self.csr, self.impl = csr, impl

    def forward(self, y, w):
        return agg_forward(y, w, self.csr, self.impl)

    def grads(self, gz, y, w, need_y, need_w):
        return agg_backward(gz, y, w, self.csr, self.impl, need_y, need_w)


class Regenerated:
    """Aggregation over a regenerated topology (`ops.regen`): the edges are drawn again per call."""

    def __init__(self, topology):
        self.topology = topology

    def forward(self, y, w):
        return regen_forward(y, w, self.topology)

    def grads(self, gz, y, w, need_y, need_w):
        return regen_grads(gz, y, w, self.topology, need_y, need_w)


def _batch_chunks(y: torch.Tensor, g: Geometry) -> list[tuple[int, int]]:
    """Sample ranges whose unfolded chunk holds at most the chunk budget (at least one sample)."""
    n, d, cols = y.shape
    b = cols // g.p_in
    per_sample = max(1, n * d * g.taps * g.p_out)
    budget = ws.WINDOW_CHUNK_ELEMS if y.device.type == "cpu" else ws.WINDOW_CHUNK_ELEMS_ACCEL
    step = max(1, budget // per_sample)
    return [(s, min(b, s + step)) for s in range(0, b, step)] or [(0, 0)]


class _Windowed(torch.autograd.Function):
    """`agg(unfold(y), w)`, saving only y and w (see the module doc)."""

    @staticmethod
    def forward(ctx, y, w, g: Geometry, agg):
        ctx.g, ctx.agg = g, agg
        ctx.save_for_backward(y, w)
        chunks = _batch_chunks(y, g)
        if len(chunks) == 1:
            return agg.forward(unfold(y, g), w)
        z = None
        for b0, b1 in chunks:
            zc = agg.forward(unfold(y[:, :, b0 * g.p_in:b1 * g.p_in], g), w)  # [n_v, d_v, (b1-b0) P_out]
            if z is None:
                z = zc.new_empty(zc.shape[0], zc.shape[1], y.shape[2] // g.p_in * g.p_out)
            z[:, :, b0 * g.p_out:b1 * g.p_out] = zc
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        y, w = ctx.saved_tensors
        g, agg = ctx.g, ctx.agg
        need_y, need_w = ctx.needs_input_grad[:2]
        chunks = _batch_chunks(y, g)
        if len(chunks) == 1:
            gu, gw = agg.grads(gz, unfold(y, g), w, need_y, need_w)
            return (fold(gu, g) if need_y else None), gw, None, None
        gy = torch.empty_like(y) if need_y else None
        gw = torch.zeros_like(w) if need_w else None
        for b0, b1 in chunks:
            i0, i1, o0, o1 = b0 * g.p_in, b1 * g.p_in, b0 * g.p_out, b1 * g.p_out
            gu, gwc = agg.grads(gz[:, :, o0:o1], unfold(y[:, :, i0:i1], g), w, need_y, need_w)
            if need_y:
                gy[:, :, i0:i1] = fold(gu, g)
            if need_w:
                gw += gwc
            del gu, gwc
        return gy, gw, None, None


def windowed_aggregate(y: torch.Tensor, w: torch.Tensor, g: Geometry, agg) -> torch.Tensor:
    """Conv edges: `z = agg(unfold(y), w)`; y `[n_u, d_u, B * P_in]`, w `[m, d_v, d_u * taps]` ->
    z `[n_v, d_v, B * P_out]`; `agg` is `Stored(csr, impl)` or `Regenerated(topology)`."""
    if w.shape[2] != y.shape[1] * g.taps or y.shape[2] % g.p_in:
        raise ValueError(f"windowed_aggregate: y {tuple(y.shape)} and w {tuple(w.shape)} do not fit a window of "
                         f"{g.taps} taps over {g.in_pos} positions")
    return _Windowed.apply(y, w.contiguous(), g, agg)
