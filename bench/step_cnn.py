"""The lifted-CNN cases of `bench/step.py`: one training step of a random sparse lift of a CNN base,
against a dense `torch.nn.Conv1d` / `Conv2d` stack of the same FLOPs, in the same run.

Run: `python bench/step.py --cases cnn1d,cnn2d` (defaults below), or e.g.
`python bench/step.py --cases cnn1d --cnn-size 32 --cnn-length 128 --batch 64 --repeats 3`.

Cases: `cnn1d`: base `cnn1d(L, C, [d] * depth, 1, kernel 3, padding 1, head mean)` (d = 16
channels per fibre member, C = 16 input channels, L = 128 positions), lift size s = 64 (1024
channels per layer), bernoulli degree 16 between conv layers; `cnn2d`: the same on `H x W = 24 x 24`
images with 3 x 3 kernels. FLOPs: `2 B P_v m d_v F` forward per conv edge (m lifted edges, F =
d_u * taps features, P_v output positions), three times that per step (forward, input and weight
gradients), the head and readout ignored (< 1 %). Dense baseline: `depth` bias-free convolutions
(kernel 3, padding 1, relu between) of C' channels with `2 B P C'^2 taps` = the lift's conv FLOPs
per layer, on the same batch and positions, Adam, MSE on the mean over positions.

Goal: the lifted step at >= 0.3 of the dense step's FLOP rate on this CPU. Measured 2026-12-04 on a
2-core Intel Xeon VM, 2 threads, idle (load average 0.70 at the start), defaults: cnn1d 3919 ms,
82.3 GFLOP/s against the dense 239.5 GFLOP/s: 0.34; cnn2d 52.9 s, 82.3 GFLOP/s against 267.6: 0.31.
"""

from __future__ import annotations

import math

import torch

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift


def build(name: str, args):
    """(title, base, net, positions) of a lifted-CNN case."""
    if name == "cnn1d":
        positions = (args.cnn_length,)
        base = BaseGraph.cnn1d(args.cnn_length, args.cnn_channels, [args.cnn_dim] * args.cnn_depth, 1, kernel=3,
                               padding=1, head="mean")
    else:
        positions = (args.cnn_side, args.cnn_side)
        base = BaseGraph.cnn2d(list(positions), args.cnn_channels, [args.cnn_dim] * args.cnn_depth, 1, kernel=3,
                               padding=1, head="mean")
    lift = random_sparse_lift(base, args.cnn_size, args.cnn_degree, seed=0)
    net = LiftedNetwork(base, lift, readout_scale="sqrt", readout_init="normal", seed=0, impl=args.impl)
    title = (f"{name}: conv vertices of {args.cnn_dim} channels, depth {args.cnn_depth}, positions {positions}, "
             f"{args.cnn_channels} input channels, s = {args.cnn_size} ({args.cnn_size * args.cnn_dim} channels per "
             f"layer), degree {args.cnn_degree:g}, impl {args.impl}")
    return title, base, net, positions


def conv_flops(net: LiftedNetwork, base: BaseGraph, B: int) -> float:
    """Forward FLOPs of the conv edges: `2 B P_v * numel(w_e)` summed over them."""
    return sum(2.0 * B * math.prod(base.positions(e.dst)) * net.edge_weight(e.key).numel()
               for e in base.edges if e.kind == "conv")


class DenseCNN(torch.nn.Module):
    """`depth` bias-free `k x ... x k` convolutions of `width` channels (relu between), mean over positions."""

    def __init__(self, rank: int, c_in: int, width: int, depth: int):
        super().__init__()
        conv = torch.nn.Conv1d if rank == 1 else torch.nn.Conv2d
        self.layers = torch.nn.ModuleList(conv(c_in if i == 0 else width, width, 3, padding=1, bias=False)
                                          for i in range(depth))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x.flatten(2).mean(2)


def run(name: str, args, step) -> None:
    """Time the lifted step and the dense step; `step` is the `bench/step.py` module (its helpers)."""
    t0 = step.CLOCK()
    title, base, net, positions = build(name, args)
    B = args.batch
    P = sum(p.numel() for p in net.parameters())
    flops_fwd = conv_flops(net, base, B)
    print(f"\n## {title}, B = {B}: {P / 1e6:.2f}M parameters, {net.num_edges() / 1e6:.3f}M lifted edges "
          f"(built in {step.CLOCK() - t0:.0f} s)")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, base.in_dim, generator=g)
    target = torch.randn(B, net.out_dim, generator=g)
    opt = step.make_adam(net.parameters(), args.adam)
    timers = step.KernelTimers()
    try:
        (tf, tb, to), (kf, kb, kinds) = step.best_of(lambda: step.timed_step(net, opt, x, target, timers), args.repeats)
    finally:
        timers.restore()
    total, flops = tf + tb + to, 3 * flops_fwd
    print(f"step {total * 1e3:.0f} ms (min of {args.repeats}): {B / total:.1f} samples/s, {flops / 1e9:.2f} GFLOP, "
          f"{step.gflops(flops, total):.1f} GFLOP/s; forward {tf * 1e3:.0f} ms, backward {tb * 1e3:.0f} ms, "
          f"Adam {to * 1e3:.0f} ms; aggregation (unfold + kernels) {(kf + kb) * 1e3:.0f} ms")
    print("    by kernel and block shape d_v x F (forward + backward): "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    opt = net = None  # free the lift before the dense step
    if args.no_dense:
        return
    taps = 3 ** len(positions)
    per_layer = flops_fwd / args.cnn_depth  # forward FLOPs of one lifted conv layer
    width = max(8, int(round(math.sqrt(per_layer / (2 * B * math.prod(positions) * taps)))))
    dense = DenseCNN(len(positions), args.cnn_channels, width, args.cnn_depth)
    xd = torch.randn(B, args.cnn_channels, *positions, generator=g)
    td = torch.randn(B, width, generator=g)
    dflops = 3 * sum(2.0 * B * math.prod(positions) * layer.weight.numel() for layer in dense.layers)
    dopt = step.make_adam(dense.parameters(), args.adam)
    (df, db, do), _ = step.best_of(lambda: step.timed_step(dense, dopt, xd, td, None), args.repeats)
    dtot = df + db + do
    print(f"dense CNN ({args.cnn_depth} x Conv{len(positions)}d({width}, {width}, 3), same batch and positions) step "
          f"{dtot * 1e3:.0f} ms: forward {df * 1e3:.0f}, backward {db * 1e3:.0f}, Adam {do * 1e3:.0f}; "
          f"{dflops / 1e9:.2f} GFLOP, {step.gflops(dflops, dtot):.1f} GFLOP/s")
    print(f"  lift / dense FLOP rate: step {step.gflops(flops, total) / step.gflops(dflops, dtot):.2f} "
          f"(goal >= 0.3), forward+backward {step.gflops(flops, tf + tb) / step.gflops(dflops, df + db):.2f}")


def add_arguments(p) -> None:
    p.add_argument("--cnn-size", type=int, default=64, help="cnn cases: lift size s (fibre members per layer)")
    p.add_argument("--cnn-degree", type=float, default=16, help="cnn cases: average degree between conv layers")
    p.add_argument("--cnn-dim", type=int, default=16, help="cnn cases: channels per fibre member (vertex dim)")
    p.add_argument("--cnn-depth", type=int, default=3, help="cnn cases: conv layers")
    p.add_argument("--cnn-channels", type=int, default=16, help="cnn cases: input channels")
    p.add_argument("--cnn-length", type=int, default=128, help="cnn1d: positions")
    p.add_argument("--cnn-side", type=int, default=24, help="cnn2d: image side")

