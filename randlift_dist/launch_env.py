"""Where a process is in the world: rank discovery from torchrun or SLURM, and rendezvous defaults.

Rank discovery prefers torchrun's `RANK` / `WORLD_SIZE` / `LOCAL_RANK` over SLURM's
`SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID` (under `srun torchrun` every worker inherits
`SLURM_PROCID=0`), so `python -m ...` works under torchrun, under `srun` alone, and bare. SLURM's
variables count only inside a job step (`SLURM_STEP_ID` set, i.e. under `srun`): a batch script
also carries `SLURM_PROCID=0` and `SLURM_NTASKS`, and a bare `python` there is one process.
Under a plain `srun` the rendezvous defaults to the first host of the step's node list and a port
derived from the job id (`slurm_master_port`); set MASTER_ADDR / MASTER_PORT to override.

Pure functions of the environment: nothing here starts a process group.
"""

from __future__ import annotations

import os
import re


class LaunchEnvError(ValueError):
    """The launcher's environment cannot be read; the message names the value and the fix."""


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
            raise LaunchEnvError(f"SLURM node list {nodelist!r}: cannot read the range {r!r}; "
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
