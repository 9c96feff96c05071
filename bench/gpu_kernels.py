"""Aggregation kernels on a GPU: ours against torch.sparse (CSR) and a dense matmul of equal FLOPs.

`python bench/gpu_kernels.py [--device cuda] [--n 65536] [--batch 256]` prints, side by side in
one run and with the device named, forward and forward+backward times (CUDA events), GFLOP/s and
the ratios to ours, for scalar vertices (d = 1, fan-in 16 and 32) and 16 x 16 blocks (fan-in 16).
With `--device cpu` it runs the same comparison on the CPU (to check the script). No GPU has been
available to this project yet: no GPU numbers are recorded here.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from hardware import hardware_line
from randlift_dist.ops import CSR, aggregate


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev: torch.device, repeats: int) -> float:
    fn()
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def case(n: int, k: int, d: int, B: int, dev: torch.device, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    row = torch.arange(n).repeat_interleave(k)
    col = torch.randint(0, n, (n * k,), generator=g)
    key = torch.unique(row * n + col)
    row, col = key // n, key % n
    m = row.numel()
    csr = CSR(row, col, n, n).to(dev)
    y = torch.randn(n, d, B, device=dev, requires_grad=True)
    w = torch.randn(m, d, d, device=dev, requires_grad=True)
    flops = 2.0 * m * d * d * B

    def ours_f():
        with torch.no_grad():
            aggregate(y, w, csr)

    def ours_fb():
        aggregate(y, w, csr).sum().backward()

    # torch.sparse: the scalar CSR of the block structure, autograd through the values
    rows = (row.to(dev)[:, None, None] * d + torch.arange(d, device=dev)[None, :, None]).expand(m, d, d)
    cols = (col.to(dev)[:, None, None] * d + torch.arange(d, device=dev)[None, None, :]).expand(m, d, d)
    order = torch.argsort(rows.reshape(-1) * (n * d) + cols.reshape(-1))
    r_s, c_s = rows.reshape(-1)[order], cols.reshape(-1)[order]
    crow = torch.zeros(n * d + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(r_s, minlength=n * d), 0)
    vals = torch.randn(order.numel(), device=dev, requires_grad=True)
    Y = torch.randn(n * d, B, device=dev, requires_grad=True)

    def sparse_mat():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, c_s, vals, size=(n * d, n * d))

    def sp_f():
        with torch.no_grad():
            torch.sparse.mm(sparse_mat(), Y)

    def sp_fb():
        torch.sparse.mm(sparse_mat(), Y).sum().backward()

    side = max(1, int(round((flops / (2 * B)) ** 0.5)))
    A = torch.randn(side, side, device=dev, requires_grad=True)
    X = torch.randn(side, B, device=dev, requires_grad=True)

    def de_f():
        with torch.no_grad():
            A @ X

    def de_fb():
        (A @ X).sum().backward()

    res = {}
    for name, f, fb in (("ours", ours_f, ours_fb), ("torch.sparse", sp_f, sp_fb), ("dense", de_f, de_fb)):
        try:
            res[name] = (bench(f, dev, repeats), bench(fb, dev, repeats))
        except RuntimeError as err:  # e.g. a sparse op missing for this device or dtype
            res[name] = None
            print(f"  {name}: not run ({str(err).splitlines()[0]})")
    print(f"d={d} fan-in {k}, n={n}, B={B}, m={m} edges, {flops / 1e9:.2f} GFLOP forward")
    base = res["ours"]
    for name, r in res.items():
        if r is None:
            continue
        print(f"  {name:13s} fwd {r[0]:9.3f} ms ({flops / r[0] / 1e6:7.1f} GFLOP/s, {r[0] / base[0]:6.2f}x ours)"
              f"   fwd+bwd {r[1]:9.3f} ms ({3 * flops / r[1] / 1e6:7.1f} GFLOP/s, {r[1] / base[1]:6.2f}x ours)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--n-block", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(hardware_line(), f"| device {dev}")
    case(args.n, 16, 1, args.batch, dev, args.repeats)
    case(args.n, 32, 1, args.batch, dev, args.repeats)
    case(args.n_block, 16, 16, args.batch, dev, args.repeats)


if __name__ == "__main__":
    main()
