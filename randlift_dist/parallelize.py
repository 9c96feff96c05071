"""Sharding a lifted network over a layout, in one ordered step (the only collective set-up).

    plan = build_plan(lift, layout, strategy, exchange)   # collective: who owns and sends what
    comm = Communicator.create(plan, layout)               # collective: one group per exchanging edge
    net = LiftedNetwork(base, lift, plan, comm, **kw)      # local: no communication

`shard_network` runs the three; at world size 1 (or with no layout) the first two are local and
trivial, and the network is the plain lifted network.
"""

from __future__ import annotations

from .comm import Communicator
from .graph import BaseGraph
from .lift import Lift
from .model import LiftedNetwork
from .plan import ALLGATHER_THRESHOLD, build_plan


def shard_network(base: BaseGraph, lift: Lift, layout=None, strategy: str = "block", exchange: str = "auto",
                  allgather_threshold: float = ALLGATHER_THRESHOLD, topology: str = "stored",
                  **net_kwargs) -> LiftedNetwork:
    """This rank's shard of the lifted network (collective over the world when `layout` is sharded)."""
    plan = build_plan(lift, layout, strategy, exchange, allgather_threshold, topology)
    comm = Communicator() if layout is None else Communicator.create(plan, layout)
    return LiftedNetwork(base, lift, plan, comm, **net_kwargs)
