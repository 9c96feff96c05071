"""Scratch memory and small shared pieces of the CPU kernels: chunk budgets, reused workspaces,
MKL CSR products, and a batched matmul that handles outer products.

The chunk budget bounds every gathered block of the degree-grouped kernels (`blocked.py`): the
kernels read `CHUNK_ELEMS` / `CHUNK_ELEMS_ACCEL` / `WS_CACHE_MAX` from this module at call time,
so tests and benchmarks can change them.
"""

from __future__ import annotations

import threading
import warnings

import torch

# Elements of one gathered chunk ([rows, k * d, B], and of its weight blocks) in the blocked
# kernel. 2**21 fp32 elements is 8 MiB: the chunk is consumed by the matmul while it is still in
# cache, and there are few enough chunks that per-op overhead stays small (measured: 2**19 to
# 2**22 are within noise at d = 16, B = 256; 2**17 is 1.5x slower). The workspaces are reused.
# On a 2-core AMD EPYC: with 2 threads 2**21 is best (fused backward 333 ms vs 349 at 2**20 and
# 2**22, up to 2x slower at 2**19); with 1 thread 2**19 is ~10% faster, but training uses both.
CHUNK_ELEMS = 1 << 21
# On accelerators, bigger chunks (fewer kernel launches; the caching allocator makes them cheap).
# Untested on a GPU so far: tune there.
CHUNK_ELEMS_ACCEL = 1 << 25
# Elements of one chunk's gathered buffers ([chunk edges, d, B]) in the regenerated-topology
# kernel (`regen.py`): 8M fp32 elements (32 MiB), a few sampling blocks per chunk at d = 1.
REGEN_CHUNK_ELEMS = 1 << 23
# Edges per chunk on its scalar CPU path, which holds no per-edge values: its index arrays (~50 B
# per edge while prepared, twice with the chunk drawn ahead) and one pass over the source rows
# per chunk in the backward (so chunks should not be much smaller than a fibre).
REGEN_CHUNK_EDGES = 1 << 20
# Runs of blocks of a regenerated edge drawn ahead on helper threads (`model.BlockChunks`), by as
# many threads, while the current run computes: DRAW_AHEAD + 1 runs of indices exist at once.
DRAW_AHEAD = 2
# Elements of one unfolded chunk of a conv edge's sources (`window.py`): the k-fold copy made in the
# forward and again in the backward, never kept; 2**24 fp32 elements is 64 MiB. Beyond it the batch
# is cut into chunks (each a kernel call: at least a few samples per call keeps GEMMs wide).
WINDOW_CHUNK_ELEMS = 1 << 24
WINDOW_CHUNK_ELEMS_ACCEL = 1 << 28
# Scratch buffers up to this many elements are kept for reuse (per thread, dtype and slot; six
# slots, so at most ~6 * 32 MiB in fp32, typically much less); bigger ones are allocated per call.
WS_CACHE_MAX = 1 << 23


# ----------------------------------------------------------------------------- workspaces
_tls = threading.local()


def workspace(n: int, like: torch.Tensor, slot: int) -> torch.Tensor:
    """A flat scratch buffer of n elements, reused across calls on CPU (per thread, dtype, slot).

    Only on CPU and up to `WS_CACHE_MAX` elements: there a fresh multi-MiB allocation is a fresh
    mmap whose page faults cost more than the copy into it. On accelerators the caching allocator
    already recycles memory (and reusing one buffer across streams would need stream bookkeeping),
    so we allocate.
    """
    if like.device.type != "cpu" or n > WS_CACHE_MAX:
        return like.new_empty(n)
    cache = getattr(_tls, "ws", None)
    if cache is None:
        cache = _tls.ws = {}
    key = (like.dtype, slot)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = like.new_empty(max(n, 1024))
    return buf[:n]


def release_workspaces() -> None:
    """Free this thread's cached scratch buffers (a few tens of MiB at most; see `_workspace`)."""
    _tls.ws = {}


def ws_view(shape: tuple[int, ...], like: torch.Tensor, slot: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return workspace(n, like, slot).view(shape)


# ----------------------------------------------------------------------------- CSR products
def csr_tensor(indptr, col, values, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(indptr, col, values, size=shape, check_invariants=False)


def spmm(A: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`A @ x` for a CSR matrix A (into `out` if given). On CPU, into an uninitialised output with
    `addmm(beta=0)` (documented to ignore the input; MKL writes every row, empty ones as 0):
    `torch.sparse.mm` zero-fills a fresh output and allocates once more, which cost ~20 ms of
    ~50 ms at 32768 x 256 on the benchmark VM (page faults of fresh 32 MiB buffers dominate)."""
    if x.device.type != "cpu":
        r = torch.sparse.mm(A, x)
        return r if out is None else out.copy_(r)
    if out is None:
        out = x.new_empty(A.shape[0], x.shape[1])
    return torch.addmm(out, A, x, beta=0.0, out=out)


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(a, b, out=out)`, except an inner dimension of 1 (outer products), where MKL's
    batched GEMM is ~20x slower than the broadcast product."""
    if a.shape[2] == 1:
        return torch.mul(a, b, out=out)
    return torch.bmm(a, b, out=out)
