"""A training step of a lift sharded over P ranks: where the time goes, and how much of the
exchange was hidden behind local work.

    torchrun --standalone --nproc_per_node 2 bench/step_sharded.py [--size 4096] [--degree 16] [--batch 256]

Each rank builds its shard with `shard_network` (plan, communicator, network), then times full
steps (forward, backward, fused Adam), best of `--repeats` after one warm-up, and splits them into:
aggregation kernels (the autograd functions of `ops.kernels` / `ops.blocked`, wrapped as in
`bench/step.py`), the time spent waiting for exchanges (`CommStats.wait_s`: what overlap did NOT
hide), the optimizer and the rest. The exchange's own cost is measured apart, in the same run: the
same collectives (every exchanging edge, forward and the mirrored backward volume) run back to
back with nothing to overlap. Hidden fraction = 1 - waited / isolated. Bytes are those handed to
the collectives (`CommStats`), summed over ranks. The hardware line comes first; numbers are the
max over ranks (the straggler sets the pace).

Measured (2026-11-29, AMD EPYC, 2 cores, 24 GiB, torch 2.13.0+cpu, 2 ranks x 1 thread, gloo over
loopback, load average 1.6 at the start; batch 256, fp32, block partition, `auto` chose all-gather):

    s = 4096, degree 16 (86.8M parameters): step 2303 ms: kernels 1858, exchange waited 253,
      optimizer 23, rest 169; 897 MiB exchanged per step; alone 489 ms -> 48% hidden
    s = 4096, degree 4 (22.2M parameters): step 1366 ms: kernels 807, exchange waited 440,
      optimizer 6, rest 114; 898 MiB per step; alone 535 ms -> 18% hidden

At degree 16 and 2 ranks every source row is in the other rank's halo, so the whole fibre is
exchanged (all-gather; the bytes do not depend on the degree). Overlap hides about half of it when
the local work is large (degree 16) and little when it is not (degree 4): the local edges are the
only work that can run while the halo is in flight. On 2 cores the two ranks also compete for the
memory bandwidth the copies need, so "alone" is an optimistic cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardware import hardware_line  # noqa: E402
from step import KernelTimers  # noqa: E402

from randlift_dist import BaseGraph, Layout, random_sparse_lift, shard_network  # noqa: E402


def isolated_exchange(net, B: int, repeats: int) -> float:
    """Seconds of every exchange of one step run alone: each edge's forward collective, twice
    (the backward sends the same volume the other way)."""
    layers = [(layer, net.plan.n_own(layer.key[0]), net.base.dim(layer.key[0])) for layer in net.edges
              if layer.exchange is not None]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            for layer, n, d in layers:
                y = torch.zeros(n, d, B)
                layer.exchange.finish(layer.exchange.start(y))
            best = min(best, time.perf_counter() - t0)
    return 2 * best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--degree", type=float, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--exchange", default="auto", choices=("auto", "alltoall", "allgather"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    P, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    layout = Layout.from_initialized(P)
    base = BaseGraph.residual_mlp(4, args.width, args.depth, 1, activation="relu")
    lift = random_sparse_lift(base, size=args.size, degree=args.degree, seed=0)
    net = shard_network(base, lift, layout, "block", args.exchange, readout_scale="sqrt", readout_init="normal")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(args.batch, base.in_dim, generator=g), torch.randn(args.batch, 1, generator=g)
    timers, stats = KernelTimers(), net.comm.stats
    best = None
    for i in range(args.repeats + 1):
        dist.barrier()
        timers.reset()
        stats.reset()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        run = {"step": t2 - t0, "kernels": timers.fwd + timers.bwd, "wait": stats.wait_s, "opt": t2 - t1,
               "bytes": stats.bytes_total}
        if i and (best is None or run["step"] < best["step"]):
            best = run
    timers.restore()
    best["isolated"] = isolated_exchange(net, args.batch, args.repeats)
    t = torch.tensor([best[k] for k in ("step", "kernels", "wait", "opt", "isolated")], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    sent = torch.tensor([float(best["bytes"])], dtype=torch.float64)
    dist.all_reduce(sent)
    params = torch.tensor([float(sum(p.numel() for p in net.parameters())), float(net.num_edges())])
    dist.all_reduce(params)
    if rank == 0:
        step, kern, wait, opt_s, iso = t.tolist()
        modes = sorted({ep.exchange.mode for ep in net.plan.edges.values() if ep.exchange is not None})
        print(hardware_line())
        print(f"lift: residual MLP width {args.width}, depth {args.depth}, s = {args.size}, degree {args.degree:g}; "
              f"{params[0]:.3g} parameters, {params[1]:.3g} lifted edges; {P} ranks (lift-parallel, block "
              f"partition, exchange {'+'.join(modes)}); batch {args.batch}; fp32; max over ranks")
        rest = step - kern - wait - opt_s
        print(f"step {1e3 * step:.0f} ms: kernels {1e3 * kern:.0f}, exchange waited {1e3 * wait:.0f}, "
              f"optimizer {1e3 * opt_s:.0f}, rest {1e3 * rest:.0f}; {args.batch / step:.0f} samples/s, "
              f"{params[1] * args.batch / step:.3g} edge-samples/s")
        print(f"exchange: {sent.item() / 2**20:.1f} MiB per step (all ranks), alone {1e3 * iso:.0f} ms; "
              f"waited {1e3 * wait:.0f} ms: {100 * max(0.0, 1 - wait / iso) if iso else 0:.0f}% hidden behind local work")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
