"""The time cost of not storing the topology: stored vs regenerated edges, side by side.

Run: `python bench/regen.py` (defaults below; about two minutes on 2 cores), or e.g.
`python bench/regen.py --size 320000 --batch 64 --repeats 3`.

Case: an MLP of scalar vertices (4 inputs, four hidden layers of dimension 1, tanh, one output),
lift size s, bernoulli degree 32 (~128 s parameters, nearly all edge weights), batch B, fp32,
MSE against a random target, fused Adam. Two networks with the same lift and weights:
`topology=stored` (CSR arrays plus the kernels' cached structures) and `topology=regenerate`
(`ops/regen.py`: each sampling block's edges drawn again in the forward and in the backward).
Timed in alternation, min over the repeats after one warm-up, per step: forward, backward,
optimizer. Also printed: the time to draw every edge once (`ShardPlan.block_edges` over all
blocks: what regeneration pays per pass, twice per step), the index bytes each network holds after
a step, and the ratio of the step times.

RESULTS: docs/scale.md ("Regenerated topology") has the measured numbers and the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from hardware import choose_clock, hardware_line  # noqa: E402

from randlift_dist import BaseGraph, LiftedNetwork, build_plan, random_sparse_lift  # noqa: E402

CLOCK = None


def _ws():
    from randlift_dist.ops import workspace
    return workspace


def index_bytes(net: LiftedNetwork) -> int:
    """Bytes of every index tensor the network's edge layers hold (CSR arrays and caches)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for layer in net.edges:
        for csr in (layer.csr_local, layer.csr_remote):
            if csr is None:
                continue
            for t in (csr.row, csr.col, csr.indptr):
                add(t)
            for t in (csr._t or ()):
                add(t)
            for g in csr._groups.values():
                for t in (g.edges, g.inv, g.empty_rows, *(x.rows for x in g.groups)):
                    add(t)
            for x in csr._expansions.values():
                for t in (x.indptr, x.col, x.t_indptr, x.t_col, x.perm):
                    add(t)
        if layer.blocks is not None:
            total += layer.blocks.edge_ptr.nbytes + layer.blocks.row_ptr.nbytes
    return total


def step(net, opt, x, target):
    opt.zero_grad(set_to_none=True)
    t0 = CLOCK()
    loss = F.mse_loss(net(x), target)
    t1 = CLOCK()
    loss.backward()
    t2 = CLOCK()
    opt.step()
    t3 = CLOCK()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=160000, help="lift size s (~128 s parameters)")
    ap.add_argument("--degree", type=float, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--chunk-elems", type=int, default=None,
                    help="ops.workspace.REGEN_CHUNK_ELEMS for this run (default: the library's)")
    args = ap.parse_args(argv)
    if args.chunk_elems:
        from randlift_dist.ops import workspace
        workspace.REGEN_CHUNK_ELEMS = args.chunk_elems
    global CLOCK
    CLOCK = choose_clock(args.clock, args.threads)
    print(hardware_line())
    import os
    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}; "
          f"clock {args.clock}")
    base = BaseGraph.mlp(4, [1, 1, 1, 1], 1, "tanh")
    lift = random_sparse_lift(base, args.size, args.degree, seed=0)
    nets = {"stored": LiftedNetwork(base, lift),
            "regenerate": LiftedNetwork(base, lift, build_plan(lift, topology="regenerate"))}
    n_params = sum(p.numel() for p in nets["stored"].parameters())
    n_edges = nets["stored"].num_edges()
    print(f"lift: s = {args.size}, degree {args.degree:g}: {n_params / 1e6:.1f}M parameters, "
          f"{n_edges / 1e6:.1f}M edges; batch {args.batch}, fp32, fused Adam; regenerated chunks of up to "
          f"{_ws().REGEN_CHUNK_EDGES} edges (scalar CPU path)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, base.in_dim, generator=g)
    target = torch.randn(args.batch, 1, generator=g)
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-4, fused=True) for k, n in nets.items()}
    for k in nets:  # warm-up: builds the stored network's cached structures
        step(nets[k], opts[k], x, target)
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for k in nets:
            t = step(nets[k], opts[k], x, target)
            if k not in best or sum(t) < sum(best[k]):
                best[k] = t
    plan = nets["regenerate"].plan
    t0 = CLOCK()
    for key, ep in plan.edges.items():
        nb = ep.blocks.blocks.size
        for i0 in range(0, nb, 16):
            plan.block_edges(key, i0, min(i0 + 16, nb))
    draw = CLOCK() - t0
    print(f"\n{'topology':<12}{'step ms':>9}{'fwd':>8}{'bwd':>8}{'adam':>8}{'Medge-samples/s':>17}{'index MB':>10}")
    for k, (f, b, o) in best.items():
        s = f + b + o
        print(f"{k:<12}{s * 1e3:>9.0f}{f * 1e3:>8.0f}{b * 1e3:>8.0f}{o * 1e3:>8.0f}"
              f"{n_edges * args.batch / s / 1e6:>17.0f}{index_bytes(nets[k]) / 2**20:>10.1f}")
    ratio = sum(best["regenerate"]) / sum(best["stored"])
    print(f"\nregenerate / stored step time: {ratio:.2f}x")
    print(f"drawing every edge once: {draw * 1e3:.0f} ms ({draw / n_edges * 1e9:.1f} ns per edge); "
          f"a step draws them twice (forward, backward)")
    print(f"index bytes per parameter: stored {index_bytes(nets['stored']) / n_params:.1f}, "
          f"regenerate {index_bytes(nets['regenerate']) / n_params:.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
