"""Local aggregation kernels against torch's sparse CSR SpMM and a dense matmul of the same FLOPs.

Run: `python bench/kernels.py` (defaults: ~30 s on 2 idle cores), or e.g.
`python bench/kernels.py --n 8192 --batch 64 --repeats 5 --impls auto,blocked --threads 2`.

RESULTS. Hardware: Intel Xeon (family 6 model 207, Sapphire Rapids class; AVX-512, AMX), KVM
guest, 2 cores, 24 GiB; 2 torch threads, torch 2.13.0+cpu (MKL), fp32. The VM was shared with
other jobs (load average 1 to 13 during this work): every number below is a min over repeated
(and, before/after, interleaved) runs taken at load average 0.8-1.5, and still +-15%.

Default run (`python bench/kernels.py`, load average 0.8, 24 s in total):

  case (B = 256, bernoulli)   ours fwd / fwd+bwd      torch.sparse CSR        dense same-FLOPs
  d = 1,  fan-in 16           20 ms / 69 ms           31 ms / 5069 ms         8.9 ms / 13 ms
  d = 1,  fan-in 32           34 ms / 118 ms          43 ms / 4821 ms         12.6 ms / 11 ms
  d = 16, fan-in 16           81 ms / 226 ms          109 ms / 7610 ms        18.6 ms / 78 ms
  (ours: 13-16 GFLOP/s and 25-33 GB/s of lower-bound traffic at d = 1; 53-57 GFLOP/s at
  d = 16. torch.sparse with autograd through the values: 1.3-1.5x slower forward, 34-73x
  slower forward+backward. The dense same-FLOPs matmul, i.e. the gather made free, is 2-3x
  below ours in forward at d = 1 and 3-4x at d = 16: the gathers are what is left.)

Before -> after (old = the kernels of commit 0baf6a0; old and new interleaved, 2 threads,
bernoulli degrees; n = 32768 at d = 1 and n = 2048 at d = 16, B = 256, unless noted):

  case                           fwd before -> after      fwd+bwd before -> after
  d = 1,  k = 16 (csr)           32.6 -> 23.1 ms (1.4x)   93 -> 75 ms (1.25x)
  d = 1,  k = 32 (csr)           52.9 -> 36.9 ms (1.4x)   164 -> 125 ms (1.3x)
  d = 1,  k = 16, n = 16384, blocked  274 -> 39 ms (7x)  674 -> 123 ms (5.5x)
  d = 16, k = 16, bernoulli      110 -> 66 ms (1.7x)      542 -> 222 ms (2.4x)
  d = 16, k = 16, fixed degree   147 -> 55 ms (2.7x)      512 -> 202 ms (2.5x)
  d = 16, B = 32                 20.1 -> 15.3 ms (1.3x)   62 -> 46 ms (1.3x)
  d = 16, B = 1, n = 4096        9.8 -> 9.9 ms (1.0x)     68 -> 35 ms (1.9x)
  d_v = 16, d_u = 1, n = 8192    205 -> 68 ms (3.0x)      773 -> 349 ms (2.2x)
  d_v = 1, d_u = 16, n = 8192    317 -> 67 ms (4.7x)      974 -> 193 ms (5.0x)
  (the old blocked kernel swung to 3-30x slower than this under load: its backward scattered
  with `index_add_`, one slice at a time.)

Prediction (before optimising). d = 1 is bound by reading the gathered source rows:
m * B * 4 = 537 MB at fan-in 16, so ~25 ms per SpMM at ~20 GB/s; the backward is two more such
passes (transposed SpMM, sampled product), so ~75-80 ms forward+backward is the floor of this
formulation: expect small gains only (allocation, index conversion), and that is what happened.
d = 16 has d/2 = 8 FLOP per gathered byte: ~27 ms to gather 537 MB plus ~25 ms of GEMM at
~170 GFLOP/s, so ~50 ms forward, ~150 ms forward+backward; the old kernel's backward (3.6x its
forward: a serial `index_add_` and per-edge GEMMs with inner dimension 16) was the target.
Measured 55-66 ms forward, ~200 ms forward+backward: the gathers (`index_select`, ~55% of the
time) and the GEMMs (~35%) dominate; the rest is per-chunk overhead and the output scatter.

What was tried (measured on this VM; numbers are 1 or 2 threads as noted):
- Blocked forward: per target-row degree group, gathered sources [c, k*d_u, B] times weights
  laid side by side [c, d_v, k*d_u] (kept: inner dimension k*d instead of d, no scatter-add).
  Per-edge GEMM + sum over k was 1.9x slower at B = 256 (1 thread) but 1.3-1.5x faster for
  B < d (kept as the small-batch path, summing each row's messages with a 0/1 CSR SpMM: ~10x
  faster than `index_add_` or `segment_reduce` at B = 1; `segment_reduce` was 5x slower than
  `index_add_` at B = 32).
- Input gradient as the same kernel on the transposed structure (sources grouped by
  out-degree; weights used through a transposed view, no rearranging): deterministic, no
  `index_add_` (the old kernel's main cost).
- Weight gradient: `gathered @ gz^T` then a transposing copy ran 1.3x faster than
  `gz @ gathered^T` (MKL batched GEMM with a transposed right operand).
- Scratch buffers reused across chunks and calls (`index_select(out=...)`): a fresh 537 MB
  gather took 455 ms vs 100 ms into a reused buffer (1 thread): fresh pages dominate on this VM.
- Chunk sizes 2**17 to 2**22 elements: flat within noise from 2**19 up; 2**17 up to 1.5x
  slower (bernoulli degrees: more, smaller chunks).
- Putting chunk outputs in row order: per-chunk `index_copy_` and a reused degree-sorted buffer
  + one `index_select` are within ~5%; a freshly allocated sorted buffer was 1.2-2x slower.
- `bmm` with an inner dimension of 1 (outer products at B = 1) is ~20x slower than a broadcast
  multiply: special-cased.
- Scalar CSR: `addmm(beta=0)` into an uninitialised output instead of `torch.sparse.mm` (which
  zero-fills and allocates twice): 49 vs 69 ms at 1 thread; int32 indices cached (MKL converts
  int64 indices on every call). `torch.sparse.mm(A.t(), g)` converts the matrix on every call
  (2x slower than the cached transpose when idle, 15x under load). `embedding_bag` with
  per-sample weights, and its per-sample-weight backward, matched MKL SpMM and `sampled_addmm`
  (no gain); the blocked kernel's weight gradient at d = 1 was 3x slower than `sampled_addmm`.
- Scalar targets with vector sources (d_v = 1 < d_u): the scalar CSR matrix [n_v, n_u * d_u]
  over the flat weights beats the blocked kernel 2.3-3.6x in forward, 1.3-3.8x in the
  gradients (the blocked GEMMs have one row there): `auto` uses it.
- Environment (not set by this code): `THP_MEM_ALLOC_ENABLE=1` makes torch's CPU allocator use
  huge pages for big tensors; a fresh 32 MiB tensor then costs 4.8 ms instead of 21 ms to fill
  (1 thread). Every large activation on this VM pays that, kernels or not.
- Not tried: anything compiled (Triton, C++, torch.compile): out of scope for this pass.

Second pass (the training step, `bench/step.py`). Hardware: AMD EPYC (family 26 model 2,
AVX-512), KVM guest, 2 cores, 24 GiB; MKL's dense GEMM 100 GFLOP/s on one thread. The VM was
busy throughout (load average 3-14), so these are `--clock thread` (1 thread, CPU time), min
over interleaved runs, THP_MEM_ALLOC_ENABLE=1. Old = commit 30248be, new = this one:

  2 threads, wall, load 1.4-1.6, 2**21 chunks:
  d = 16, k = 16, n = 8192, fused / separate   -                    199-204 / 332 vs 395 ms
  d_v = 1, d_u = 16, n = 8192, fused / SpMM    -                    153 / 53-58 vs 105 ms
  d = 1, k = 32, n = 65536, fused / SpMM       -                    bwd 229 vs 253 ms

  case (1 thread, B = 256, bernoulli)          old fwd / bwd        new fwd / bwd
  d = 16, k = 16, n = 8192 (load 3.0)          405 / 772 ms         384 / 632 ms (1.16x)
  d = 16, k = 16, n = 8192, fixed degree       363 / 737 ms         376 / 646 ms (1.08x)
  d = 1, k = 32, n = 65536 (load 3.1)          256 / 499 ms         255 / 380 ms (1.19x)
  default run, d = 16, n = 2048 (load 9)       115 / 351 ms (f+b)   91 / 247 ms (f+b) (1.4x)
  default run, d = 1, k = 32, n = 32768        118 / 339 ms (f+b)   122 / 308 ms (f+b)

What changed, and what was measured on the way (1 thread unless noted):
- Fused backward (`_blocked_backward`): both gradients from ONE gather of output-gradient
  rows per chunk of sources (the weight gradient uses the sources' own rows, in place), so the
  source rows are not gathered a second time; the per-edge gradient blocks are written with
  one `index_copy_` per chunk (B / d_v times fewer bytes than the saved gather). Backward 1.2x
  (low load) to 1.4x (load 14) faster at d = 16. The scalar CSR path's backward uses it for
  vector sources (d_u = 16: 123 vs 244 ms at n = 8192) and for scalar sources of >= 32 MiB
  (d = 1, n = 65536: 1.2x faster); for sources that fit a cache (16 MiB) it was 1.5-2x slower
  than the transposed SpMM + `sampled_addmm` (the second gather is then cheap), which are kept.
- Per-group edge lists cached on the CSR (`DegreeGroups.edges`): a chunk's edges are a slice,
  not recomputed from the row pointer per chunk.
- Chunk size: at 1 thread 2**16 to 2**21 elements gave fwd 800 / 720 / 604 / 554 / 573 / 642 ms
  (load 14), but at 2 threads (wall, load 1.4) 2**19 / 2**20 / 2**21 / 2**22 gave fused
  backward 753 / 349 / 333 / 350 ms and fwd 268 / 218 / 204 / 213 ms: 2**21 is kept. The
  1-thread rows of the table above ran at 2**19.
- Weight blocks of non-contiguous groups gathered whole and then transposed in one strided copy
  instead of gathering d_u-element rows: 24 vs 34 ms per 131072 16x16 blocks.
- Tried, no gain: a degree-sorted output buffer + one final gather instead of per-chunk
  `index_copy_` (375 vs 389 ms forward, noise); skipping the weight rearrangement altogether
  (366 ms: an upper bound of what it costs). The forward (375-390 ms at d = 16) sits at its
  floor: gather 123 ms (17 GB/s) + in-cache batched GEMM 220 ms (78 GFLOP/s), serial.
- The blocked kernel now beats the scalar CSR forward at d_v = 1, d_u = 16 on this CPU (191 vs
  318 ms at n = 8192, load 14); within the training step the difference was small (843 vs 879
  ms forward+backward, the backward being shared).
- Environment: THP_MEM_ALLOC_ENABLE=1 makes fresh big tensors cheap (relu of a 134 MB tensor
  11 vs 58 ms; layer forward 491 vs 595 ms at load 12); `bench/step.py` sets it by default.

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
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from hardware import choose_clock, hardware_line  # bench/hardware.py (the script's directory is on sys.path)
from randlift_dist.ops import CSR, aggregate


def cpu_details() -> str:
    """CPU family/model numbers and the vector extensions that matter for GEMMs."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        return "cpu details unknown"
    flags = set(info.get("flags", "").split())
    ext = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    return f"cpu family {info.get('cpu family', '?')} model {info.get('model', '?')}; {', '.join(ext) or 'no avx2'}"


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
    CLOCK = choose_clock(args.clock, args.threads)
    impls = args.impls.split(",")

    print("# aggregation kernels benchmark")
    print(hardware_line())
    print(f"{cpu_details()}; torch threads {torch.get_num_threads()}")
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')} "
          f"(1 makes fresh large tensors use huge pages: much cheaper page faults on VMs)")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    print(f"clock: {args.clock}; times: min over runs (fp32); ratios: method / ours (> 1: ours faster)")
    print("dense = a dense matmul doing the SAME FLOP count as the sparse product ([n*d, k*d] @ [k*d, B], "
          "i.e. the gather made free), not the full dense [n*d, n*d] matrix")
    print("GB/s = the problem's lower-bound traffic (gathered rows + weights + outputs) / time, for every method")
    t0 = time.perf_counter()
    for k in args.fan_in:
        run_case(f"scalar vertices, fan-in {k:g}", args.n, k, 1, args.batch, args, impls)
    run_case(f"block vertices d = {args.d}, fan-in {args.block_fan_in:g}", args.n_block, args.block_fan_in,
             args.d, args.batch, args, impls)
    load = f", load average at end: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"\ntotal {time.perf_counter() - t0:.0f} s{load}")


if __name__ == "__main__":
    main()
