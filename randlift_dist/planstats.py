"""Communication-plan statistics of a sharded lift, computed in one process (no process group).

`plan_statistics(lift, P, strategy, exchange)` answers, before a cluster is booked, what a real run
on a lift-parallel group of `P` ranks would hold and send: per base edge and in total, vertices
and lifted edges per rank, the cut fraction, the halo, the bytes per sample each rank sends, the
lower bound and the all-gather volume, and the exchange mode each edge would use.

Invariant: the numbers equal a real run's. The planner calls the functions the real run calls
(`partition.make_partition`, `Lift.edges`, `exchange.split_edges`, `exchange.plan_edge_exchange`,
`exchange.rows_sent`); only the collective of `plan.build_plan` (the all-gather of the need matrix:
how many rows each rank needs from each other) is replaced by the same `P x P` matrix filled rank
by rank.
As in the real run, world size 1 and base edges out of input fibres (replicated on every rank)
exchange nothing: their mode is `none`.

Units: bytes are per sample and per forward (the backward sends the same amount again); one row is
one source member's rows as the edge exchanges them, all positions (`BaseGraph.exchange_values`:
`d_u * P_u` for linear and conv edges, pooled or reduced rows for pool, mean, select and flatten)
x `element_size` bytes. The lower bound of an edge is (sum over ranks of the distinct remote
sources it needs) x row bytes; `alltoall` sends exactly that. `allgather` sends `P (P - 1)
max_own(u)` rows in all (every rank's padded shard to every other rank).

Memory: ranks are processed one at a time, so the planner holds one rank's in-edges over one base
edge (`O(edges / P)`), the ownership arrays (`O(vertices)`) and a `P x P` count matrix per base
edge. One shortcut, exact by world-size invariance (`lift.py`): when a base edge has at most
`max_cached_edges` lifted edges, its edge list is sampled once and sliced per rank instead of
re-sampling every block each rank touches (with the `random` strategy every rank touches every
block, so per-rank sampling costs `P` times the whole lift: that is also a real rank's setup cost).
The `graph` strategy builds the whole lifted graph anyway (in `make_partition`, as a real rank does).

CLI: `python -m randlift_dist.planstats --config FILE --world-size P [--strategy S]
[--exchange auto|alltoall|allgather] [--json]` prints a table (or the JSON of the dict).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .config import ConfigError, load_config
from .graph import Edge, GraphError
from .lift import Lift, LiftError
from .partition import STRATEGIES, Ownership, PartitionError, make_partition
from .exchange import ALLGATHER_THRESHOLD, MODES, plan_edge_exchange, rows_sent, split_edges

MAX_CACHED_EDGES = 1 << 22  # lifted edges of one base edge sampled at once (about 100 MB peak)


def lift_from_config_file(path: str) -> Lift:
    """The lift a training config file describes, built exactly as the trainer builds it."""
    return load_config(path).build_lift()[1]


# ---------------------------------------------------------------- statistics
def rank_sources(lift: Lift, e: Edge, owners_v: Ownership, world_size: int,
                 max_cached_edges: int = MAX_CACHED_EDGES) -> Iterator[tuple[int, np.ndarray]]:
    """`(rank, src)` for every rank: the sources of the in-edges over `e` that the rank samples,
    in the real run's order (`Lift.edges(e, own targets)`)."""
    if lift.expected_edges(e) <= max_cached_edges:
        src, dst = lift.edges(e)
        owner = owners_v.owner_of(dst)
        order = np.argsort(owner, kind="stable")  # keeps the (dst, src) order within each rank
        ends = np.cumsum(np.bincount(owner, minlength=world_size))
        for r in range(world_size):
            yield r, src[order[ends[r - 1] if r else 0:ends[r]]]
        return
    for r in range(world_size):
        yield r, lift.edges(e, owners_v.own(r))[0]


def _mean_max(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "max": int(x.max())}


