"""Sizes the runtime works in that the memory model (`estimate/`) must know: defined once here,
the lowest module of the package, and imported by the engine, the CLI and the estimator.

Invariant: the runtime reads these names (no copies of the numbers elsewhere); a change here
changes what runs and what is predicted together.
"""

from __future__ import annotations

# The most rows of one evaluation forward (`eval_chunk`).
EVAL_CHUNK = 1024
# Values per float64 chunk of the gradient norm (`engine._sum_squares`): one reused 8 MiB buffer.
NORM_CHUNK = 1 << 20
# glibc's mmap threshold set by the training CLI (`train.limit_heap`): allocations of this many bytes
# or more get their own mapping and are unmapped when freed; smaller ones come from heaps that keep
# freed blocks resident (the estimator's `allocator_kept` and `transient` split at this size).
MMAP_THRESHOLD = 4 << 20


def eval_chunk(batch_size: int, data_parallel: int, micro_batch_size: int | None) -> int:
    """Rows per evaluation forward (test rows, the training rows evaluated, `evaluate`): the training
    micro-batch (each replica's share of `batch_size` when there is none), at most EVAL_CHUNK. A
    no-grad forward of these rows holds fewer activations than the training step on them, so an
    evaluation is never the peak of a run sized by its training step."""
    rows = micro_batch_size or max(1, batch_size // max(1, data_parallel))
    return max(1, min(rows, EVAL_CHUNK))
