"""Communication, and only communication: the collectives of a sharded lift as autograd pairs.

Each collective is a pair whose backward is the mirror collective, and each returns early when its
group has one rank:

- `copy_to_lift_group(x)`: forward identity (x is replicated on every rank of the lift-parallel
  group, e.g. the input batch), backward all-reduce (sum of the shards' gradients);
- `reduce_from_lift_group(x)`: forward all-reduce (the readout's partial sums), backward identity
  (every rank then holds the same output and the same loss);
- `HaloExchange`: the exchange of one base edge (see its doc): forward one collective (all-to-all
  with exact splits, or all-gather), backward the mirror one (all-to-all with the splits swapped,
  or reduce-scatter), each launched asynchronously so that local work overlaps it.

`Communicator.create(plan, layout)` is the collective set-up step: it makes one process group per
exchanging base edge (so collectives of different edges can never be matched with each other,
whatever order autograd runs the backward in). After it, building the network communicates
nothing. Bytes are counted from the buffers actually handed to the collectives.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .plan import Exchange, ShardPlan

# torch >= 2.13 renamed the flat-tensor collectives; older releases have only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclasses.dataclass
class CommStats:
    """Bytes this rank handed to collectives for other ranks (padding included) and time waited."""

    bytes_forward: int = 0
    bytes_backward: int = 0
    wait_s: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.bytes_forward + self.bytes_backward

    def reset(self) -> None:
        self.bytes_forward = self.bytes_backward = 0
        self.wait_s = 0.0


def _single(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


# ---------------------------------------------------------------- the lift-group pair
class _CopyToLiftGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)  # one layout on every rank: gloo sums raw memory
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class _ReduceFromLiftGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone(memory_format=torch.contiguous_format)  # the partial sums may differ in layout by rank
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_lift_group(x: torch.Tensor, group) -> torch.Tensor:
    """Use a replicated tensor in a sharded computation: its gradient is summed over the shards."""
    if _single(group) or not x.requires_grad:
        return x
    return _CopyToLiftGroup.apply(x, group)


def reduce_from_lift_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over the shards; every rank gets the sum (backward: identity)."""
    if _single(group):
        return x
    return _ReduceFromLiftGroup.apply(x, group)


# ---------------------------------------------------------------- the halo exchange
@dataclasses.dataclass
class _InFlight:
    """One exchange between its start and its finish (forward), and back (backward).

    Shapes: `y_shape = (n_own, d_u, B)`; forward `send` `[S, d_u, B]` (alltoall) or
    `[max_own, d_u, B]` (allgather), `recv` `[R, d_u, B]` or `[P * max_own, d_u, B]`; backward
    `grad_send` is `recv`'s gradient, `grad_recv` has `send`'s shape."""

    y_shape: tuple[int, int, int]
    work: Any = None
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    grad_work: Any = None
    grad_send: torch.Tensor | None = None
    grad_recv: torch.Tensor | None = None


class _Start(torch.autograd.Function):
    """Forward: launch the exchange of `y_own`. Backward: wait for the gradient's return and add
    it into the owners' rows. Returns a 0-d token that orders `_Finish` after it in the graph."""

    @staticmethod
    def forward(ctx, y_own, halo: "HaloExchange", box: _InFlight):
        ctx.halo, ctx.box = halo, box
        halo._launch(y_own, box)
        return y_own.new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        return ctx.halo._land_grad(ctx.box), None, None


class _Finish(torch.autograd.Function):
    """Forward: wait for the exchange and return the received rows. Backward: launch the mirror
    collective of their gradient (so it flies while autograd computes other gradients)."""

    @staticmethod
    def forward(ctx, _token, halo: "HaloExchange", box: _InFlight):
        ctx.halo, ctx.box = halo, box
        return halo._land(box)

    @staticmethod
    def backward(ctx, g):
        ctx.halo._launch_grad(g.contiguous(), ctx.box)
        return g.new_zeros(()), None, None