def _edge_stats(lift: Lift, e: Edge, owners: dict[str, Ownership], P: int, exchange: str,
                threshold: float, element_size: int, max_cached_edges: int
                ) -> tuple[dict[str, Any], np.ndarray]:
    """One base edge: every rank's edges and halo, then the mode and bytes as `build_plan` finds
    them. Also returns the lifted edges of each rank."""
    u, v = e.src, e.dst
    n_u = lift.n(u)
    row_bytes = lift.base.exchange_values(e) * element_size  # one member's (mapped) rows, all positions
    exchanges = P > 1 and lift.base.vertices[u].role != "input"
    n_edges = np.zeros(P, np.int64)
    n_remote = np.zeros(P, np.int64)
    need = np.zeros((P, P), np.int64)  # need[q, r]: rows rank q needs from rank r (q's recv_splits)
    for r, src in rank_sources(lift, e, owners[v], P, max_cached_edges):
        n_edges[r] = src.size
        if exchanges:
            sp = split_edges(owners[u], r, src)
            n_remote[r] = src.size - sp.n_local
            need[r] = np.bincount(sp.halo_owner, minlength=P)
    halo = need.sum(axis=1)
    own_u = owners[u].counts() if u in owners else np.full(P, n_u)  # inputs: replicated
    out = {
        "edge": str(e), "d_src": lift.base.dim(u), "row_bytes": row_bytes,
        "vertices_per_rank": _mean_max(owners[v].counts()),
        "edges": int(n_edges.sum()), "edges_per_rank": _mean_max(n_edges),
        "remote_edges": int(n_remote.sum()),
        "cut_fraction": float(n_remote.sum() / max(n_edges.sum(), 1)),
        "halo_rows": int(halo.sum()), "max_own_src": int(own_u.max()),
    }
    if not exchanges:  # world size 1, or a replicated input fibre: `build_plan` plans no exchange
        return out | {"mode": "none", "bytes_per_rank": [0] * P, "bytes_per_sample": {"sum": 0, "max_rank": 0},
                      "lower_bound_bytes": 0, "allgather_bytes": 0}, n_edges
    sent = []
    for r in range(P):  # the rank's own plan, from the same need matrix as the collective's
        mode, send_splits, _, max_own = plan_edge_exchange(need, owners[u], r, exchange, threshold)
        sent.append(rows_sent(mode, sum(send_splits), max_own, P) * row_bytes)
    sent = np.asarray(sent, np.int64)
    return out | {"mode": mode, "bytes_per_rank": sent.tolist(),
                  "bytes_per_sample": {"sum": int(sent.sum()), "max_rank": int(sent.max())},
                  "lower_bound_bytes": int(halo.sum()) * row_bytes,
                  "allgather_bytes": rows_sent("allgather", 0, max_own, P) * P * row_bytes}, n_edges


def plan_statistics(lift: Lift, world_size: int, strategy: str = "block", exchange: str = "auto",
                    allgather_threshold: float = ALLGATHER_THRESHOLD, element_size: int = 4,
                    max_cached_edges: int = MAX_CACHED_EDGES) -> dict[str, Any]:
    """What every rank of a lift-parallel group of `world_size` would hold and send (see module doc).

    Returns `{"world_size", "strategy", "exchange", "allgather_threshold", "element_size", "lift",
    "edges": [per base edge], "total"}`; per edge: `vertices_per_rank` (of the target fibre) and
    `edges_per_rank` as `{mean, max}`, `edges`, `remote_edges`, `cut_fraction`, `halo_rows`,
    `mode`, `bytes_per_rank`, `bytes_per_sample` `{sum, max_rank}`, `lower_bound_bytes`,
    `allgather_bytes`. `total` sums them (`max_rank`: the rank sending most over all edges).
    """
    if exchange not in MODES:
        raise PartitionError(f"exchange mode {exchange!r}: choose one of {MODES}")
    if isinstance(element_size, bool) or not isinstance(element_size, int) or element_size <= 0:
        raise PartitionError(f"element_size {element_size!r}: must be a positive integer (4 for float32)")
    owners = make_partition(lift, world_size, strategy)  # also validates world_size and strategy
    P = world_size
    edges, per_rank_edges = [], np.zeros(P, np.int64)
    for e in lift.base.edges:
        stats, n_edges_r = _edge_stats(lift, e, owners, P, exchange, allgather_threshold, element_size,
                                       max_cached_edges)
        edges.append(stats)
        per_rank_edges += n_edges_r
    verts = sum((o.counts() for o in owners.values()), np.zeros(P, np.int64))
    sent = sum((np.asarray(s["bytes_per_rank"], np.int64) for s in edges), np.zeros(P, np.int64))
    n_edges, n_remote = sum(s["edges"] for s in edges), sum(s["remote_edges"] for s in edges)
    modes: dict[str, int] = {}
    for s in edges:
        modes[s["mode"]] = modes.get(s["mode"], 0) + 1
    total = {
        "vertices": int(verts.sum()), "vertices_per_rank": _mean_max(verts),
        "edges": n_edges, "edges_per_rank": _mean_max(per_rank_edges),
        "remote_edges": n_remote, "cut_fraction": float(n_remote / max(n_edges, 1)),
        "halo_rows": sum(s["halo_rows"] for s in edges), "modes": modes,
        "bytes_per_rank": sent.tolist(), "bytes_per_sample": {"sum": int(sent.sum()), "max_rank": int(sent.max())},
        "lower_bound_bytes": sum(s["lower_bound_bytes"] for s in edges),
        "allgather_bytes": sum(s["allgather_bytes"] for s in edges),
    }
    return {"world_size": P, "strategy": strategy, "exchange": exchange,
            "allgather_threshold": allgather_threshold, "element_size": element_size,
            "lift": {"fingerprint": lift.fingerprint(), "law": lift.law, "seed": lift.seed,
                     "sizes": dict(lift.sizes), "block_size": lift.block_size,
                     "degrees": {str(lift.base.edge(k)): d for k, d in lift.degrees.items()}},
            "edges": edges, "total": total}


