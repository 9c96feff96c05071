"""Local aggregation kernels: `z[j] = sum over in-edges (i -> j) of W_ij @ y[i]`.

Layout (used across the project): activations are `[n, d, B]` (fibre rows, feature dim, batch
last and contiguous); edge weights are `[m, d_v, d_u]`; the edges are sorted by target row and
described by a `CSR` (row pointer over targets, `row` and `col` per edge).

Implementations, selected by `aggregate(..., impl=...)`:
- `reference`: plain torch ops under autograd (gathers `[m, d_u, B]`); the ground truth in tests.
- `csr`: scalar vertices (`d_u = d_v = 1`): torch CSR SpMM forward; backward is an SpMM with the
  transposed structure for the input and a sampled dense-dense product for the weights.
- `blocked`: any dims: chunked gather + batched matmul + `index_add_`; the backward recomputes the
  gathers chunk by chunk, so no `[m, d, B]` tensor is kept alive between forward and backward.
`auto` picks `csr` for scalar vertices on CPU and `blocked` otherwise.
"""
from .csr import CSR
from .kernels import aggregate, IMPLS

__all__ = ["CSR", "aggregate", "IMPLS"]