class HaloExchange(nn.Module):
    """The exchange of one base edge on one rank: `finish(start(y_own))` gives the received rows.

    `y_own` is this rank's source activations `[n_own, d_u, B]`. Received, in `alltoall` mode: the
    halo `[R, d_u, B]` (rows `exchange.halo_global`, grouped by owner); in `allgather` mode: every
    rank's rows padded to `max_own`, `[P * max_own, d_u, B]` laid out `[rank, row]`. Between the two
    calls the collective is in flight and the caller computes the local edges. The backward sends
    the gradient of the received rows back (all-to-all with the splits swapped, or reduce-scatter)
    and adds it into the owners' rows. `send_idx` is a buffer: it moves with the module.
    """

    def __init__(self, exchange: Exchange, group, stats: CommStats):
        super().__init__()
        self.mode, self.world_size, self.max_own = exchange.mode, exchange.world_size, exchange.max_own
        self.send_splits, self.recv_splits = list(exchange.send_splits), list(exchange.recv_splits)
        self.group, self.stats = group, stats
        self.register_buffer("send_idx", torch.from_numpy(np.ascontiguousarray(exchange.send_idx)), persistent=False)

    def start(self, y_own: torch.Tensor) -> tuple[torch.Tensor, _InFlight]:
        box = _InFlight(tuple(y_own.shape))
        return _Start.apply(y_own, self, box), box

    def finish(self, started: tuple[torch.Tensor, _InFlight]) -> torch.Tensor:
        token, box = started
        return _Finish.apply(token, self, box)

    def _peers(self, t: torch.Tensor) -> int:
        """Bytes of `t` that reach other ranks (an all-gather sends its buffer to P - 1 of them)."""
        n = t.numel() * t.element_size()
        return n if self.mode == "alltoall" else n * (self.world_size - 1)

    def _wait(self, work) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.stats.wait_s += time.perf_counter() - t0

    def _launch(self, y: torch.Tensor, box: _InFlight) -> None:
        _, d, B = y.shape
        if self.mode == "alltoall":
            box.send = y.index_select(0, self.send_idx)  # [S, d, B]
            box.recv = y.new_empty(sum(self.recv_splits), d, B)
            box.work = dist.all_to_all_single(box.recv, box.send, self.recv_splits, self.send_splits,
                                              group=self.group, async_op=True)
        else:
            box.send = y.new_zeros(self.max_own, d, B)
            box.send[: y.shape[0]] = y
            box.recv = y.new_empty(self.world_size * self.max_own, d, B)
            box.work = _all_gather_single(box.recv, box.send, group=self.group, async_op=True)
        self.stats.bytes_forward += self._peers(box.send)

    def _land(self, box: _InFlight) -> torch.Tensor:
        self._wait(box.work)
        recv, box.work, box.send, box.recv = box.recv, None, None, None
        return recv

    def _launch_grad(self, g: torch.Tensor, box: _InFlight) -> None:
        _, d, B = box.y_shape
        box.grad_send = g
        if self.mode == "alltoall":
            box.grad_recv = g.new_empty(sum(self.send_splits), d, B)
            box.grad_work = dist.all_to_all_single(box.grad_recv, g, self.send_splits, self.recv_splits,
                                                   group=self.group, async_op=True)
        else:
            box.grad_recv = g.new_empty(self.max_own, d, B)
            box.grad_work = _reduce_scatter_single(box.grad_recv, g, op=dist.ReduceOp.SUM,
                                                   group=self.group, async_op=True)
        self.stats.bytes_backward += g.numel() * g.element_size() if self.mode == "alltoall" else \
            self._peers(box.grad_recv)

    def _land_grad(self, box: _InFlight) -> torch.Tensor:
        self._wait(box.grad_work)
        n = box.y_shape[0]
        if self.mode == "alltoall":
            gy = box.grad_recv.new_zeros(box.y_shape)
            gy.index_add_(0, self.send_idx, box.grad_recv)
        else:
            gy = box.grad_recv[:n]
        box.grad_work = box.grad_send = box.grad_recv = None
        return gy


# ---------------------------------------------------------------- set-up
class Communicator:
    """The lift-parallel group, one private group per exchanging base edge, and the byte counters."""

    def __init__(self, lift_group=None, edge_groups: dict | None = None):
        self.lift_group = lift_group
        self.edge_groups = edge_groups or {}
        self.stats = CommStats()

    @classmethod
    def create(cls, plan: ShardPlan, layout) -> "Communicator":
        """Collective over the whole world: `new_group` is, so every rank creates the groups of
        every lift-parallel group, in the same order, and keeps its own."""
        if plan.world_size == 1:
            return cls()
        backend = dist.get_backend(layout.lift_group)
        groups = {}
        for key, ep in plan.edges.items():
            if ep.exchange is None:
                continue
            for ranks in layout.lift_group_ranks():
                g = dist.new_group(ranks=list(ranks), backend=backend)
                if dist.get_rank() in ranks:
                    groups[key] = g
        return cls(layout.lift_group, groups)

    def halo_exchange(self, key: tuple[str, str], exchange: Exchange) -> HaloExchange:
        if key not in self.edge_groups:
            raise ValueError(f"no process group for base edge {key[0]}->{key[1]}: build the Communicator "
                             "from the same plan as the network (Communicator.create(plan, layout))")
        return HaloExchange(exchange, self.edge_groups[key], self.stats)
