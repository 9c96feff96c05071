"""The hardware line every benchmark prints first (CPU model, cores, memory, library versions),
and the benchmarks' choice of clock."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        return kib / 2**20
    except (OSError, StopIteration, ValueError):
        return None


def hardware_line(packages: tuple[str, ...] = ()) -> str:
    """`hardware: <cpu>, <n> cores, <m> GiB RAM; python, numpy, torch[, packages] versions`."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import torch

    mem = memory_gib()
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    extra = []
    for name in packages:
        try:
            extra.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            extra.append(f"no {name}")
    return (f"hardware: {cpu_model()}, {os.cpu_count()} cores"
            + (f", {mem:.0f} GiB RAM" if mem else "") + gpu
            + f"; python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
            + "".join(f", {x}" for x in extra))


def choose_clock(kind: str, threads: int | None) -> Callable[[], float]:
    """The timer of `--clock`: `wall` (time.perf_counter) or `thread` (the main thread's CPU time,
    robust on a busy machine; torch then runs one thread). Sets torch's thread count if given."""
    import torch

    if kind == "thread":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return time.thread_time if kind == "thread" else time.perf_counter
