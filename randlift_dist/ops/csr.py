"""`CSR`: the static in-edge structure of one base edge on one process, sorted by target row.

Besides the row pointer, a `CSR` lazily builds and caches what the kernels need, once per
structure (the structure is static for the whole run, so this is setup cost, paid on first use):

- `transposed()`: the edges sorted by source (row pointer over sources, target of each edge, and
  the permutation to our edge order), for the input-gradient SpMM;
- `degree_groups(transposed)`: the rows (or sources) grouped by their number of edges, and the
  edges listed in that order (8 bytes per edge), used by the blocked kernel to turn the sparse
  product into one batched matmul per chunk of a group;
- `scalar_expansion(d_u)`: for targets of dimension 1, the scalar CSR matrix
  `[n_rows, n_cols * d_u]` whose values are the flat weights `[m, 1, d_u]`, and its transpose,
  with int32 indices (torch's MKL CSR kernels convert int64 indices to int32 on every call);
  about 12 bytes per scalar weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DegreeGroup:
    """Rows that all have `k > 0` edges, ascending; they sit at `pos:pos+len(rows)` of the
    degree-sorted order and their edges at `q:q + k*len(rows)` of `DegreeGroups.edges`. If they
    form one range of rows, `r0` is its start and `e0` the first edge of row r0 (then the
    group's edges are one range too)."""

    k: int
    rows: torch.Tensor  # int64 [n_k]
    pos: int
    r0: int | None
    e0: int | None
    q: int


@dataclass(frozen=True)
class DegreeGroups:
    """The rows sorted by degree (stable): rows without edges first (`n_empty` of them), then one
    `DegreeGroup` per degree. `inv[r]` is the sorted position of row r; `identity` when the
    sorted order is the row order (e.g. every row has the same degree). `edges` lists every
    edge (its position in the indexed order: CSR order, or transposed order) row by row in the
    degree-sorted order of the rows, so a chunk of a group's rows has its edges in one slice."""

    groups: tuple[DegreeGroup, ...]
    n_empty: int
    empty_rows: torch.Tensor  # int64 [n_empty], the rows without edges
    inv: torch.Tensor  # int64 [n_rows]
    identity: bool
    edges: torch.Tensor  # int64 [nnz]


@dataclass(frozen=True)
class ScalarExpansion:
    """Index arrays of the scalar CSR matrix `[n_rows, n_cols]` (`n_cols` = sources * d_u) with
    one entry per (edge, u), in the order of `w.reshape(-1)` for `w` of shape `[m, 1, d_u]`; and
    of its transpose, whose values are `w.reshape(-1)[perm]`."""

    n_rows: int
    n_cols: int
    indptr: torch.Tensor
    col: torch.Tensor
    t_indptr: torch.Tensor
    t_col: torch.Tensor
    perm: torch.Tensor


def _small_index(t: torch.Tensor, limit: int) -> torch.Tensor:
    return t.to(torch.int32) if limit < 2**31 - 1 else t


def _scalar_expansion(csr: "CSR", d_u: int) -> ScalarExpansion:
    t_indptr, t_row, perm = csr.transposed()
    m, dev = csr.nnz, csr.col.device
    n_cols = csr.n_cols * d_u
    limit = max(m * d_u, n_cols, csr.n_rows)
    if d_u == 1:
        arrays = (csr.indptr, csr.col, t_indptr, t_row, perm)
        return ScalarExpansion(csr.n_rows, n_cols, *(_small_index(t, limit) for t in arrays))
    ar = torch.arange(d_u, device=dev)
    col = (csr.col.unsqueeze(1) * d_u + ar).reshape(-1)
    # transposed: expanded column (i, u) holds the targets of source i's edges, for every u
    out_deg = (t_indptr[1:] - t_indptr[:-1]).repeat_interleave(d_u)  # per expanded column
    x_indptr = torch.zeros(n_cols + 1, dtype=torch.int64, device=dev)
    torch.cumsum(out_deg, 0, out=x_indptr[1:])
    q_col = torch.repeat_interleave(torch.arange(n_cols, device=dev), out_deg)  # column of entry q
    base = t_indptr[q_col // d_u] + (torch.arange(m * d_u, device=dev) - x_indptr[q_col])
    x_col = t_row[base]
    x_perm = perm[base] * d_u + q_col % d_u
    return ScalarExpansion(csr.n_rows, n_cols, *(_small_index(t, limit) for t in
                                                  (csr.indptr * d_u, col, x_indptr, x_col, x_perm)))


def _degree_groups(indptr: torch.Tensor) -> DegreeGroups:
    deg = indptr[1:] - indptr[:-1]
    order = torch.argsort(deg, stable=True)  # ascending degree; rows ascending within a degree
    ks, counts = torch.unique_consecutive(deg[order], return_counts=True)
    groups, n_empty, s, q = [], 0, 0, 0
    for k, c in zip(ks.tolist(), counts.tolist()):
        rows = order[s:s + c]
        if k == 0:
            n_empty = c
        else:
            first, last = int(rows[0]), int(rows[-1])
            contiguous = last - first + 1 == c
            groups.append(DegreeGroup(int(k), rows, s, first if contiguous else None,
                                      int(indptr[first]) if contiguous else None, q))
        s += c
        q += k * c
    # edges row by row in sorted row order: start of the row + rank within the row
    sdeg = deg[order]
    starts = torch.repeat_interleave(indptr[:-1][order], sdeg)
    first = torch.repeat_interleave(torch.cumsum(sdeg, 0) - sdeg, sdeg)  # first slot of each edge's row
    edges = starts + (torch.arange(starts.numel(), device=indptr.device) - first)
    identity = bool((order == torch.arange(order.numel(), device=order.device)).all())
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return DegreeGroups(tuple(groups), n_empty, order[:n_empty], inv, identity, edges)


class CSR:
    """Edges `(col[k] -> row[k])` sorted by row; `indptr[r]:indptr[r+1]` are the edges of row r.

    `col` indexes the rows of the source buffer (`n_cols` rows). The transposed order (edges sorted
    by source, for the input-gradient SpMM) and the other kernel structures are computed on first
    use and cached (see the module doc).
    """

    def __init__(self, row: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int):
        row = torch.as_tensor(row, dtype=torch.int64)
        col = torch.as_tensor(col, dtype=torch.int64)
        if row.numel() > 1 and bool((row[1:] < row[:-1]).any()):
            raise ValueError("CSR edges must be sorted by target row")
        self.row, self.col = row, col
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        counts = (torch.bincount(row, minlength=self.n_rows) if row.numel()
                  else torch.zeros(self.n_rows, dtype=torch.int64, device=row.device))
        self.indptr = torch.zeros(self.n_rows + 1, dtype=torch.int64, device=row.device)
        torch.cumsum(counts, 0, out=self.indptr[1:])
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._groups: dict[bool, DegreeGroups] = {}
        self._expansions: dict[int, ScalarExpansion] = {}

    @property
    def nnz(self) -> int:
        return self.row.numel()

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(t_indptr, t_col, perm)`: edges sorted by source; `perm` maps that order to ours."""
        if self._t is None:
            perm = torch.argsort(self.col, stable=True)
            counts = torch.bincount(self.col, minlength=self.n_cols)
            t_indptr = torch.zeros(self.n_cols + 1, dtype=torch.int64, device=self.col.device)
            torch.cumsum(counts, 0, out=t_indptr[1:])
            self._t = (t_indptr, self.row[perm], perm)
        return self._t

    def degree_groups(self, transposed: bool = False) -> DegreeGroups:
        """Targets (or, transposed, sources) grouped by in- (out-) degree; see `DegreeGroups`."""
        if transposed not in self._groups:
            self._groups[transposed] = _degree_groups(self.transposed()[0] if transposed else self.indptr)
        return self._groups[transposed]

    def scalar_expansion(self, d_u: int) -> ScalarExpansion:
        """The scalar CSR matrix of a base edge with 1-dimensional targets; see `ScalarExpansion`."""
        if d_u not in self._expansions:
            self._expansions[d_u] = _scalar_expansion(self, d_u)
        return self._expansions[d_u]

    def to(self, device: torch.device | str) -> "CSR":
        if self.row.device == torch.device(device):
            return self
        return CSR(self.row.to(device), self.col.to(device), self.n_rows, self.n_cols)
