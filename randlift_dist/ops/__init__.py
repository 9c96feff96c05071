"""Local aggregation kernels: `z[j] = sum over in-edges (i -> j) of W_ij @ y[i]`.

Layout (used across the project): activations are `[n, d, B]` (fibre rows, feature dim, batch
last and contiguous); edge weights are `[m, d_v, d_u]`; the edges are sorted by target row and
described by a `CSR` (row pointer over targets, `row` and `col` per edge).

Implementations, selected by `aggregate(..., impl=...)`:
- `reference`: plain torch ops under autograd (gathers `[m, d_u, B]`); the ground truth in tests.
- `csr`: scalar target vertices (`d_v = 1`; any `d_u`, the usual case being scalar vertices
  `d_u = d_v = 1`): the weights are the values of a scalar CSR matrix `[n_v, n_u * d_u]`; torch
  (MKL) CSR SpMM forward into an uninitialised output; backward is an SpMM with the cached
  transposed structure for the input and a sampled dense-dense product (`sampled_addmm`) for
  the weights (at B >= 16 with vector sources, or scalar sources of >= 32 MiB, the blocked fused
  backward instead). Indices cached as int32.
- `blocked`: any dims. Target rows are grouped by in-degree k (cached on the CSR); for a chunk of
  c rows with k edges, the sources are gathered into `[c, k*d_u, B]` and the weight blocks laid
  side by side as `[c, d_v, k*d_u]`, so one batched GEMM per chunk computes the sums over edges:
  no scatter-add, no `[m, d_v, B]` message tensor (`blocked.py`). In training (both gradients),
  one pass over the sources grouped by out-degree gathers the output-gradient rows of their edges
  once per chunk and gives the input gradient (times the weight blocks) and the weight gradient
  (times the sources' own rows). For one gradient alone: the transposed pass, or one batched GEMM
  per chunk of target rows. All are deterministic on CPU. Gathers are recomputed chunk by chunk in the
  backward, so only y and w are saved. For small batches (B * max(d) < d_v * d_u, e.g. B < 16
  at d = 16) the weights dominate: the forward and the weight gradient then stream them in row
  order, edge by edge, summing each row's messages with a 0/1 CSR SpMM.
- `triton`: Triton GPU kernels (`triton_kernels.py`, kernels in `triton_jit.py`): a gather-only
  CSR SpMM per block of target rows for scalar vertices, a per-row `tl.dot` accumulation over the
  in-edges for blocks; input gradient on the transposed structure, weight gradient reduced over
  the batch inside the kernel; float32 / bfloat16 / float16 with fp32 accumulation; no atomics
  (bitwise reproducible). CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1` (tests). triton
  is imported on first use only.
Conv edges (`window.py`): `windowed_aggregate` unfolds the sources (`[n, d * taps, B * P_out]`) and
runs any of the above (or the regenerated topology) on them, saving only y and w (the unfolding is
made again in the backward, chunk by chunk over the batch). Edges out of token ids: `embed.py`.
Regenerated topology (no stored edges; the plan draws them again chunk by chunk):
`regenerated_aggregate` (`regen.py`), any dims and device.
`auto` picks `triton` for CUDA tensors of those dtypes when triton imports; on CPU `csr` for
float32/float64 scalar targets (`d_v = 1`) whose sources are scalar or whose batch is below 128,
and `blocked` otherwise (bf16 included: MKL's CSR kernels take no bf16). Scratch buffers and chunk
budgets: `workspace.py`.

Measurements and what was tried: `bench/kernels.py` (module doc).
"""
from .csr import CSR
from .embed import embed_aggregate
from .kernels import IMPLS, agg_backward, agg_forward, aggregate
from .regen import regenerated_aggregate
from .window import Geometry, Regenerated, Stored, fold, unfold, windowed_aggregate

__all__ = ["CSR", "aggregate", "agg_forward", "agg_backward", "IMPLS", "regenerated_aggregate", "Geometry", "Stored",
           "Regenerated", "windowed_aggregate", "unfold", "fold", "embed_aggregate"]
