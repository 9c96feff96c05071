"""Sizes the runtime works in that the memory model (`estimate/`) must know: defined once here,
the lowest module of the package, and imported by the engine, the CLI and the estimator.

Invariant: the runtime reads these names (no copies of the numbers elsewhere); a change here
changes what runs and what is predicted together.
"""

from __future__ import annotations

# Test rows per forward of `Engine.sum_squared_error` when train.micro_batch_size is not set (with
# it, evaluation runs in micro-batches): evaluation holds no more activations than this many samples.
EVAL_CHUNK = 1024
# Values per float64 chunk of the gradient norm (`engine._sum_squares`): one reused 8 MiB buffer.
NORM_CHUNK = 1 << 20
# glibc's mmap threshold set by the training CLI (`train.limit_heap`): allocations of this many bytes
# or more get their own mapping and are unmapped when freed; smaller ones come from heaps that keep
# freed blocks resident (the estimator's `allocator_kept` and `transient` split at this size).
MMAP_THRESHOLD = 4 << 20
