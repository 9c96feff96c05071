"""Positions and edge/vertex kinds of a base network: the shape rules, in plain Python.

A vertex's space is `R^{positions x d}`: positions `()` for a vector, `(L,)` for a signal or a
token sequence, `(H, W)` for an image. An edge maps its source's positions to its target's:

| kind      | source positions | target positions        | features per target position (weight `[d_v, F]`) |
|-----------|------------------|-------------------------|--------------------------------------------------|
| `linear`  | any P            | P                       | `d_u` (applied at every position)                 |
| `conv`    | `(L,)`/`(H, W)`  | `Window.out_positions`  | `d_u * taps` (channel-major, taps row-major)      |
| `pool`    | `(L,)`/`(H, W)`  | `Window.out_positions`  | `d_u` (max/avg pooling, then linear)              |
| `mean`    | non-empty        | `()`                    | `d_u` (global average, then linear)               |
| `select`  | non-empty        | `()`                    | `d_u` (one position, then linear)                 |
| `flatten` | non-empty        | `()`                    | `d_u * prod(P)` (channel-major, as torch's `flatten(1)` of `[B, C, *P]`) |

Invariants: a `Window` has one entry per spatial dim in each of kernel, stride, padding and
dilation, all integers (kernel, stride, dilation >= 1, padding >= 0), and gives at least one output
position; `taps = prod(kernel)`. Tap `t` is the row-major index of the kernel offset, so an edge's
weight `[d_v, d_u * taps]` reshaped to `[d_v, d_u, *kernel]` is a block of torch's conv weight.
Errors are `GraphError`s naming the edge or vertex and the fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any


class GraphError(ValueError):
    """A base network description is invalid; the message names the value and the fix."""


EDGE_KINDS = ("linear", "conv", "pool", "mean", "select", "flatten")
WINDOW_KINDS = ("conv", "pool")
VERTEX_KINDS = ("sum", "attention")
NORMS = ("none", "layer")
SLOTS = ("q", "k", "v")
POOLS = ("max", "avg")


def positions_of(value: Any, where: str) -> tuple[int, ...]:
    """A positions tuple from `[]`, `[L]`, `[H, W]` (or an int L); one line naming `where` if bad."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) > 2 or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in value):
        raise GraphError(f"{where} has positions {value!r}: write [] (a vector), [L] (a signal or sequence) "
                         "or [H, W] (an image), with positive integers")
    return tuple(int(p) for p in value)


def numel(positions: Sequence[int]) -> int:
    return int(math.prod(positions))


