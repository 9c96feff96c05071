"""Aggregation kernels on a GPU: triton and blocked against torch.sparse, Triton BSR and dense.

`python bench/gpu_kernels.py [--device cuda] [--repeats 5] [--budget-s 150]` prints, in one run
and with the device named:

- per case (scalar vertices d = 1 at fan-in 16 and 32 over 2**20 rows; 16 x 16 blocks at fan-in
  16 over 65536 rows; batch 256) and dtype (fp32, bf16): forward and forward+backward times (best
  of `--repeats`, synchronised wall clock) of `impl="triton"`, `impl="blocked"`, `torch.sparse.mm`
  on the equivalent scalar CSR matrix, `torch.sparse._triton_ops.bsr_dense_mm` on the BSR matrix
  of the blocks (d >= 16, forward only, when importable), and a dense matmul of equal FLOPs;
- for each: GFLOP/s, lifted edge-samples/s (edges x batch per second) and the GB/s implied by a
  traffic model, against the card's memory-bandwidth limit.

Traffic model (forward, bytes per edge-sample): one gathered source row per edge and sample
(`d_u * elt`), plus the weight block once per edge and the output once per row, both amortised
over the batch: `d_u*elt + (d_v*d_u*elt + 4) / B + n*d_v*elt / m`. For d = 1, bf16, fan-in 32,
B = 256: ~2.09 B, so an H100 (3.35 TB/s) is capped at ~1.6e12 edge-samples/s and an H200
(4.8 TB/s) at ~2.3e12. Forward+backward is counted as three such passes (forward, input
gradient, weight gradient). The limit uses the card's spec bandwidth when the card is known, and
a measured device-to-device copy bandwidth is printed next to it. With `--device cpu` the script
runs small shapes to check itself (blocked, torch.sparse and dense only). No GPU numbers are
recorded here yet.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from hardware import hardware_line  # bench/hardware.py (the script's directory is on sys.path)
from randlift_dist.ops import CSR, aggregate

SPEC_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}  # bytes/s (SXM parts)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev: torch.device, repeats: int) -> float:
    """Best wall time in ms after one warm-up call (which also compiles Triton kernels)."""
    fn()
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def spec_bandwidth(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((bw for key, bw in SPEC_BW.items() if key in name), None)


def copy_bandwidth(dev: torch.device) -> float:
    """Measured read+write bytes/s of a 1 GiB device-to-device copy (256 MiB on CPU)."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), dev, 5)
    return 2 * a.numel() * 4 / (ms / 1e3)


