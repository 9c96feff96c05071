"""Local aggregation kernels against torch's sparse CSR SpMM and a dense matmul of the same FLOPs.

Run: `python bench/kernels.py` (defaults: ~1 minute on 2 cores), or e.g.
`python bench/kernels.py --n 8192 --batch 64 --repeats 5 --impls auto,blocked --threads 2`.

RESULTS (filled in by hand; hardware: Intel Xeon (Sapphire Rapids, KVM), 2 cores, torch
2.13.0+cpu, 2 threads, fp32, bernoulli degrees, B = 256; min of repeats, on a shared VM whose
load average was 3 to 10 during the runs, so treat +-20% as noise)

  PLACEHOLDER

Counting. FLOPs: 2 * m * d_v * d_u * B forward, twice that for the backward (input and weight
gradients), so forward+backward counts 3x. Bytes (a lower bound, fp32): forward reads the
gathered source rows (m * d_u * B), the weights (m * d_v * d_u) and writes z (n_v * d_v * B);
the backward reads the gathered output gradients (m * d_v * B), the weights, the gradient rows
(n_v * d_v * B), the gathered source rows again (m * d_u * B) and writes gy (n_u * d_u * B) and
gw (m * d_v * d_u). GB/s is that count over the measured time, for every method (it is the
problem's traffic, not what a method actually moves).

Baselines. `torch.sparse`: `torch.sparse.mm` on a CSR tensor whose values are a leaf tensor with
`requires_grad` (autograd through the values); for block vertices (d = 16) the equivalent scalar
CSR matrix of size [n*d, n*d] with d*d values per block edge. `dense`: NOT the dense
[n_v*d_v, n_u*d_u] x [n_u*d_u, B] product (which does n_u/k times more work) but a dense matmul
doing the SAME FLOP count as the sparse product: [n_v*d_v, k*d_u] x [k*d_u, B] with k the mean
fan-in, i.e. the sparse product with the gather made free. Ratios are (method time) / (ours).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from randlift_dist.ops import CSR, aggregate


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def draw_edges(n_v: int, n_u: int, k: float, law: str, rng: np.random.Generator):
    """Rows sorted, `deg[r]` distinct uniform sources per row (binomial or fixed degrees)."""
    deg = rng.binomial(n_u, k / n_u, n_v) if law == "bernoulli" else np.full(n_v, int(k))
    row = np.repeat(np.arange(n_v, dtype=np.int64), deg)
    src = rng.integers(0, n_u, size=row.size, dtype=np.int64)
    while True:  # redraw duplicates within a row
        order = np.argsort(row * n_u + src, kind="stable")
        src = src[order]
        dup = np.zeros(src.size, dtype=bool)
        dup[1:] = (src[1:] == src[:-1]) & (row[1:] == row[:-1])
        if not dup.any():
            return row, src, deg
        src[dup] = rng.integers(0, n_u, size=int(dup.sum()), dtype=np.int64)


def scalar_csr_of_blocks(csr: CSR, d_v: int, d_u: int):
    """Index arrays of the [n_v*d_v, n_u*d_u] scalar CSR matrix equal to the block structure."""
    deg = (csr.indptr[1:] - csr.indptr[:-1]).numpy()
    seg_len = np.repeat(deg * d_u, d_v)  # scalar row (j, v) holds the d_u columns of each edge of j
    seg_start = np.repeat(csr.indptr[:-1].numpy() * d_u, d_v)
    crow = np.zeros(seg_len.size + 1, dtype=np.int64)
    np.cumsum(seg_len, out=crow[1:])
    block_cols = (csr.col.numpy()[:, None] * d_u + np.arange(d_u)).reshape(-1)  # per edge, per u
    idx = np.repeat(seg_start - crow[:-1], seg_len) + np.arange(crow[-1])
    return torch.from_numpy(crow), torch.from_numpy(block_cols[idx])


CLOCK = time.perf_counter


def timeit(fn, repeats: int, budget_s: float):
    """(min, median, runs): one warm-up, then up to `repeats` runs while within `budget_s`."""
    t0 = CLOCK()
    fn()
    first = CLOCK() - t0
    times = []
    spent = first
    for _ in range(repeats):
        if times and spent > budget_s:
            break
        if not times and first > budget_s:  # too slow to repeat: report the warm-up run
            times.append(first)
            break
        t0 = CLOCK()
        fn()
        dt = CLOCK() - t0
        times.append(dt)
        spent += dt
    return min(times), statistics.median(times), len(times)


def run_case(title: str, n: int, k: float, d: int, B: int, args, impls: list[str]):
    rng = np.random.default_rng(args.seed)
    row, src, deg = draw_edges(n, n, k, args.law, rng)
    csr = CSR(torch.from_numpy(row), torch.from_numpy(src), n, n)
    m = csr.nnz
    g = torch.Generator().manual_seed(args.seed)
    y = torch.randn(n, d, B, generator=g).requires_grad_(True)
    w = (torch.randn(m, d, d, generator=g) / np.sqrt(k * d)).requires_grad_(True)
    gz = torch.randn(n, d, B, generator=g)

    flops_f = 2.0 * m * d * d * B
    bytes_f = 4.0 * (m * d * B + m * d * d + n * d * B)
    bytes_b = 4.0 * (2 * m * d * B + 2 * m * d * d + 2 * n * d * B)
    rows = []

    def add(name, f, fb, flops=(flops_f, 3 * flops_f), nbytes=(bytes_f, bytes_f + bytes_b)):
        tf = timeit(f, args.repeats, args.budget)
        tfb = timeit(fb, args.repeats, args.budget)
        rows.append((name, tf, tfb, flops, nbytes))

    for impl in impls:
        def f(impl=impl):
            aggregate(y, w, csr, impl)

        def fb(impl=impl):
            z = aggregate(y, w, csr, impl)
            z.backward(gz)
            y.grad = w.grad = None

        add(f"ours ({impl})", f, fb)

    # torch.sparse CSR baseline, autograd through the values
    if d == 1:
        crow, ccol = csr.indptr, csr.col
    else:
        crow, ccol = scalar_csr_of_blocks(csr, d, d)
    vals = torch.randn(ccol.numel(), generator=g).requires_grad_(True)
    Y = y.detach().reshape(n * d, B).clone().requires_grad_(True)
    G = gz.reshape(n * d, B)

    def sp_f():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            A = torch.sparse_csr_tensor(crow, ccol, vals, size=(n * d, n * d))
            return torch.sparse.mm(A, Y)

    def sp_fb():
        sp_f().backward(G)
        vals.grad = Y.grad = None

    if not args.no_sparse:
        add("torch.sparse CSR", sp_f, sp_fb)

    # dense matmul of the same FLOP count: each row's k*d inputs contiguous (gather made free)
    kk = max(1, int(round(m / n)))
    Ad = torch.randn(n * d, kk * d, generator=g).requires_grad_(True)
    Bd = torch.randn(kk * d, B, generator=g).requires_grad_(True)
    Gd = torch.randn(n * d, B, generator=g)
    dflops = 2.0 * n * d * kk * d * B
    dbytes_f = 4.0 * (Ad.numel() + Bd.numel() + Gd.numel())

    def de_fb():
        (Ad @ Bd).backward(Gd)
        Ad.grad = Bd.grad = None

    add(f"dense [{n * d}x{kk * d}]@[{kk * d}x{B}]", lambda: Ad @ Bd, de_fb,
        flops=(dflops, 3 * dflops), nbytes=(dbytes_f, 3 * dbytes_f))

    print(f"\n## {title}: n_v = n_u = {n}, d = {d}, mean fan-in {m / n:.2f} ({args.law}), B = {B}, "
          f"m = {m} edges, {flops_f / 1e9:.2f} GFLOP forward, {bytes_f / 1e6:.0f} MB forward traffic")
    print(f"{'method':34s} | {'fwd ms':>9s} {'GFLOP/s':>7s} {'GB/s':>6s} {'x ours':>6s} | "
          f"{'fwd+bwd ms':>10s} {'GFLOP/s':>7s} {'GB/s':>6s} {'x ours':>6s}")
    ours_f, ours_fb = rows[0][1][0], rows[0][2][0]
    for name, tf, tfb, flops, nbytes in rows:
        note = "" if tf[2] > 1 and tfb[2] > 1 else f"  (runs: {tf[2]}/{tfb[2]})"
        print(f"{name:34s} | {tf[0] * 1e3:9.1f} {flops[0] / tf[0] / 1e9:7.1f} {nbytes[0] / tf[0] / 1e9:6.1f} "
              f"{tf[0] / ours_f:6.2f} | {tfb[0] * 1e3:10.1f} {flops[1] / tfb[0] / 1e9:7.1f} "
              f"{nbytes[1] / tfb[0] / 1e9:6.1f} {tfb[0] / ours_fb:6.2f}{note}")
    sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32768, help="scalar rows per fibre for d = 1 (default 32768)")
    p.add_argument("--n-block", type=int, default=2048, help="vertices per fibre for d = 16 (default 2048)")
    p.add_argument("--fan-in", type=float, nargs="*", default=[16, 32], help="fan-ins for d = 1 (none: skip)")
    p.add_argument("--block-fan-in", type=float, default=16, help="fan-in (block edges) for d = 16")
    p.add_argument("--d", type=int, default=16, help="block size of the block case (default 16)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--law", choices=["bernoulli", "fixed_degree"], default="bernoulli")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per measurement before repeats stop")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--impls", default="auto", help="comma-separated impls of ours to time (first is the ratio base)")
    p.add_argument("--no-sparse", action="store_true", help="skip the torch.sparse baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: CPU time of the main thread (implies --threads 1); robust on a busy machine")
    args = p.parse_args(argv)
    global CLOCK
    if args.clock == "thread":
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls.split(",")

    print("# aggregation kernels benchmark")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} logical cpus, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')} "
          f"(1 makes fresh large tensors use huge pages: much cheaper page faults on VMs)")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    print(f"clock: {args.clock}; times: min over runs (fp32); ratios: method / ours (> 1: ours faster); "
          "dense: same FLOP count, see the module doc")
    t0 = time.perf_counter()
    for k in args.fan_in:
        run_case(f"scalar vertices, fan-in {k:g}", args.n, k, 1, args.batch, args, impls)
    run_case(f"block vertices d = {args.d}, fan-in {args.block_fan_in:g}", args.n_block, args.block_fan_in,
             args.d, args.batch, args, impls)
    load = f", load average at end: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"\ntotal {time.perf_counter() - t0:.0f} s{load}")


if __name__ == "__main__":
    main()
