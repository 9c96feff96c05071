"""Process-group layout: `world = lift_parallel x data_parallel`.

Ranks are laid out lift-parallel-major: rank `r` is lift-parallel index `r % L` of data-parallel
replica `r // L`, so the ranks of one lift-parallel group are consecutive (same node first).
`Layout` owns the degrees (validated against the world size), the backend and the groups.
World size 1 needs no process group at all.

Rank discovery prefers torchrun's `RANK` / `WORLD_SIZE` / `LOCAL_RANK` over SLURM's
`SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID` (under `srun torchrun` every worker inherits
`SLURM_PROCID=0`), so `python -m ...` works under torchrun, under `srun` alone, and bare. SLURM's
variables count only inside a job step (`SLURM_STEP_ID` set, i.e. under `srun`): a batch script
also carries `SLURM_PROCID=0` and `SLURM_NTASKS`, and a bare `python` there is one process.
Under a plain `srun` the rendezvous defaults to the first host of the step's node list and a port
derived from the job id (`slurm_master_port`); set MASTER_ADDR / MASTER_PORT to override.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """The parallel layout does not fit the world; the message names the value and the fix."""


def _in_slurm_step(env) -> bool:
    """True inside a task that `srun` started (the batch script itself is not a step)."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def _slurm_ntasks(env) -> int:
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def discover_env() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` from torchrun, else a SLURM step, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if _in_slurm_step(env) and _slurm_ntasks(env) > 1:
        return int(env["SLURM_PROCID"]), _slurm_ntasks(env), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list (`scontrol show hostnames` in Python).

    `"gpu[001-003,007],login1,rack[1-2]-n[1-2]"` -> `gpu001, gpu002, gpu003, gpu007, login1,
    rack1-n1, rack1-n2, rack2-n1, rack2-n2` (zero padding kept, order as written).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        # an item is text with bracket groups: "rack[1-2]-n[01-02]" -> ["rack", "1-2", "-n", "01-02", ""]
        parts = re.split(r"\[([^\]]*)\]", item)
        names = [""]
        for i, part in enumerate(parts):
            if i % 2 == 0:
                names = [n + part for n in names]
            else:
                names = [n + choice for n in names for choice in _expand_ranges(part, nodelist)]
        hosts += names
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [it for it in items if it]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LayoutError(f"SLURM node list {nodelist!r}: cannot read the range {r!r}; "
                              "set MASTER_ADDR to the first node's address")
        width = len(lo)
        out += [str(k).zfill(width) for k in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_master_port(job_id: int) -> int:
    """The default rendezvous port of a SLURM job: `20000 + job_id % 12000`.

    Jobs sharing a node get different ports unless their ids differ by a multiple of 12000, and
    the range stays below Linux's ephemeral ports (32768+). Concurrent multi-task steps of the
    same job need their own MASTER_PORT.
    """
    return 20000 + int(job_id) % 12000


def rendezvous_address() -> tuple[str, str]:
    """`(MASTER_ADDR, MASTER_PORT)` defaults for `init_process_group` (set values always win).

    Under a plain `srun` of several tasks (no torchrun): the first host of the step's node list
    (rank 0 runs there) and `slurm_master_port(SLURM_JOB_ID)`. Otherwise `127.0.0.1:29500`.
    """
    env = os.environ
    addr, port = "127.0.0.1", "29500"
    if _in_slurm_step(env) and "RANK" not in env and _slurm_ntasks(env) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            addr = expand_nodelist(nodelist)[0]
        if env.get("SLURM_JOB_ID"):
            port = str(slurm_master_port(int(env["SLURM_JOB_ID"])))
    return env.get("MASTER_ADDR", addr), env.get("MASTER_PORT", port)


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

    def device(self) -> torch.device:
        if self.backend == "nccl" or (self.backend is None and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")
