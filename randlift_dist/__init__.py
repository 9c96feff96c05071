"""randlift_dist: distributed training of random sparse lifts of small base networks.

Public API (see README.md): `BaseGraph`, `random_sparse_lift`, `fully_connected_lift`,
`LiftedNetwork`; sharding through `Layout` and `Shard`. deepspeed, wandb and triton are never
imported here: only where they are used.
"""
from .graph import BaseGraph, Edge, GraphError, Vertex
from .layout import Layout, LayoutError
from .lift import Lift, LiftError, fully_connected_lift, random_sparse_lift
from .model import LiftedNetwork


def __getattr__(name):  # partition is imported on first use, so `python -m randlift_dist.partition` runs cleanly
    if name in ("PartitionError", "Shard", "make_partition"):
        from . import partition

        return getattr(partition, name)
    raise AttributeError(f"module 'randlift_dist' has no attribute {name!r}")

__all__ = [
    "BaseGraph", "Edge", "GraphError", "Vertex", "Lift", "LiftError", "fully_connected_lift",
    "random_sparse_lift", "LiftedNetwork", "Layout", "LayoutError", "Shard", "PartitionError",
    "make_partition",
]
__version__ = "0.1.0"
