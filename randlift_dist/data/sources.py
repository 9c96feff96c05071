"""Row sources, batch orders and evaluation subsets: what the trainer reads, whatever the data kind.

A source is a table of `n` samples (`x` float32 `[n, in_dim]`, labels `[n, out_dim]` float32 or
`[n]` int64 classes) that hands out rows by index (`take`) or by range (`span`), as torch tensors.
`TensorSource` holds its arrays in memory; `shards.ShardSource` reads the asked rows from disk.

Batches (`Batches`): the global batch of step `t` is positions `[j B, (j + 1) B)` of a seeded
order of the training rows in epoch `t // (n // B)`; data-parallel replica `k` of `D` takes its
`B / D` consecutive positions of it, and every rank of a lift-parallel group takes the same rows.
So the rows of a step depend on `(data.seed, t)` only: not on the layout, and a resume needs only
the step. The order of an epoch is
- in memory: `torch.randperm(n)` seeded by `seed * 1_000_003 + epoch` (the order the project
  always used, so earlier curves are unchanged);
- for lazy sources: `FeistelOrder`, a keyed bijection of `[0, n)` computed per position (a 4-round
  Feistel network on the smallest even number of bits covering n, walking cycles back into range),
  so no `[n]` permutation is ever held: memory does not grow with the data set.

Evaluation reads the test split in order, each data-parallel replica a contiguous part, and at most
`train.eval_train_max` training rows, evenly spaced (`eval_rows`).
"""

from __future__ import annotations

import numpy as np
import torch

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class TensorSource:
    """Samples held in memory: `x` `[n, in_dim]` float32, `y` `[n, out_dim]` float32 or `[n]` int64."""

    lazy = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows and y {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.x.shape[1])

    def take(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return self.x[idx], self.y[idx]

    def span(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[lo:hi], self.y[lo:hi]

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelOrder:
    """A keyed permutation of `[0, n)` evaluated at any positions, with O(1) memory.

    `order(positions)` is a bijection of `[0, n)` for a fixed key: a balanced Feistel network on
    `2h` bits (`4^h >= n`, so fewer than 4n values) is a bijection of `[0, 4^h)`, and cycle walking
    (applying it again while the value is `>= n`) restricts it to a bijection of `[0, n)`.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        self.n = int(n)
        self.h = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.h) - 1)
        with np.errstate(over="ignore"):
            self.keys = [_mix(np.array([(key * 8 + r + 1) % 2**64], np.uint64))[0] for r in range(self.ROUNDS)]

    def _once(self, v: np.ndarray) -> np.ndarray:
        h = np.uint64(self.h)
        left, right = v >> h, v & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            v = self._once(np.asarray(positions, dtype=np.uint64))
            out = v >= np.uint64(self.n)
            while out.any():
                v[out] = self._once(v[out])
                out = v >= np.uint64(self.n)
        return v.astype(np.int64)


class Batches:
    """The batch of any step for one data-parallel replica: `batches(step) -> (x, y)` tensors."""

    def __init__(self, source, global_batch: int, data_rank: int, data_parallel: int, seed: int):
        # the batch's divisibility by the replicas is checked with the config (`Config.check_world`)
        self.source, self.B, self.seed = source, global_batch, seed
        self.per_replica = global_batch // data_parallel
        self.lo = data_rank * self.per_replica
        self.n = len(source)
        self.per_epoch = self.n // global_batch
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> np.ndarray:
        """Training-row indices of this replica's part of the batch of `step`."""
        epoch, j = divmod(step, self.per_epoch)
        first = j * self.B + self.lo
        if getattr(self.source, "lazy", False):
            key = (self.seed * 1_000_003 + epoch) & ((1 << 62) - 1)
            return FeistelOrder(self.n, key)(np.arange(first, first + self.per_replica))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[first:first + self.per_replica].numpy()

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.take(self.rows(step))


def eval_rows(n: int, limit: int | None) -> np.ndarray | None:
    """Rows of a split to evaluate: None (all of them) when `limit` is None or `>= n`, else `limit`
    evenly spaced rows `floor(i n / limit)`."""
    if limit is None or limit >= n:
        return None
    return (np.arange(limit, dtype=np.int64) * n) // max(limit, 1)


def replica_part(n: int, data_rank: int, data_parallel: int) -> tuple[int, int]:
    """`[lo, hi)`: the contiguous part of `n` evaluation rows that one data-parallel replica reads."""
    return n * data_rank // data_parallel, n * (data_rank + 1) // data_parallel