# ---------------------------------------------------------------- report
def format_bytes(n: float, digits: int = 1) -> str:
    """`n` bytes in B, KiB, MiB, GiB or TiB (whole bytes, `digits` decimals above)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return str(n)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def format_table(stats: dict[str, Any]) -> str:
    """A readable report of `plan_statistics` (bytes per sample per forward; backward: the same)."""
    lift = stats["lift"]
    lines = [f"lift {lift['fingerprint']}: law {lift['law']}, seed {lift['seed']}, sizes {lift['sizes']}, "
             f"degrees {lift['degrees']}",
             f"world size {stats['world_size']}, strategy {stats['strategy']}, exchange {stats['exchange']} "
             f"(all-gather threshold {stats['allgather_threshold']}), {stats['element_size']} bytes per value",
             "bytes are per sample and per forward, summed over ranks (the backward sends the same again)", ""]
    head = ("edge", "mode", "verts/rank", "edges/rank", "cut", "halo rows", "sent", "max rank",
            "lower bound", "all-gather", "sent/LB")
    rows = []
    for s in stats["edges"] + [dict(stats["total"], edge="total", mode=",".join(
            f"{k}:{v}" for k, v in stats["total"]["modes"].items()))]:
        vpr, epr, b = s["vertices_per_rank"], s["edges_per_rank"], s["bytes_per_sample"]
        rows.append((s["edge"], s["mode"], f"{vpr['mean']:.0f}/{vpr['max']}", f"{epr['mean']:.0f}/{epr['max']}",
                     f"{100 * s['cut_fraction']:.1f}%", str(s["halo_rows"]), format_bytes(b["sum"]),
                     format_bytes(b["max_rank"]), format_bytes(s["lower_bound_bytes"]),
                     format_bytes(s["allgather_bytes"]), _ratio(b["sum"], s["lower_bound_bytes"])))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    lines.append("verts/rank and edges/rank: mean/max over ranks (per edge: the target fibre); "
                 "cut: remote edges / edges; mode none: no exchange (input fibre or world size 1)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's default prints the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m randlift_dist.planstats --config FILE --world-size P [...]`: plan statistics."""
    ap = _Parser(prog="python -m randlift_dist.planstats",
                 description="Communication-plan statistics of a lift sharded over P ranks, computed "
                             "in one process (no cluster needed).")
    ap.add_argument("--config", required=True, help="YAML config with model.base and model.lift")
    ap.add_argument("--world-size", type=int, required=True, help="ranks in the lift-parallel group (P)")
    ap.add_argument("--strategy", default="block", choices=STRATEGIES, help="partition strategy (default block)")
    ap.add_argument("--exchange", default="auto", choices=MODES, help="exchange mode (default auto)")
    ap.add_argument("--allgather-threshold", type=float, default=ALLGATHER_THRESHOLD,
                    help=f"auto picks all-gather when halo rows >= this x all-gather rows (default {ALLGATHER_THRESHOLD})")
    ap.add_argument("--element-size", type=int, default=4, help="bytes per value (4: float32, 2: bf16)")
    ap.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        ap.error(f"--world-size {args.world_size}: must be a positive integer (the lift-parallel group size)")
    if args.element_size < 1:
        ap.error(f"--element-size {args.element_size}: must be a positive integer (4 for float32)")
    try:
        lift = lift_from_config_file(args.config)
        stats = plan_statistics(lift, args.world_size, args.strategy, args.exchange, args.allgather_threshold,
                                args.element_size)
    except (ConfigError, GraphError, LiftError, PartitionError) as err:
        ap.exit(2, f"{ap.prog}: error: {' '.join(str(err).split())}\n")
    print(json.dumps(stats, indent=1) if args.json else format_table(stats))


if __name__ == "__main__":
    main()
