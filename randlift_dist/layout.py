"""Process-group layout: `world = lift_parallel x data_parallel`.

Ranks are laid out lift-parallel-major: rank `r` is lift-parallel index `r % L` of data-parallel
replica `r // L`, so the ranks of one lift-parallel group are consecutive (same node first).
`Layout` owns the degrees (validated against the world size), the backend and the groups.
World size 1 needs no process group at all.

Where this process sits in the world (torchrun or SLURM variables) is read by `launch_env`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout  # not re-exported by torch.distributed

from .launch_env import discover_env, rendezvous_address


class LayoutError(ValueError):
    """The parallel layout does not fit the world; the message names the value and the fix."""


def check_degrees(world_size: int, lift_parallel: int) -> int:
    """The data-parallel degree for a lift-parallel degree, or a clear error."""
    if isinstance(lift_parallel, bool) or not isinstance(lift_parallel, int) or lift_parallel < 1:
        raise LayoutError(f"parallel.lift_parallel={lift_parallel!r}: must be a positive integer")
    if world_size % lift_parallel:
        raise LayoutError(
            f"parallel.lift_parallel={lift_parallel} does not divide the world size {world_size}: "
            f"choose a divisor of {world_size} (world = lift_parallel x data_parallel)")
    return world_size // lift_parallel


@dataclasses.dataclass
class Layout:
    """Degrees, this rank's coordinates and the process groups of a run."""

    world_size: int = 1
    rank: int = 0
    lift_parallel: int = 1
    local_rank: int = 0
    backend: str | None = None
    lift_group: Any = None
    data_group: Any = None

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.lift_parallel

    @property
    def lift_rank(self) -> int:
        return self.rank % self.lift_parallel

    @property
    def data_rank(self) -> int:
        return self.rank // self.lift_parallel

    def describe(self) -> str:
        return (f"world {self.world_size} = lift_parallel {self.lift_parallel} x data_parallel "
                f"{self.data_parallel} (backend {self.backend or 'none'})")

    @classmethod
    def create(cls, lift_parallel: int = 1, backend: str | None = None, timeout_s: float = 600.0,
               need_group: bool = False) -> "Layout":
        """Read the environment, check the degrees, start the process group and make the groups.

        The degrees are validated before any process group starts. At world size 1 no group is
        started unless `need_group` (DeepSpeed wants one); it then listens on a free local port.
        """
        rank, world_size, local_rank = discover_env()
        check_degrees(world_size, lift_parallel)
        layout = cls(world_size, rank, lift_parallel, local_rank)
        if world_size == 1 and not dist.is_initialized():
            if not need_group:
                return layout
            if "MASTER_PORT" not in os.environ:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = rendezvous_address()
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world_size))
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        layout.backend = dist.get_backend()
        layout._make_groups()
        return layout

    @classmethod
    def from_initialized(cls, lift_parallel: int) -> "Layout":
        """A layout over an already initialised default process group (tests, notebooks)."""
        world_size, rank = dist.get_world_size(), dist.get_rank()
        check_degrees(world_size, lift_parallel)
        layout = cls(world_size, rank, lift_parallel, rank, dist.get_backend())
        layout._make_groups()
        return layout

    def lift_group_ranks(self) -> list[list[int]]:
        """Global ranks of every lift-parallel group (one per data-parallel replica)."""
        L = self.lift_parallel
        return [list(range(d * L, (d + 1) * L)) for d in range(self.data_parallel)]

    def data_group_ranks(self) -> list[list[int]]:
        """Global ranks of every data-parallel group (one per lift-parallel index)."""
        return [list(range(l, self.world_size, self.lift_parallel)) for l in range(self.lift_parallel)]

    def _make_groups(self) -> None:
        # new_group is collective over the world: every rank creates every group, in the same order
        for d, ranks in enumerate(self.lift_group_ranks()):
            g = dist.new_group(ranks)
            if d == self.data_rank:
                self.lift_group = g
        for l, ranks in enumerate(self.data_group_ranks()):
            g = dist.new_group(ranks)
            if l == self.lift_rank:
                self.data_group = g

    def set_timeout(self, seconds: float, extra_groups=()) -> None:
        """The collective timeout of the world, its lift and data groups and `extra_groups`: a peer
        that stops answering for this long makes the waiting collective raise instead of hang."""
        if not dist.is_initialized():
            return
        delta = datetime.timedelta(seconds=seconds)
        for g in [None, self.lift_group, self.data_group, *extra_groups]:
            _set_pg_timeout(delta, g)

    def device(self) -> torch.device:
        if self.backend == "nccl" or (self.backend is None and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")