@dataclasses.dataclass(frozen=True)
class Window:
    """A sliding window over 1 or 2 spatial dims (conv or pooling): one entry per dim."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def taps(self) -> int:
        return numel(self.kernel)

    def offsets(self) -> list[tuple[int, ...]]:
        """Kernel offsets in tap order (row-major, the last dim fastest)."""
        return list(itertools.product(*(range(k) for k in self.kernel)))

    def out_positions(self, positions: Sequence[int], where: str) -> tuple[int, ...]:
        """Output positions for input `positions` (torch's formula); a GraphError if none."""
        if len(positions) != self.rank:
            raise GraphError(f"{where}: a {self.rank}-d window over a source with positions {tuple(positions)}: "
                             f"give kernel/stride/padding/dilation one entry per position dim ({len(positions)})")
        out = []
        for n, k, s, p, d in zip(positions, self.kernel, self.stride, self.padding, self.dilation):
            o = (n + 2 * p - d * (k - 1) - 1) // s + 1
            if o < 1:
                raise GraphError(f"{where}: kernel {k} (dilation {d}, padding {p}) does not fit in {n} positions: "
                                 "lower the kernel or dilation, or raise the padding")
            out.append(o)
        return tuple(out)

    def to_dict(self) -> dict[str, list[int]]:
        return {"kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation)}


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """A window as written (ints broadcast over the source's position dims), resolved into a
    `Window` once the source's positions are known (`BaseGraph` does it while deriving positions)."""

    kind: str
    kernel: Any
    stride: Any = None
    padding: Any = None
    dilation: Any = None

    def resolve(self, where: str, src_rank: int) -> Window:
        k = self.kernel
        rank = len(k) if isinstance(k, Sequence) and not isinstance(k, str) else max(src_rank, 1)
        return make_window(where, self.kind, rank, self.kernel, self.stride, self.padding, self.dilation)


def make_window(where: str, kind: str, rank: int, kernel: Any, stride: Any = None, padding: Any = None,
                dilation: Any = None) -> Window:
    """A `Window` of `rank` dims; ints broadcast over the dims. Pooling's stride defaults to its kernel."""
    def ints(name: str, v: Any, default: tuple[int, ...], low: int) -> tuple[int, ...]:
        if v is None:
            return default
        vals = [v] * rank if isinstance(v, int) and not isinstance(v, bool) else v
        if isinstance(vals, str) or not isinstance(vals, Sequence) or len(vals) != rank or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= low for x in vals):
            shown = list(v) if isinstance(v, tuple) else v
            raise GraphError(f"{where} has {name} {shown!r}: give an integer >= {low} or a list of {rank} of them "
                             f"(one per position dim)")
        return tuple(int(x) for x in vals)

    if kernel is None:
        raise GraphError(f"{where} ({kind}) needs a kernel: e.g. kernel: 3 (or [3, 3] on an image)")
    k = ints("kernel", kernel, (), 1)
    s = ints("stride", stride, k if kind == "pool" else (1,) * rank, 1)
    p = ints("padding", padding, (0,) * rank, 0)
    d = ints("dilation", dilation, (1,) * rank, 1)
    if kind == "pool" and any(2 * pi > ki for pi, ki in zip(p, k)):
        raise GraphError(f"{where} has padding {list(p)} with kernel {list(k)}: pooling padding must be at most "
                         "half the kernel")
    return Window(k, s, p, d)


def edge_positions(kind: str, window: Window | None, index: tuple[int, ...] | None, src_pos: tuple[int, ...],
                   where: str) -> tuple[int, ...]:
    """Target positions of an edge of `kind` whose source has `src_pos`."""
    if kind == "linear":
        return src_pos
    if kind in WINDOW_KINDS:
        if len(src_pos) not in (1, 2):
            raise GraphError(f"{where}: a {kind} edge needs a source with 1 or 2 position dims, got "
                             f"{src_pos or '()'}: declare positions on the source (input) vertex")
        return window.out_positions(src_pos, where)
    if not src_pos:
        raise GraphError(f"{where}: a {kind} edge maps positions to a vector, but its source has no positions: "
                         "use a linear edge")
    if kind == "select":
        if index is None or len(index) != len(src_pos) or not all(-n <= i < n for i, n in zip(index, src_pos)):
            raise GraphError(f"{where}: select index {list(index) if index is not None else None} does not name "
                             f"one of the source's positions {src_pos}: give index: i (or [i, j]), negatives count "
                             "from the end")
    return ()


def flat_index(index: tuple[int, ...], positions: tuple[int, ...]) -> int:
    """The row-major position number of `index` (negatives from the end)."""
    flat = 0
    for i, n in zip(index, positions):
        flat = flat * n + (i % n)
    return flat


def edge_features(kind: str, window: Window | None, src_pos: tuple[int, ...], d_u: int) -> int:
    """Input features per target position of one lifted edge (the weight is `[d_v, features]`)."""
    if kind == "conv":
        return d_u * window.taps
    if kind == "flatten":
        return d_u * numel(src_pos)
    return d_u


def exchanged_values(kind: str, src_pos: tuple[int, ...], dst_pos: tuple[int, ...], d_u: int) -> int:
    """Values per sample of one source member's rows as an edge of `kind` exchanges them (after
    its per-member map): `d_u * prod(P_u)` for linear and conv (raw rows), `d_u * prod(P_v)` for
    pool (pooled rows), `d_u` for mean and select, `d_u * prod(P_u)` for flatten."""
    if kind == "pool":
        return d_u * numel(dst_pos)
    if kind in ("mean", "select"):
        return d_u
    return d_u * numel(src_pos)


def kernel_columns(kind: str, dst_pos: tuple[int, ...]) -> int:
    """Columns per sample the aggregation kernel of an edge of `kind` runs on: the target's
    positions for linear, conv and pool edges; 1 for mean, select and flatten (vectors)."""
    return numel(dst_pos) if kind in ("linear", "conv", "pool") else 1
