"""Peak memory per rank to BUILD a shard of a large random sparse lift, for P = 1, 2, 4.

`python bench/setup_memory.py [--size N] [--degree K] [--worlds 1,2,4] [--no-tracemalloc]`
(default: 26.2M lifted edges, 60 s wall at load 5, 100 s at load 23 on the machine below;
`--size 65536` for a 15 s look; `--no-tracemalloc` makes the setups ~2x faster).

What is measured. Base `BaseGraph.mlp(4, [1, 1, 1], 1)` (x -> h1 -> h2 -> h3 -> y, scalar
hidden and output vertices), every non-input fibre of size s = 2**20, degree 8 (law bernoulli,
so x -> h1 has p = 1: one 4-wide edge per h1 vertex), seed 0, strategy `block`, float32. For each
P a real gloo world of P spawned ranks (world size = P = lift_parallel, `tests/distributed.py`)
builds `Shard.create(lift, Layout.from_initialized(P), "block")` then
`LiftedNetwork(base, lift, shard=shard)`. Per rank: the increase of ru_maxrss (KiB) over those
two calls (the measure; the table shows the max over ranks), cross-checked by VmHWM reset through
/proc/self/clear_refs just before, minus VmRSS just before (`hwm MB`; agrees to 0.1 MB);
tracemalloc's peak (numpy buffers + Python objects, not torch's own allocations); the bytes of
the arrays the finished shard holds, split into per-edge arrays and whole-fibre O(n) arrays.

Measured (2026-11-27, Intel Xeon, 2 cores, 24 GiB, python 3.11.7, numpy 2.4.6, torch 2.13.0+cpu,
other jobs sharing the CPU; two runs, P = 2 gave 860 and 845 MB, the rest agree to 0.5 MB):

     P  edges/rank  peak MB  B/edge  ratio   1/P  held arrays B/edge  O(n) arrays MB
     1    26213719    785.0    31.4  1.000 1.000                21.9            48.0
     2    13108144    860.2    68.8  1.096 0.500                41.7            72.0
     4     6556265    539.0    86.2  0.687 0.250                44.8            72.0

Verdict: setup memory does NOT fall as 1/P. P = 2 needs MORE per rank than P = 1 (1.10x, ideal
0.5); P = 4 needs 0.69x (ideal 0.25); from P = 2 to 4 it falls by 0.63 (ideal 0.5). The sharded
rows fit peak = 51 B x edges/rank + ~220 MB, against 31 B x edges on one rank. Three causes,
found with a phase timeline (tracemalloc and VmHWM at the entry and exit of split_edges,
build_plan, local_pos, pos_in_owner, CSR, EdgeLayer) and a held-array census on rank 0
(line numbers as of commit 3c1c1a0):

1. A sharded rank holds 36 B per lifted edge where one rank holds 20 (the largest cause; the
   O(edges/P) part, but with a constant 1.8x the P = 1 one). At P = 1, comm.py:306 builds the CSR
   on the global `dst`/`src` arrays themselves (`row = dst`), so `EdgeLayer.src/dst` (model.py:47-48,
   int64, 16 B/edge) and the CSR share storage. At P > 1 the CSR is in local coordinates:
   `row = shard.local_pos(e.dst)[dst]` (comm.py:304, permuted at :309),
   `col_local = shard.local_pos(e.src)[src[:n_local]]` (comm.py:319) and `col_remote`
   (comm.py:314 in allgather mode, split_edges' unique-inverse at :295 in alltoall), all int64,
   while the global `src`/`dst` stay registered as buffers: 196 MB of rank 0's 594 MB of held
   arrays at P = 2 (15.7 B/edge), 98 MB at P = 4. Every exchanging base edge also gets two CSRs,
   so two `indptr` of n/P + 1 int64 (ops/csr.py:83).
2. The build's transient peak is ~2.5x the held bytes of the base edge being built (the last
   one, h3 -> y, sets the peak): `LiftedNetwork._build_edge` keeps the per-block lists
   `srcs/dsts/ws` alive next to their concatenations while `shard.edge_layer` runs
   (model.py:146-154, +20 B/edge); comm.py:309 copies `src, dst, row, w` in permuted order while
   the caller still references the unpermuted ones (+28 B/edge); `split_edges` (comm.py:289-295:
   owner, mask, two flatnonzero + concatenate, key, np.unique's sort and inverse) peaks at
   +37 B/edge. Freeing the block lists and the unpermuted copies (tried by monkeypatching, not
   committed) lowers the peaks only to 772 / 761 / 470 MB (P = 1 / 2 / 4): cause 1 and 3 remain.
3. Per-rank O(n) arrays, the same at every P: `owners` int32 per non-input fibre
   (partition.py:63, 16 MB), `local_pos` int64 per fibre (partition.py:239, 32 MB), `pos_in_owner`
   int64 per source fibre in allgather mode (partition.py:249-252, 24 MB held plus an argsort and
   an arange of n transient each): 72 MB at n = 2**20. The partition itself (Shard.create) peaks
   at 64 MB at every P: `_vertex_load`/`in_degrees` draw every block's degrees of every fibre on
   every rank (partition.py:42-44, float64 load, int64 degrees, float64 cumsum at :56), freed
   before the model (its pages are reused, so it does not add to the peak here). Besides, at
   degree 8 and P <= 4 a rank's halo is nearly the whole remote fibre (1 - exp(-8/P): 0.98 at
   P = 2, 0.86 at P = 4), so the plan arrays (`halo_global`, `send_idx`, build_plan's `asked` and
   `pos`, comm.py:155-158) are O(n), not O(n/P): 24 MB held at P = 2, 31 MB at P = 4, kept in the
   EdgePlan even when the chosen mode is allgather and they are never used.

So the design's O(edges/P) holds for the sampling itself (each rank samples only its own target
blocks: edges/rank halve exactly with P), but the per-rank setup memory fits
~51 B x edges/P + ~220 MB at s = 2**20, versus 31 B x edges at P = 1. The held O(n) and halo
arrays are 96 MB (11% of the peak) at P = 2 and 103 MB (19%) at P = 4, about 100 B per fibre
vertex, so they match the per-edge part near edges/P ~ 2 n (P ~ 12 for this lift of ~25 n edges)
and dominate beyond. Ideal 1/P would need the sharded path to hold what P = 1 holds per edge (local
CSR only, or int32 indices, global src/dst derived on demand) and no O(n) arrays per rank.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: tests/distributed.py

MiB = 2 ** 20


def hardware_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"hardware: {cpu}, {os.cpu_count()} cores{mem}; python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}")


# ---------------------------------------------------------------- memory probes (Linux)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Probe:
    """Peak-RSS increase over a section: ru_maxrss delta, and VmHWM (reset at start) over VmRSS."""

    def __init__(self, trace: bool):
        self.trace = trace

    def start(self) -> None:
        gc.collect()
        self.rss0 = _status_kib("VmRSS")
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.hwm_ok = _reset_hwm()
        if self.trace:
            tracemalloc.reset_peak()
            self.tm0 = tracemalloc.get_traced_memory()[0]
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        out = {
            "secs": time.perf_counter() - self.t0,
            # the brief's measure: increase of the process's lifetime peak RSS over the section
            "maxrss_delta": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0) * 1024,
            # peak RSS during the section over the RSS when it started (exact even when an
            # earlier transient peak of the process exceeded the RSS at the start)
            "hwm_delta": (_status_kib("VmHWM") - self.rss0) * 1024 if self.hwm_ok else None,
            "held": (_status_kib("VmRSS") - self.rss0) * 1024,
        }
        if self.trace:
            cur, peak = tracemalloc.get_traced_memory()
            out["tm_peak"], out["tm_held"] = peak - self.tm0, cur - self.tm0
        return out


# ---------------------------------------------------------------- what a shard holds
def held_breakdown(model, shard) -> dict:
    """Bytes of the arrays a built shard keeps, split into per-edge and per-whole-fibre ones.

    Per-fibre (O(n_v) on every rank, whatever P): `shard.owners`, `local_pos`, `pos_in_owner`
    and any `own` that is the whole fibre (inputs, P = 1). Everything else (weights, edge
    indices, CSR structures, exchange plans, biases and readout rows of owned vertices) is
    O(edges / P) or O(vertices / P). Shared storage (torch.from_numpy views) is counted once.
    """
    seen: set[int] = set()

    def nbytes(x) -> int:
        if x is None:
            return 0
        if isinstance(x, np.ndarray):
            base = x
            while isinstance(base.base, np.ndarray):
                base = base.base
            key = base.__array_interface__["data"][0]
            size = base.nbytes
        else:
            key = x.untyped_storage().data_ptr()
            size = x.untyped_storage().nbytes()
        if key in seen or size == 0:
            return 0
        seen.add(key)
        return size

    lift = shard.lift
    per_fibre = 0
    for v, a in shard.owners.items():
        per_fibre += nbytes(a)
    for cache in (shard._pos, shard._pos_in_owner):
        for a in cache.values():
            per_fibre += nbytes(a)
    for v, a in shard._own.items():
        if a.size == lift.n(v):
            per_fibre += nbytes(a)
    per_edge = 0
    for layer in model.edges:
        per_edge += nbytes(layer.weight.data)
        for csr in (layer.csr_local, layer.csr_remote):
            if csr is not None:
                per_edge += nbytes(csr.row) + nbytes(csr.col) + nbytes(csr.indptr)
    for plan in shard.plans.values():
        per_edge += nbytes(plan.send_idx) + (nbytes(plan.halo_global) if plan.halo_global is not None else 0)
    for p in list(model.biases.values()) + list(model.readouts.values()):
        per_edge += nbytes(p.data)
    for v, a in shard._own.items():
        if a.size != lift.n(v):
            per_edge += nbytes(a)
    return {"held_per_edge_arrays": per_edge, "held_per_fibre_arrays": per_fibre}


# ---------------------------------------------------------------- one rank
def build_rank(rank: int, world_size: int, size: int, degree: float, seed: int, strategy: str,
               trace: bool) -> dict:
    """Runs on every rank of a gloo world of `world_size` = P (spawned by `run_world`)."""
    import torch.distributed as dist

    from randlift_dist import BaseGraph, random_sparse_lift
    from randlift_dist.layout import Layout
    from randlift_dist.model import LiftedNetwork
    from randlift_dist.partition import Shard

    base = BaseGraph.mlp(4, [1, 1, 1], 1)
    lift = random_sparse_lift(base, size, degree, seed=seed)
    layout = Layout.from_initialized(world_size)
    if trace:
        tracemalloc.start()
    probe = Probe(trace)
    dist.barrier()
    probe.start()
    whole = Probe(False)
    whole.rss0, whole.maxrss0, whole.hwm_ok, whole.t0 = probe.rss0, probe.maxrss0, probe.hwm_ok, probe.t0

    shard = Shard.create(lift, layout, strategy)  # partition: O(n) per rank (every fibre's owners)
    part = probe.stop()
    probe.start()  # resets the HWM and tracemalloc's peak: the model phase alone
    model = LiftedNetwork(base, lift, shard=shard)  # sampling, weights, halo split, exchange plans
    build = probe.stop()
    total = whole.stop()
    # the HWM was reset between the phases: the whole setup's peak is the larger phase peak,
    # measured from the RSS before the partition
    if part["hwm_delta"] is not None and build["hwm_delta"] is not None:
        total["hwm_delta"] = max(part["hwm_delta"], part["held"] + build["hwm_delta"])
    if trace:
        tracemalloc.stop()
    out = {
        "rank": rank,
        "edges": model.num_edges(),
        "partition": part,
        "model": build,
        "total": total,
        "modes": sorted({p.mode for p in shard.plans.values()}),
    }
    out.update(held_breakdown(model, shard))
    return out


# ---------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2 ** 20, help="fibre size s of every non-input vertex")
    ap.add_argument("--degree", type=float, default=8, help="average degree (law bernoulli)")
    ap.add_argument("--worlds", default="1,2,4", help="lift-parallel sizes P, comma-separated")
    ap.add_argument("--strategy", default="block", choices=("block", "random"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tracemalloc", action="store_true",
                    help="skip tracemalloc (numpy-only peaks; costs about 2x setup time)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per world")
    args = ap.parse_args(argv)
    worlds = [int(p) for p in args.worlds.split(",") if p.strip()]
    trace = not args.no_tracemalloc

    from tests.distributed import run_world

    print(hardware_line())
    n = args.size
    print(f"lift: BaseGraph.mlp(4, [1, 1, 1], 1) (x -> h1 -> h2 -> h3 -> y, scalar hidden/output), "
          f"s = {n} per non-input fibre, degree {args.degree:g} (bernoulli), seed {args.seed}, "
          f"strategy {args.strategy}; ~{(3 * args.degree + 1) * n / 1e6:.1f}M lifted edges in all")
    print("one gloo world of P ranks per row (world size = P); per rank: peak-RSS increase over "
          "Shard.create + LiftedNetwork(...); max over ranks")
    hdr = (f"{'P':>2} {'edges/rank':>11} {'peak MB':>8} {'B/edge':>7} {'ratio':>6} {'1/P':>5} "
           f"{'arr B/e':>7} {'hwm MB':>7} {'held MB':>8} {'part MB':>8} {'O(n) MB':>8} {'tm peak':>8} {'secs':>5}  mode")
    print(hdr, flush=True)
    rows, ref = [], None
    for P in worlds:
        t0 = time.perf_counter()
        res = run_world(build_rank, P, n, args.degree, args.seed, args.strategy, trace, timeout=args.timeout)
        wall = time.perf_counter() - t0
        edges = max(r["edges"] for r in res)
        peak = max(r["total"]["maxrss_delta"] for r in res)
        hwm = [r["total"]["hwm_delta"] for r in res]
        hwm = max(hwm) if all(h is not None for h in hwm) else None
        held = max(r["total"]["held"] for r in res)
        part = max(max(r["partition"]["maxrss_delta"], r["partition"]["hwm_delta"] or 0) for r in res)
        fib = max(r["held_per_fibre_arrays"] for r in res)
        arr = max(r["held_per_edge_arrays"] / max(r["edges"], 1) for r in res)
        tm = max(max(r["partition"].get("tm_peak", 0), r["partition"].get("tm_held", 0) + r["model"].get("tm_peak", 0))
                 for r in res) if trace else None
        secs = max(r["total"]["secs"] for r in res)
        ref = peak if ref is None and P == 1 else ref
        ratio = f"{peak / ref:.3f}" if ref else "-"
        mode = "+".join(sorted({m for r in res for m in r["modes"]})) or "-"
        print(f"{P:>2} {edges:>11} {peak / MiB:>8.1f} {peak / max(edges, 1):>7.1f} {ratio:>6} {1 / P:>5.3f} "
              f"{arr:>7.1f} {(hwm or 0) / MiB:>7.1f} {held / MiB:>8.1f} {part / MiB:>8.1f} {fib / MiB:>8.1f} "
              f"{(tm or 0) / MiB:>8.1f} {secs:>5.1f}  {mode}   (world {wall:.0f} s)", flush=True)
        rows.append((P, edges, peak))
    print("peak MB: increase of ru_maxrss over the setup (the measure); B/edge: peak / edges held; "
          "ratio: peak / peak at P = 1; arr B/e: bytes of the per-edge arrays the built shard holds "
          "(weights, src/dst, CSR, plans, own rows) per held edge; hwm MB: VmHWM (reset just before) minus VmRSS before, a "
          "cross-check; held MB: RSS still held after setup; part MB: peak of Shard.create alone "
          "(partition); O(n) MB: held arrays sized by whole fibres (owners, local_pos, "
          "pos_in_owner); tm peak: tracemalloc's peak (numpy + Python, not torch-allocated) over "
          "the setup; secs: setup time (slowest rank); mode: exchange modes chosen")
    sharded = [(e, pk) for P, e, pk in rows if P > 1]
    if len(sharded) >= 2:  # peak = a * edges + b over the sharded rows (P = 1 runs another code path)
        (e1, p1), (e2, p2) = sharded[0], sharded[-1]
        a = (p1 - p2) / (e1 - e2) if e1 != e2 else float("nan")
        line = (f"sharded rows (P > 1) fit: peak = {a:.1f} B x edges/rank + {(p1 - a * e1) / MiB:.0f} MB "
                "(the per-rank part that does not shrink with P)")
        if rows[0][0] == 1:
            line += f"; P = 1 row: {rows[0][2] / max(rows[0][1], 1):.1f} B x edges"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
