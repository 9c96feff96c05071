"""Spawning real gloo worlds on CPU for tests: `run_world(fn, world_size, *args)`.

Each worker initialises the default process group through a `file://` store in a fresh temporary
directory (no port to pick, so no race with other processes for a free port), runs `fn(rank,
world_size, *args)`, and sends back its return value (or its traceback). The parent fails the
test on a worker error or a timeout, and never leaves workers behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import socket
import tempfile
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, store, queue, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, "ok", pickle.dumps(result)))  # plain pickle: no shared-memory fds
    except BaseException:  # report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)  # skip gloo's thread teardown at exit (it can abort the process after all work succeeded)


def run_world(fn: Callable[..., Any], world_size: int, *args, timeout: float = 240.0) -> list[Any]:
    """Run `fn` on `world_size` spawned gloo ranks; return the results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="randlift_world_")
    store = os.path.join(tmp, "store")
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store, queue, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise AssertionError(f"ranks {dead} died without a report (exit codes "
                                         f"{[procs[r].exitcode for r in dead]})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world of {world_size} did not finish in {timeout:.0f} s") from None
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
