"""`CSR`: the static in-edge structure of one base edge on one process, sorted by target row."""

from __future__ import annotations

import torch


class CSR:
    """Edges `(col[k] -> row[k])` sorted by row; `indptr[r]:indptr[r+1]` are the edges of row r.

    `col` indexes the rows of the source buffer (`n_cols` rows). The transposed order (edges sorted
    by source, for the input-gradient SpMM) is computed on first use and cached.
    """

    def __init__(self, row: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int):
        row = torch.as_tensor(row, dtype=torch.int64)
        col = torch.as_tensor(col, dtype=torch.int64)
        if row.numel() > 1 and bool((row[1:] < row[:-1]).any()):
            raise ValueError("CSR edges must be sorted by target row")
        self.row, self.col = row, col
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        counts = torch.bincount(row, minlength=self.n_rows) if row.numel() else torch.zeros(self.n_rows, dtype=torch.int64)
        self.indptr = torch.zeros(self.n_rows + 1, dtype=torch.int64, device=row.device)
        torch.cumsum(counts, 0, out=self.indptr[1:])
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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

    def to(self, device: torch.device | str) -> "CSR":
        if self.row.device == torch.device(device):
            return self
        return CSR(self.row.to(device), self.col.to(device), self.n_rows, self.n_cols)
