"""Memory and communication model of a run, per rank, from its config alone (no process group, no
sampled lift): `estimate(cfg, world_size, device)` and `python -m randlift_dist.estimate --config
FILE [--world-size P] [--device cpu|cuda] [--json]`. Measured against real runs by
`bench/memory.py`; results and the formula in short in `docs/scale.md`.

Inputs: the `Lift` of `cfg.build_lift()` (sizes and laws; nothing is sampled), the layout
(`world = lift_parallel L x data_parallel D`), engine, precision, ZeRO stage, optimizer, kernels,
data. The busiest lift-parallel rank is reported. The package:

- `rank.py`: the config -> per-rank shapes (rows, edges, exchange, kernels, batches), asking the
  runtime's own functions for every decision, and the assembly of one rank's estimate;
- `terms.py`: the persistent terms, one function each (weights, gradients, optimizer state,
  master weights, indices per CSR structure, ownership arrays, workspaces, data, logits, halo,
  per-vertex saved tensors);
- `phases.py`: the tensors alive in each phase (backward, optimizer, eval, checkpoint, setup) and
  the allocator's share of them (what the heap keeps, the largest transient);
- `cli.py`: the table and the command line.

`peak_bytes_per_rank` = the sum of the parts (baseline, weights, gradients, optimizer_state,
master_weights, indices, shard_arrays, workspaces, data, allocator_kept, transient), or the
set-up peak when that is larger. Communication per rank and step: the rows each base edge sends
(`exchange.rows_sent` of the expected halo), times d_u x the replica batch x bytes per value; the
backward sends the same back.
"""

from ..limits import MMAP_THRESHOLD
from .cli import format_table, main
from .rank import PARTS, EstimateError, estimate

__all__ = ["PARTS", "EstimateError", "MMAP_THRESHOLD", "estimate", "format_table", "main"]
