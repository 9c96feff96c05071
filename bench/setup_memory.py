"""Peak memory per rank to BUILD a shard of a large random sparse lift, for P = 1, 2, 4.

`python bench/setup_memory.py [--size N] [--degree K] [--worlds 1,2,4] [--no-tracemalloc]`
(default: 26.2M lifted edges, 60 s wall at load 5, 100 s at load 23 on the machine below;
`--size 65536` for a 15 s look; `--no-tracemalloc` makes the setups ~2x faster).

What is measured. Base `BaseGraph.mlp(4, [1, 1, 1], 1)` (x -> h1 -> h2 -> h3 -> y, scalar
hidden and output vertices), every non-input fibre of size s = 2**20, degree 8 (law bernoulli,
so x -> h1 has p = 1: one 4-wide edge per h1 vertex), seed 0, strategy `block`, float32. For each
P a real gloo world of P spawned ranks (world size = P = lift_parallel, `tests/distributed.py`)
builds `plan = build_plan(lift, Layout.from_initialized(P), "block")`, `Communicator.create(plan,
layout)` and `LiftedNetwork(base, lift, plan, comm)`. Per rank: the increase of ru_maxrss (KiB)
over those calls (the measure; the table shows the max over ranks), cross-checked by VmHWM reset
through /proc/self/clear_refs just before, minus VmRSS just before (`hwm MB`); tracemalloc's peak
(numpy buffers + Python objects, not torch's own allocations); the bytes of the arrays the
finished shard holds, split into per-edge arrays and whole-fibre O(n) arrays.

History (same machine class: 2 cores, 24 GiB, python 3.11.7, numpy 2.4.6, torch 2.13.0+cpu):

  2026-11-27, ownership as per-vertex arrays (owners, local_pos, pos_in_owner: O(n) per rank):
     P  edges/rank  peak MB  B/edge  ratio   1/P   held arrays B/edge  O(n) arrays MB
     1    26213719    761.1    30.4  1.000 1.000                21.9            48.0
     2    13108144    591.8    47.3  0.778 0.500                24.2            44.0
     4     6556265    358.7    57.4  0.471 0.250                24.2            44.0

  2026-11-29, the plan stage: `block` ownership held as P + 1 boundaries per fibre (load balancing
  reads in-degrees block by block and keeps one number per sampling block), weights drawn from
  the in-degrees alone, the halo split without per-edge owner arrays (AMD EPYC, other jobs on the
  2 cores: load 10-14; memory, not time, is the measure):
     P  edges/rank  peak MB  B/edge  ratio   1/P   held arrays B/edge  O(n) arrays MB
     1    26213719    655.8    26.2  1.000 1.000                21.9             0.0
     2    13108144    454.9    36.4  0.694 0.500                23.8             0.0
     4     6556265    264.0    42.2  0.402 0.250                23.8             0.0
  sharded rows fit: peak = 30.6 B x edges/rank + 73 MB.

Analysis. No array is sized by a whole fibre any more: what a rank holds is O(its edges + its
vertices). The peak per edge is higher for P > 1 than for P = 1 (30.6 vs 26.2 B) because of the
transient of the halo split (`np.unique` over the remote sources of the base edge being planned:
a sorted copy, its argsort and the inverse, beside the sampled src/row). The remaining ~73 MB
that does not shrink with P is per-process: the process groups (one per exchanging base edge)
and allocator slack, not lift data.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import tracemalloc

import numpy as np
from hardware import hardware_line

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: tests/distributed.py

MiB = 2 ** 20


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
def held_breakdown(model, plan) -> dict:
    """Bytes of the arrays a built shard keeps, split into per-edge and per-whole-fibre ones.

    Per-fibre (O(n_v) on every rank, whatever P): per-vertex owner arrays (the `graph` and
    `random` partitions; `block` keeps P + 1 boundaries) and their position caches. Everything else
    (weights, CSR structures, the plan's index arrays, biases and readout rows of owned vertices)
    is O(edges / P) or O(vertices / P). Shared storage (torch.from_numpy views) is counted once.
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

    per_fibre = 0
    for o in plan.owners.values():
        per_fibre += nbytes(o.owner) + nbytes(o.bounds) + sum(nbytes(a) for a in o._cache.values())
    per_edge = 0
    for layer in model.edges:
        per_edge += nbytes(layer.weight.data)
        for csr in (layer.csr_local, layer.csr_remote):
            if csr is not None:
                per_edge += nbytes(csr.row) + nbytes(csr.col) + nbytes(csr.indptr)
    for ep in plan.edges.values():
        per_edge += sum(nbytes(a) for a in (ep.row_local, ep.col_local, ep.row_remote, ep.col_remote, ep.local_first))
        if ep.exchange is not None:
            per_edge += nbytes(ep.exchange.send_idx) + nbytes(ep.exchange.halo_global)
    for p in list(model.biases.values()) + list(model.readouts.values()):
        per_edge += nbytes(p.data)
    return {"held_per_edge_arrays": per_edge, "held_per_fibre_arrays": per_fibre}


# ---------------------------------------------------------------- one rank
def build_rank(rank: int, world_size: int, size: int, degree: float, seed: int, strategy: str,
               trace: bool) -> dict:
    """Runs on every rank of a gloo world of `world_size` = P (spawned by `run_world`)."""
    import torch.distributed as dist

    from randlift_dist import BaseGraph, Communicator, LiftedNetwork, build_plan, random_sparse_lift
    from randlift_dist.layout import Layout

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

    plan = build_plan(lift, layout, strategy)  # partition, sampling of own edges, halo split, exchanges
    comm = Communicator.create(plan, layout)
    part = probe.stop()
    probe.start()  # resets the HWM and tracemalloc's peak: the model phase alone
    model = LiftedNetwork(base, lift, plan, comm)  # weights, CSRs (no communication)
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
        "modes": sorted({ep.exchange.mode for ep in plan.edges.values() if ep.exchange is not None}),
    }
    out.update(held_breakdown(model, plan))
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
          "build_plan + Communicator.create + LiftedNetwork(...); max over ranks")
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
          "cross-check; held MB: RSS still held after setup; part MB: peak of build_plan + "
          "Communicator.create alone (partition, sampling, exchanges); O(n) MB: held arrays sized by whole "
          "fibres (per-vertex owners and positions); tm peak: tracemalloc's peak (numpy + Python, not torch-allocated) over "
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