def make_csr(n: int, k: int, dev: torch.device, seed: int = 0) -> CSR:
    """n rows with ~k random distinct sources each among n (row-sorted)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    row = torch.arange(n, device=dev).repeat_interleave(k)
    col = torch.randint(0, n, (n * k,), generator=g, device=dev)
    key = torch.unique(row * n + col)
    return CSR(key // n, key % n, n, n)


def scalar_csr_matrix(csr: CSR, d: int):
    """`(crow, col, order)` of the `[n*d, n*d]` scalar CSR matrix of the block structure; `order`
    maps its values to `w.reshape(-1)` positions."""
    dev, m, n = csr.row.device, csr.nnz, csr.n_rows
    ar = torch.arange(d, device=dev)
    rows = (csr.row[:, None, None] * d + ar[None, :, None]).expand(m, d, d).reshape(-1)
    cols = (csr.col[:, None, None] * d + ar[None, None, :]).expand(m, d, d).reshape(-1)
    order = torch.argsort(rows * (n * d) + cols)
    crow = torch.zeros(n * d + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(rows[order], minlength=n * d), 0)
    return crow, cols[order], order


def case(n: int, k: int, d: int, B: int, dtype: torch.dtype, dev: torch.device, repeats: int,
         bw_limit: float | None, impls: list[str]) -> None:
    csr = make_csr(n, k, dev)
    m = csr.nnz
    g = torch.Generator(device=dev).manual_seed(1)
    y = torch.randn(n, d, B, device=dev, dtype=dtype, generator=g).requires_grad_()  # [n, d, B]
    w = (torch.randn(m, d, d, device=dev, dtype=dtype, generator=g) / k ** 0.5).requires_grad_()  # [m, d, d]
    elt = y.element_size()
    flops = 2.0 * m * d * d * B
    bytes_fwd = m * B * d * elt + m * (d * d * elt + 4) + n * d * B * elt
    runs: dict[str, tuple] = {}

    def ours(impl):
        def f():
            with torch.no_grad():
                aggregate(y, w, csr, impl)

        def fb():
            torch.autograd.grad(aggregate(y, w, csr, impl), (y, w), gz)
        return f, fb

    gz = torch.randn(n, d, B, device=dev, dtype=dtype, generator=g)  # [n, d, B]
    for impl in impls:
        runs[impl] = ours(impl)

    try:  # torch.sparse: the scalar CSR matrix of the blocks, autograd through values and dense
        crow, c_s, order = scalar_csr_matrix(csr, d)
        vals = w.detach().reshape(-1)[order].clone().requires_grad_()
        Y = y.detach().reshape(n * d, B).clone().requires_grad_()  # [n*d, B]
        del order

        def mat():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.sparse_csr_tensor(crow, c_s, vals, size=(n * d, n * d))

        def sp_f():
            with torch.no_grad():
                torch.sparse.mm(mat(), Y)

        def sp_fb():
            torch.autograd.grad(torch.sparse.mm(mat(), Y), (vals, Y), gz.reshape(n * d, B))
        runs["torch.sparse"] = (sp_f, sp_fb)
    except RuntimeError as err:
        print(f"  torch.sparse: not built ({str(err).splitlines()[0]})")

    if d >= 16 and dev.type == "cuda":
        try:
            from torch.sparse._triton_ops import bsr_dense_mm

            if bsr_dense_mm is None:  # torch defines it only when triton is usable
                raise ImportError("torch.sparse._triton_ops.bsr_dense_mm is None (no triton for torch)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bsr = torch.sparse_bsr_tensor(csr.indptr, csr.col, w.detach(), size=(n * d, n * d))
            Yd = y.detach().reshape(n * d, B)

            def bsr_f():
                bsr_dense_mm(bsr, Yd)
            runs["bsr_dense_mm"] = (bsr_f, None)
        except (ImportError, RuntimeError, ValueError, TypeError) as err:
            print(f"  bsr_dense_mm: not available ({str(err).splitlines()[0]})")

    side = max(16, int(round((flops / (2 * B)) ** 0.5)))
    A = torch.randn(side, side, device=dev, dtype=dtype, requires_grad=True)
    X = torch.randn(side, B, device=dev, dtype=dtype, requires_grad=True)

    def de_f():
        with torch.no_grad():
            A @ X

    gd = torch.randn(side, B, device=dev, dtype=dtype)

    def de_fb():
        torch.autograd.grad(A @ X, (A, X), gd)
    runs["dense"] = (de_f, de_fb)

    res = {}
    for name, (f, fb) in runs.items():
        try:
            res[name] = (bench(f, dev, repeats), bench(fb, dev, repeats) if fb else None)
        except Exception as err:  # noqa: BLE001 -- e.g. an op missing for this device or dtype
            print(f"  {name}: not run ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    per_es = bytes_fwd / (m * B)
    limit = f", limit {bw_limit / per_es:.2e} edge-samples/s at {bw_limit / 1e12:.2f} TB/s" if bw_limit else ""
    print(f"d={d} fan-in {k}, {str(dtype).replace('torch.', '')}, n={n}, B={B}, m={m} edges: "
          f"{flops / 1e9:.1f} GFLOP, {bytes_fwd / 1e9:.2f} GB forward ({per_es:.2f} B/edge-sample){limit}")
    ref_name = next((r for r in ("triton", "blocked") if r in res), None)
    if ref_name is None:
        return
    ref = res[ref_name]
    print(f"  (times also as a multiple of {ref_name}'s)")
    for name, (tf, tfb) in res.items():
        line = f"  {name:13s} fwd {tf:9.3f} ms {flops / tf / 1e9:8.2f} TFLOP/s {m * B / tf * 1e3:9.3e} edge-samples/s "
        if name != "dense":  # (dense: the rate at equal FLOPs; it has no gather traffic)
            line += f"{bytes_fwd / tf / 1e6:7.1f} GB/s" + (f" ({bytes_fwd / tf * 1e3 / bw_limit:5.1%} of bw)" if bw_limit else "")
        line += f" {tf / ref[0]:6.2f}x"
        if tfb is not None:
            line += (f" | fwd+bwd {tfb:9.3f} ms {3 * flops / tfb / 1e9:8.2f} TFLOP/s "
                     f"{3 * m * B / tfb * 1e3:9.3e} edge-samples/s")
            if ref[1]:
                line += f" {tfb / ref[1]:6.2f}x"
        print(line, flush=True)
    del runs, res
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="rows of the scalar cases (default 2**20 on GPU)")
    ap.add_argument("--n-block", type=int, default=None, help="rows of the 16 x 16 case (default 65536 on GPU)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--budget-s", type=float, default=150, help="skip the remaining cases after this long")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    n = args.n or (1 << 20 if gpu else 4096)
    n_block = args.n_block or (65536 if gpu else 512)
    from randlift_dist.ops import triton_kernels

    impls = ["blocked"]
    if gpu and triton_kernels.available():
        impls.insert(0, "triton")
    spec = spec_bandwidth(dev)
    measured = copy_bandwidth(dev)
    print(hardware_line(("triton",)), f"| device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if gpu else ""))
    print(f"memory bandwidth: spec {spec / 1e12:.2f} TB/s" if spec else "memory bandwidth: spec unknown",
          f"| measured copy {measured / 1e12:.2f} TB/s (read + write)")
    t0 = time.perf_counter()
    for dtype in [getattr(torch, s) for s in args.dtypes.split(",")]:
        for nn, k, d in ((n, 16, 1), (n, 32, 1), (n_block, 16, 16)):
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipped d={d} fan-in {k} {dtype}")
                continue
            try:
                case(nn, k, d, args.batch, dtype, dev, args.repeats, spec or measured, impls)
            except Exception as err:  # noqa: BLE001 -- record and go on to the next case
                print(f"d={d} fan-in {k} {dtype}: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
