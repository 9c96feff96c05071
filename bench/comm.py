"""Bytes exchanged per sample by partition strategy, against the lower bound and the all-gather.

`python bench/comm.py` (planner only: no processes, no network; 90 s wall, 55 s of CPU, on the
2-core CPU machine while other jobs ran; most of it is METIS at degree 64; `--size 4096` for a
quick look).
For an MLP base `x -> h1 -> h2 -> h3 -> y` with every non-input fibre of size s = 16384 and every
vertex of dimension d = 8 (one row = 32 bytes in float32; bytes scale linearly with d, the ratios
do not depend on d), at degrees 2, 4, 16, 64 and lift-parallel sizes P = 2, 4, 8, 16, 64, it runs
`planstats.plan_statistics` (the real run's partition, sampling, halo split and mode choice) for
the `block`, `graph` (METIS via pymetis; skipped above `--graph-max-edges`, default 4M lifted
edges, which keeps degree 64, 3.1M edges) and `random` strategies and prints, per strategy:

- `cut`: remote lifted edges / lifted edges (over the 3 exchanging base edges);
- `LB/AG`: the lower bound (the distinct remote rows each rank needs; what `alltoall` sends)
  over the all-gather volume (`P (P - 1) max_own` rows);
- `auto/LB`: what the default exchange (`auto`, threshold 0.5) sends, over the lower bound;
- `mode`: what `auto` chose (a2a = alltoall, ag = allgather);
- for `graph`, `imb`: the worst fibre's max over mean vertices per rank (compute balance);
- `blk/gr`: block's lower bound over graph's (the gain of a graph partitioner).

Bytes are per sample and per forward (the backward sends as much again), summed over ranks.

Findings (measured 2026-11-28, 2-core Xeon, s = 16384, d = 8, seed 0):

- Block and random ownership need the same halo (LB/AG equal to 0.01 at every degree and P): a
  random lift's sources are uniform over the fibre, so contiguous blocks have no locality to
  exploit, and their cut is 1 - 1/P. Both follow `LB/AG = 1 - exp(-lambda / P)` (the chance that
  a remote row is hit by one of a rank's in-edges): 0.63 at lambda = P, 0.39 at lambda = P/2,
  0.22 at P/4, 0.98 at 4P. `auto` switches to the all-gather at lambda / P >= ln 2, where it sends
  up to 2x the lower bound: 1.58x at lambda = P, 1.15x at lambda = 2P, 1.00 from lambda = 8P.
- A graph partitioner pays at small degree: at degree 2 METIS needs 2.9x to 3.1x fewer bytes than
  blocks (cut 12% to 34% against 50% to 98%), at degree 4 1.4x to 1.7x (cut 22% to 59%), with
  fibres balanced to 7% up to P = 8 (but 1.15x to 1.8x out of balance at P = 16 and 64).
- At degree 16 and 64 the `graph` columns are not a fair comparison: pymetis runs METIS with ONE
  balance constraint whatever weights it is given (see `partition.graph_partition`), so METIS
  piles whole fibres onto a few ranks (imb 2 at P <= 8, 12 to 48 at P = 16, 64) and cuts little
  because it barely partitions. Even so, at degree 64 it cuts 60% (P = 4) and 76% (P = 8) of the
  edges, and single-constraint METIS with unit weights (not shown) gains only 1.2x to 1.5x over
  blocks at degree 16 to 64 while leaving fibres 2x out of balance: random lifts are expanders,
  so at large degree no balanced partition of a fibre has a small cut, and the exchange is close
  to an all-gather whatever the partition.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
from hardware import hardware_line

from randlift_dist import BaseGraph, random_sparse_lift
from randlift_dist.planstats import plan_statistics

STRATEGIES = ("block", "graph", "random")


def summarize(stats: dict) -> dict:
    ex = [e for e in stats["edges"] if e["mode"] != "none"]
    lb = sum(e["lower_bound_bytes"] for e in ex)
    ag = sum(e["allgather_bytes"] for e in ex)
    sent = sum(e["bytes_per_sample"]["sum"] for e in ex)
    remote, edges = sum(e["remote_edges"] for e in ex), sum(e["edges"] for e in ex)
    imb = max(e["vertices_per_rank"]["max"] / e["vertices_per_rank"]["mean"] for e in stats["edges"])
    modes = sorted({e["mode"] for e in ex})
    return {"lb": lb, "ag": ag, "sent": sent, "cut": remote / max(edges, 1), "imb": imb,
            "mode": "+".join({"alltoall": "a2a", "allgather": "ag"}[m] for m in modes)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="fibre size s of every non-input vertex")
    ap.add_argument("--dim", type=int, default=8, help="dimension d of every vertex")
    ap.add_argument("--degrees", type=float, nargs="+", default=[2, 4, 16, 64])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--graph-max-edges", type=float, default=4e6,
                    help="skip the graph strategy above this many lifted edges (METIS time and memory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # pymetis's xadj/adjncy notice

    base = BaseGraph.mlp(args.dim, [args.dim] * 3, args.dim, "relu")
    print(hardware_line(("pymetis",)))
    print(f"lift: mlp x -> h1 -> h2 -> h3 -> y, s = {args.size} per non-input fibre, d = {args.dim} "
          f"({4 * args.dim} bytes per row, float32), law bernoulli, seed {args.seed}; bytes per sample per "
          "forward summed over ranks, 3 exchanging base edges")
    cols = [("deg", 4), ("P", 3), ("AG/sample", 10)]
    for s in args.strategies:
        cols += [(f"{s[:5]}:cut", 9), ("LB/AG", 5), ("auto/LB", 7), ("mode", 6)]
        cols += [("imb", 5)] if s == "graph" else []
    both = "block" in args.strategies and "graph" in args.strategies
    cols += ([("blk/gr", 6)] if both else []) + [("secs", 5)]
    print("  ".join(name.rjust(w) for name, w in cols))
    notes = []
    t_all = time.perf_counter()
    for deg in args.degrees:
        lift = random_sparse_lift(base, args.size, deg, seed=args.seed)
        n_edges = sum(lift.expected_edges(e) for e in base.edges if e.src != "x")
        for P in args.world_sizes:
            t0 = time.perf_counter()
            row = {}
            for strat in args.strategies:
                if strat == "graph" and n_edges > args.graph_max_edges:
                    row[strat] = None
                    note = f"graph skipped at degree {deg:g}: ~{n_edges:.3g} edges > --graph-max-edges"
                    if note not in notes:
                        notes.append(note)
                    continue
                row[strat] = summarize(plan_statistics(lift, P, strat))
            ref = next(r for r in row.values() if r is not None)
            cells = [f"{deg:g}", str(P), f"{ref['ag'] / 1024:.0f} KiB"]
            for strat in args.strategies:
                r = row[strat]
                k = 5 if strat == "graph" else 4
                if r is None:
                    cells += ["-"] * k
                    continue
                cells += [f"{100 * r['cut']:.1f}%", f"{r['lb'] / r['ag']:.2f}", f"{r['sent'] / r['lb']:.2f}", r["mode"]]
                if strat == "graph":
                    cells.append(f"{r['imb']:.2f}")
            if both:
                cells.append(f"{row['block']['lb'] / row['graph']['lb']:.2f}" if row["graph"] else "-")
            cells.append(f"{time.perf_counter() - t0:.1f}")
            print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, cols)), flush=True)
    print("AG/sample: all-gather volume with block ownership; LB/AG: lower bound / all-gather volume; "
          "auto/LB: bytes sent by exchange=auto / lower bound; mode chosen by auto: a2a = alltoall, "
          "ag = allgather, ag+a2a = both; imb: worst fibre's max/mean vertices per rank; "
          "blk/gr: block lower bound / graph lower bound")
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
