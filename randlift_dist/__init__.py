"""randlift_dist: distributed training of random sparse lifts of small base networks.

Public API (see README.md): `BaseGraph`, `random_sparse_lift`, `fully_connected_lift`,
`LiftedNetwork`; sharding: `Layout` (process groups), `build_plan` (collective: what each rank
owns and exchanges), `Communicator` and `shard_network` (all three steps); a trained run:
`load_run` (`runs.py`; one self-contained file: `randlift_dist.export`). deepspeed, wandb and triton
are never imported here: only where they are used.
"""
import warnings

# `python -m randlift_dist.partition` (imported below, so runpy would warn first) answers with one line
warnings.filterwarnings("ignore", r"'randlift_dist\.partition' found in sys\.modules", RuntimeWarning)

from .comm import Communicator
from .graph import BaseGraph, Edge, GraphError, Vertex
from .layout import Layout, LayoutError
from .lift import Lift, LiftError, fully_connected_lift, random_sparse_lift
from .model import LiftedNetwork
from .parallelize import shard_network
from .partition import Ownership, PartitionError, make_partition
from .plan import ShardPlan, build_plan
from .runs import LoadedRun, load_run

__all__ = [
    "BaseGraph", "Edge", "GraphError", "Vertex", "Lift", "LiftError", "fully_connected_lift",
    "random_sparse_lift", "LiftedNetwork", "Layout", "LayoutError", "ShardPlan", "build_plan", "Communicator",
    "shard_network", "Ownership", "PartitionError", "make_partition", "LoadedRun", "load_run",
]
__version__ = "0.1.0"
