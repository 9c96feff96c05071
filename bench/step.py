"""One full training step (forward, backward, Adam) of a lift too big for the caches, timed.

Run: `python bench/step.py` (the d16 and d1 cases, a few minutes on 2 cores), or e.g.
`python bench/step.py --cases d16 --size 4096 --repeats 3`. The lifted-CNN cases against dense
`Conv1d` / `Conv2d` steps of the same FLOPs: `--cases cnn1d,cnn2d` (`bench/step_cnn.py`).

Cases (defaults): `d16`: residual MLP of width 16 (depth 4, 16 inputs, 1 output), lift size
s = 8192, bernoulli degree 16: ~176M parameters; `d1`: an MLP of scalar vertices (depth 4), s =
65536, degree 32 (8.5M parameters, 8.45M lifted edges). Batch B = 256, fp32, MSE loss against a
random target.

Printed per case: samples/s and lifted edge-samples/s; the step split into aggregation (the
kernels' autograd functions, timed by wrapping their forward and backward), exchange (none at
world size 1; the sharded step, its exchange and how much of it overlap hid: `bench/step_sharded.py`),
optimizer (Adam) and the rest (activations, loss, autograd bookkeeping); FLOPs and FLOP/s, the
same against a dense MLP step (`torch.nn.Linear` layers with the same FLOPs per sample, same
batch, Adam) measured in the same run; for d = 1 the gather floor: one gathered activation row
per edge (`index_select` of `[m, B]` rows from `[n, B]` into a reused cache-sized buffer, chunk
by chunk), three passes (forward, input gradient, weight gradient), and the step's ratio to it.

FLOPs: 2 * B * (edge parameters) forward, twice that backward (input and weight gradients), for
the lift and the dense MLP alike (biases, activations and readout ignored: < 1%).

RESULTS. Hardware: AMD EPYC (family 26 model 2, AVX-512), KVM guest, 2 cores, 24 GiB; torch
2.13.0+cpu (MKL), fp32, B = 256, THP_MEM_ALLOC_ENABLE=1. The VM was shared with other jobs the
whole time; the load average never stayed below 0.7. Before = the kernels of commit 30248be,
after = this commit, run one after the other.

2 torch threads, wall clock, min of 3 steps, load average 1.2-2.8 (so +-10%; the dense step
swung from 200 to 133 GFLOP/s in one run when the load rose):

  case (2 threads)                    before                  after
  d16 step (176.5M params)            4815-5179 ms            4260-4558 ms (1.1-1.2x)
    forward / backward                1814-1988 / 2927-3098   1511-1853 / 2601-2662 ms
    kernels 16x16 / 1x16 (fwd+bwd)    3309-3607 / 533-561 ms  3280-3571 / 410-451 ms
    rest (activations, loss, ...)     898-918 ms              152-764 ms
  dense MLP step (same runs)          1270-1346 ms: 199-211 GFLOP/s (206-224 without Adam)
  d16 step, lift / dense FLOP rate    0.24-0.27               0.29-0.32
  d16 step with impl=blocked          -                       4329 ms (1x16 kernels 312 ms)
  d1 step (8.5M params, 8.45M edges)  1531-1546 ms            1442 ms
  d1 gather floor (3 passes)          1081-1090 ms (24 GB/s gathered)
  d1 step / gather floor              1.40-1.42               1.33
  Adam (fused), d16 / d1              44-104 / 4 ms           same
  exchange                            0 (world size 1)

1 torch thread, `--clock thread` (CPU time of the only thread), interleaved before/after at
load 3.1-3.3 (the load was 3 to 14 for most of this work, when 2-thread wall timings were
meaningless: OpenMP threads waiting on each other, a 2-thread layer 14x slower than 1 thread).
These were taken with 2 MiB chunks (`workspace.CHUNK_ELEMS` = 2**19, best at 1 thread, ~10% better than
the 8 MiB now in place, which is best at 2 threads):

  case (1 thread)                     before                  after
  d16 step                            8230 ms, 32.9 GFLOP/s   6959 ms, 39.0 GFLOP/s (1.18x)
    forward / backward                2724 / 5488 ms          2733 / 4140 ms
    kernels 16x16 / 1x16 (fwd+bwd)    6437 / 1056 ms          5837 / 843 ms
  dense MLP step                      2629-2805 ms: 96-102 GFLOP/s
  d16 step, lift / dense FLOP rate    0.31-0.33               0.38-0.41
  d1 step                             2939 ms                 2599 ms (1.13x)
  d1 step / gather floor              1.38-1.41               1.23-1.26

Without THP_MEM_ALLOC_ENABLE (after, d16, load 3.6): 7916 ms, the `rest` (activations, ReLU,
sums of 134 MB tensors) ~0.8 s instead of ~0.2-0.7 s: a fresh [8192, 16, 256] tensor costs
~50 ms of page faults with 4 KiB pages, ~10 ms with huge pages (measured: relu 58 vs 11 ms).

Prediction (per 16x16 base edge, s = 8192, m = 131072 edges, 1 thread). Forward: 17.2 GFLOP and
one gather of m * d * B * 4 = 2.15 GB of source rows. Measured alone in this run: the gather
(`index_select` into a cache-sized buffer) 123 ms (17 GB/s), the batched GEMM on in-cache chunks
220 ms (78 GFLOP/s; MKL's dense GEMM: 100 GFLOP/s), both serial: 340-370 ms. The forward kernel
takes 375-390 ms: at that floor. Backward: 34.4 GFLOP; separate kernels gather twice (2.15 GB of
output-gradient rows for the input gradient, 2.15 GB of source rows for the weight gradient):
~250 ms + 440 ms of GEMM; fused, one gather: ~560 ms predicted, 630-650 ms measured (old:
740-770 ms). A layer's forward+backward is then ~1.0 s for 51.6 GFLOP, ~51 GFLOP/s, half of the
dense rate; the step adds the 1x16 output edges (a full 2.15 GB gather each for 1/16 of the
FLOPs), activations and Adam: ~0.4 of dense. d = 1: nothing to compute, three gathers of [B] rows
per edge; the forward is MKL's SpMM (1.0 s for 4 layers, 1.4x one gather pass), the fused
backward gathers once for both gradients (1.5 s for what the floor counts as two passes).

Targets. d = 16 at >= 30% of the dense step's FLOP rate: with 2 threads 0.29-0.32 (before
0.24-0.27), i.e. at the target within the noise of a loaded machine, not clearly above it;
with 1 thread 0.38-0.41 (before 0.31-0.33). The dense step scales 2x from 1 to 2 threads, the
lifted one 1.5-1.6x. d = 1 within 2x of the gather floor: met (1.33 with 2 threads, 1.23 with
1; before 1.40 / 1.38). What bounds the d = 16 step: the gathers (each gathered byte feeds only
2 * d_v = 32 FLOP) and the GEMM shape (16 rows per product, 78% of MKL's dense rate), run one
after the other on each core, then ~0.2-0.8 s of elementwise work on [8192, 16, 256] tensors
outside the kernels (sums of in-edges, ReLU and their backward, gradient accumulation).
Next steps: in-place accumulation of in-edge sums; overlapping gathers with GEMMs.

Final run (the code of the commit adding this paragraph: `auto` now takes the blocked kernel for
the 1x16 output edges at B >= 128; fused Adam), `python bench/step.py`, 2 threads, wall clock,
min of 3, load average 1.3 at the start (no other job running):
  d16: step 4156 ms (forward 1603, backward 2508), 65.2 GFLOP/s; kernels 3616 ms (16x16 3301,
       1x16 315); Adam 45 ms; rest 496 ms. Dense step 1306 ms, 205.4 GFLOP/s.
       Lift / dense FLOP rate 0.32 (target >= 0.30: met).
  d1:  step 1542 ms, 1.40 G lifted edge-samples/s; gather floor 1106 ms (23.5 GB/s):
       step / floor 1.39 (target <= 2: met).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Huge pages for torch's big CPU tensors (read once, at torch's first allocation, so set before
# importing torch): every fresh [s, d, B] activation, gradient and kernel output otherwise pays
# ~0.5 ms of page faults per MiB on VMs. `--no-thp` (or setting the variable to 0) turns it off.
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F

from hardware import choose_clock, hardware_line  # bench/hardware.py (the script's directory is on sys.path)
import randlift_dist.ops.blocked as BK
import randlift_dist.ops.kernels as K
import randlift_dist.ops.window as WIN
import randlift_dist.ops.workspace as W
import step_cnn
from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift

CLOCK = time.perf_counter


# ----------------------------------------------------------------------------- kernel timers
class KernelTimers:
    """Wall time spent inside the aggregation kernels' autograd functions (forward, backward).

    Wraps the `forward` / `backward` of every `torch.autograd.Function` defined in
    `randlift_dist.ops.kernels` and `ops.blocked` for the lifetime of the object (`restore()` undoes it). On CPU the
    kernels are synchronous, so wall time around them is their cost.
    """

    def __init__(self):
        self.fwd = self.bwd = 0.0
        self.by_kind: dict[str, float] = {}  # "<function> d_v x d_u": forward + backward seconds
        self.saved = []
        classes = {id(c): c for mod in (K, WIN) for c in vars(mod).values() if isinstance(c, type)}
        for cls in classes.values():
            if issubclass(cls, torch.autograd.Function) and cls.__module__ in (K.__name__, BK.__name__, WIN.__name__):
                for attr in ("forward", "backward"):
                    orig = cls.__dict__[attr]
                    self.saved.append((cls, attr, orig))
                    setattr(cls, attr, staticmethod(self._timed(orig.__func__, attr)))

    def _timed(self, fn, attr):
        def wrapper(ctx, *args):
            if attr == "forward":  # args: y, w, ...
                ctx.bench_kind = f"{type(ctx).__name__.replace('Backward', '')} {args[1].shape[1]}x{args[1].shape[2]}"
            t0 = CLOCK()
            try:
                return fn(ctx, *args)
            finally:
                dt = CLOCK() - t0
                if attr == "forward":
                    self.fwd += dt
                else:
                    self.bwd += dt
                kind = getattr(ctx, "bench_kind", "?")
                self.by_kind[kind] = self.by_kind.get(kind, 0.0) + dt
        return wrapper

    def reset(self):
        self.fwd = self.bwd = 0.0
        self.by_kind = {}

    def restore(self):
        for cls, attr, orig in self.saved:
            setattr(cls, attr, orig)


# ----------------------------------------------------------------------------- models
def build_case(name: str, args):
    """(title, base, net, in_dim, out_dim): the lifted network of one benchmark case."""
    if name == "d16":
        base = BaseGraph.residual_mlp(args.in_dim, args.width, args.depth, 1, activation="relu")
        lift = random_sparse_lift(base, size=args.size, degree=args.degree, seed=0)
        title = (f"residual MLP width {args.width}, depth {args.depth}, s = {args.size}, "
                 f"degree {args.degree:g} (bernoulli)")
    elif name == "d1":
        base = BaseGraph.mlp(1, [1] * args.depth, 1, activation="relu")
        lift = random_sparse_lift(base, size=args.size1, degree=args.degree1, seed=0)
        title = f"MLP of scalar vertices, depth {args.depth}, s = {args.size1}, degree {args.degree1:g} (bernoulli)"
    else:
        raise ValueError(f"case {name!r}: choose d16 or d1")
    impl = args.impl if name == "d16" else args.impl1
    net = LiftedNetwork(base, lift, readout_scale="sqrt", readout_init="normal", seed=0, impl=impl)
    title += f", impl {impl}"
    return title, base, net, base.in_dim, net.out_dim


def edge_params(net: LiftedNetwork, base: BaseGraph) -> int:
    """Parameters of the lifted edges (`[m, d_v, d_u]` weights), the FLOP-carrying ones."""
    return sum(net.edge_weight(e).numel() for e in base.edges)


def dense_mlp(params: int, layers: int) -> tuple[torch.nn.Module, int]:
    """`layers` square bias-free Linear layers (ReLU between) with about `params` weights."""
    width = max(64, int(round((params / layers) ** 0.5 / 64)) * 64)
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width, bias=False))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods), width


def make_adam(params, kind: str):
    if kind == "fused":
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    if kind == "foreach":
        return torch.optim.Adam(params, lr=1e-4, foreach=True)
    return torch.optim.Adam(params, lr=1e-4, foreach=False)


def timed_step(model, opt, x, target, timers: KernelTimers | None):
    """One training step; returns (forward, backward, optimizer) seconds and kernel seconds."""
    if timers is not None:
        timers.reset()
    opt.zero_grad(set_to_none=True)
    t0 = CLOCK()
    loss = F.mse_loss(model(x), target)
    t1 = CLOCK()
    loss.backward()
    t2 = CLOCK()
    opt.step()
    t3 = CLOCK()
    kern = (timers.fwd, timers.bwd, dict(timers.by_kind)) if timers is not None else (0.0, 0.0, {})
    return (t1 - t0, t2 - t1, t3 - t2), kern


def best_of(fn, repeats: int):
    """Min over `repeats` runs (after one warm-up) of each component returned by fn."""
    fn()
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: sum(r[0]))


# ----------------------------------------------------------------------------- gather floor
def gather_floor(net: LiftedNetwork, base: BaseGraph, B: int, repeats: int) -> float:
    """Seconds of three passes of one gathered `[B]` row per lifted edge (d = 1 only).

    Forward and weight-gradient passes gather source rows in target order, the input-gradient
    pass gathers target rows in source order; each into a reused buffer of the kernels' chunk
    size (so the gathered rows are read once from memory and written into cache)."""
    chunk = max(1, W.CHUNK_ELEMS // B)
    buf = torch.empty(chunk, B)
    passes = []
    g = torch.Generator().manual_seed(0)
    for e in base.edges:
        src, dst = net.edge_index(e)
        order = torch.argsort(dst * (int(src.max()) + 1 if src.numel() else 1) + src)
        by_dst = src[order].contiguous()  # sources in target order
        by_src = dst[torch.argsort(src, stable=True)].contiguous()  # targets in source order
        y = torch.randn(net.lift.n(e.src), B, generator=g)
        gz = torch.randn(net.lift.n(e.dst), B, generator=g)
        passes += [(y, by_dst), (gz, by_src), (y, by_dst)]

    def run():
        t0 = CLOCK()
        for table, idx in passes:
            for s in range(0, idx.numel(), chunk):
                part = idx[s:s + chunk]
                torch.index_select(table, 0, part, out=buf[:part.numel()])
        return CLOCK() - t0

    run()
    return min(run() for _ in range(repeats))


# ----------------------------------------------------------------------------- main
def gflops(flops: float, s: float) -> float:
    return flops / s / 1e9


def run_case(name: str, args) -> None:
    t0 = CLOCK()
    title, base, net, in_dim, out_dim = build_case(name, args)
    B = args.batch
    P = sum(p.numel() for p in net.parameters())
    Pe = edge_params(net, base)
    m = net.num_edges()
    print(f"\n## {name}: {title}, B = {B}: {P / 1e6:.1f}M parameters ({Pe / 1e6:.1f}M in edge weights), "
          f"{m / 1e6:.2f}M lifted edges (built in {CLOCK() - t0:.0f} s)")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, in_dim, generator=g)
    target = torch.randn(B, out_dim, generator=g)
    opt = make_adam(net.parameters(), args.adam)
    timers = KernelTimers()
    try:
        (tf, tb, to), (kf, kb, kinds) = best_of(lambda: timed_step(net, opt, x, target, timers), args.repeats)
    finally:
        timers.restore()
    total = tf + tb + to
    flops = 6.0 * B * Pe
    print(f"step {total * 1e3:.0f} ms (min of {args.repeats}): {B / total:.1f} samples/s, "
          f"{m * B / total / 1e9:.2f} G lifted edge-samples/s, {flops / 1e9:.1f} GFLOP, "
          f"{gflops(flops, total):.1f} GFLOP/s")
    print(f"  forward {tf * 1e3:.0f} ms ({gflops(flops / 3, tf):.1f} GFLOP/s), "
          f"backward {tb * 1e3:.0f} ms ({gflops(2 * flops / 3, tb):.1f} GFLOP/s)")
    rest = total - kf - kb - to
    print(f"  aggregation {(kf + kb) * 1e3:.0f} ms ({100 * (kf + kb) / total:.0f}%: forward {kf * 1e3:.0f}, "
          f"backward {kb * 1e3:.0f}; {gflops(flops, kf + kb):.1f} GFLOP/s in the kernels)")
    print("    by kernel and block shape d_v x d_u (forward + backward): "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print("  exchange 0 ms (world size 1: nothing to exchange; sharded: bench/step_sharded.py)")
    print(f"  optimizer (Adam, {args.adam}) {to * 1e3:.0f} ms ({100 * to / total:.0f}%)")
    print(f"  rest (activations, loss, autograd) {rest * 1e3:.0f} ms ({100 * rest / total:.0f}%)")
    del opt

    if name == "d1" and not args.no_floor:
        floor = gather_floor(net, base, B, args.repeats)
        agg = kf + kb
        print(f"  gather floor (3 passes of one [B] row per edge) {floor * 1e3:.0f} ms: "
              f"step / floor = {total / floor:.2f}, kernels / floor = {agg / floor:.2f} "
              f"({3 * m * B * 4 / floor / 1e9:.1f} GB/s gathered)")
    del net

    if not args.no_dense:
        dense, width = dense_mlp(Pe, args.dense_layers)
        Pd = sum(p.numel() for p in dense.parameters())
        xd = torch.randn(B, width, generator=g)
        td = torch.randn(B, width, generator=g)
        dopt = make_adam(dense.parameters(), args.adam)
        (df, db, do), _ = best_of(lambda: timed_step(dense, dopt, xd, td, None), args.repeats)
        dtot = df + db + do
        dflops = 6.0 * B * Pd
        print(f"dense MLP ({args.dense_layers} x Linear({width}, {width}), {Pd / 1e6:.1f}M parameters) step "
              f"{dtot * 1e3:.0f} ms: forward {df * 1e3:.0f}, backward {db * 1e3:.0f}, Adam {do * 1e3:.0f}; "
              f"{gflops(dflops, dtot):.1f} GFLOP/s ({gflops(dflops, df + db):.1f} without Adam)")
        print(f"  lift / dense FLOP rate: step {gflops(flops, total) / gflops(dflops, dtot):.2f}, "
              f"forward+backward {gflops(flops, tf + tb) / gflops(dflops, df + db):.2f}")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="d16,d1", help="comma-separated: d16, d1, cnn1d, cnn2d")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=16, help="d16 case: vertex dimension")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (both cases)")
    p.add_argument("--in-dim", type=int, default=16, help="d16 case: input dimension")
    p.add_argument("--size", type=int, default=8192, help="d16 case: lift size s")
    p.add_argument("--degree", type=float, default=16, help="d16 case: average degree")
    p.add_argument("--size1", type=int, default=65536, help="d1 case: lift size s")
    p.add_argument("--degree1", type=float, default=32, help="d1 case: average degree")
    p.add_argument("--impl", default="auto", help="d16 case: aggregation kernel (ops.IMPLS)")
    p.add_argument("--impl1", default="auto", help="d1 case: aggregation kernel (ops.IMPLS)")
    p.add_argument("--adam", choices=["fused", "foreach", "loop"], default="fused")
    p.add_argument("--dense-layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: CPU time of the main thread with 1 torch thread (robust on a busy machine)")
    p.add_argument("--no-thp", action="store_true", help="leave THP_MEM_ALLOC_ENABLE unset")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--no-floor", action="store_true")
    step_cnn.add_arguments(p)
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = choose_clock(args.clock, args.threads)
    print("# training step benchmark")
    print(hardware_line())
    print(f"clock {args.clock}, torch threads {torch.get_num_threads()}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}, load average at start {os.getloadavg()[0]:.2f}")
    for name in args.cases.split(","):
        if name.strip() in ("cnn1d", "cnn2d"):
            step_cnn.run(name.strip(), args, sys.modules[__name__])
        else:
            run_case(name.strip(), args)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
