"""The persistent terms of the memory model, one function per term: pure arithmetic on counts
(rows, edges, dims, bytes per value), no config and no tensors, so each is tested against an
independent count (`tests/test_estimate_terms.py`). Notation: m edges of a base edge e = (u, v) on
the rank, N its parameters, n_v its rows of fibre v, B the (micro-)batch, es the bytes of a value
(4 fp32, 2 bf16, 8 fp64), s = d_v x d_u the parameters per edge.

- baseline: the Python + torch process (measured on CPU, `CPU_BASELINE`, + `TORCHRUN_EXTRA` per
  rank of a multi-rank run), or the CUDA context + NCCL buffers on a GPU (assumed 1 GiB).
- weights N x es; gradients N x es (DeepSpeed keeps them; ZeRO-2: / D plus its reduce bucket; the
  torch engine sets them to None between steps, so its backward phase counts them as they are
  made, `phases.py`); optimizer state: Adam's two fp32 moments (8 B / param, SGD momentum 4 B),
  / D from ZeRO-1; master weights: DeepSpeed's fp32 copy (4 B / param, / D from ZeRO-1) for bf16
  or ZeRO >= 1. Offload moves master, moments and the fp32 gradient partition to the host.
- indices (`ops.CSR`, per CSR: an exchanging edge has a local and a remote one): row, col int64
  and indptr, plus the structures the kernels that run build and cache (`index_structures`); the
  kernels are the runtime's choice (`ops.kernels.choose_impl`, `csr_fused_backward`). Regenerated
  topology: two offsets per sampling block.
- ownership arrays: none for `block` (ranges); `graph` / `random`: owner int32 + position int64.
- kernel workspaces: on CPU cached per thread, four slots of at most a chunk of values and the
  sorted output (`ops/workspace.py`'s sizes; an upper bound); on GPUs allocated per call (a
  transient).
- data (`data_bytes`): in memory, the train + test arrays and the epoch permutation; read lazily
  from shards, only the batch, an evaluation chunk and the shard index.
- exchange: the expected distinct remote sources of a rank's edges (`expected_halo_rows`).
- the logits and the loss's tensors (`logit_bytes`). What each vertex and edge saves for the
  backward, with positions, is `activation_memory.py`'s (the one model of saved tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..ops import kernels as _kernels
from ..ops import workspace as _workspace
from ..ops.blocked import _small_batch

GiB = 2**30
# Resident memory of one training process before the model (Python, torch, numpy, the trainer's
# imports, allocator slack); calibrated on the CPU machine of docs/scale.md (`bench/memory.py`).
CPU_BASELINE = 390 * 2**20
TORCHRUN_EXTRA = 4 * 2**20  # per rank under torchrun: gloo and the c10d store client (measured: +3 MB)
CUDA_BASELINE = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers (assumed, not measured)
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce bucket (elements), ZeRO-2
# The index structures a CSR can hold (bytes of each: `index_structures`).
STRUCTURES = ("csr", "transposed", "groups", "t_groups", "expansion", "triton")
_INT32_MAX = 2**31 - 1


def baseline_bytes(device: str, world_size: int) -> float:
    """The process before the model: measured on CPU (+ torchrun's per-rank extra), assumed on a GPU."""
    if device == "cpu":
        return float(CPU_BASELINE + (TORCHRUN_EXTRA if world_size > 1 else 0))
    return float(CUDA_BASELINE)


def weight_bytes(n_params: float, es: int) -> float:
    return n_params * es


@dataclasses.dataclass(frozen=True)
class EngineState:
    """What the engine keeps per parameter: engine, ZeRO stage, data-parallel degree D, bytes per
    value, optimizer moments per parameter, optimizer offload."""

    deepspeed: bool
    zero_stage: int
    data_parallel: int
    es: int
    moments: int
    offload: bool = False

    @property
    def shards(self) -> int:
        """Over how many ranks the optimizer state and master weights are split (ZeRO >= 1)."""
        return self.data_parallel if self.deepspeed and self.zero_stage >= 1 else 1

    @property
    def has_master(self) -> bool:
        """DeepSpeed keeps an fp32 master copy: bf16, or any ZeRO stage >= 1."""
        return self.deepspeed and (self.es == 2 or self.zero_stage >= 1)


def gradient_bytes(n_params: float, eng: EngineState) -> float:
    """Gradients held at the step: all of them (ZeRO-2: a 1 / D partition plus the reduce bucket)."""
    if eng.deepspeed and eng.zero_stage == 2:
        return n_params * eng.es / eng.data_parallel + min(n_params, DS_BUCKET) * eng.es
    return n_params * eng.es


def optimizer_state_bytes(n_params: float, eng: EngineState) -> float:
    """Moments on this device: fp32 under DeepSpeed (/ D from ZeRO-1), the parameter dtype under
    torch; none when offloaded."""
    if eng.deepspeed:
        return 0.0 if eng.offload else n_params * 4 * eng.moments / eng.shards
    return n_params * eng.es * eng.moments


def master_weight_bytes(n_params: float, eng: EngineState) -> float:
    """DeepSpeed's fp32 master copy (/ D from ZeRO-1); on the host when the optimizer is offloaded."""
    if not eng.has_master or eng.offload:
        return 0.0
    return n_params * 4 / eng.shards


def offloaded_bytes(n_params: float, eng: EngineState) -> float:
    """Host memory of an offloaded optimizer: master weights, moments and the fp32 gradient partition."""
    if not (eng.deepspeed and eng.offload):
        return 0.0
    return n_params * 4 * (eng.moments + (1 if eng.has_master else 0) + 1) / eng.shards


# ---------------------------------------------------------------- indices
def _index_size(limit: float) -> int:
    return 4 if limit < _INT32_MAX else 8


def structure_bytes(name: str, m: float, rows: int, cols: float, d_u: int) -> float:
    """Bytes of one index structure of a CSR of m edges from `cols` source rows (of dim d_u) to
    `rows` target rows (`ops/csr.py`, `ops/triton_kernels.py`):
    `csr` row, col int64 and indptr; `transposed` (t_indptr, t_row, perm int64); `groups` /
    `t_groups`, the degree groups over targets / sources (order and inverse int64 per row, the
    edges in that order); `expansion`, the scalar CSR matrix and its transpose (int32 when they
    fit: the int64 arrays themselves are reused at d_u = 1 otherwise); `triton`, the int32 copies
    of row, col, t_row and perm (none when int64 is needed: the arrays are reused)."""
    if name == "csr":
        return 16 * m + 8 * (rows + 1)
    if name == "transposed":
        return 16 * m + 8 * (cols + 1)
    if name == "groups":
        return 16 * rows + 8 * m
    if name == "t_groups":
        return 16 * cols + 8 * m
    if name == "expansion":
        isz = _index_size(max(m * d_u, cols * d_u, rows))
        if isz == 8 and d_u == 1:
            return 0.0
        return isz * ((rows + 1) + 3 * m * d_u + (cols * d_u + 1))
    if name == "triton":
        return 16 * m if _index_size(max(m, rows, cols)) == 4 else 0.0
    raise ValueError(f"unknown index structure {name!r}: one of {STRUCTURES}")


def structures_built(kernel: str, d_v: int, d_u: int, cols: float, batch: int, grads: str) -> set[str]:
    """The structures a CSR holds after `kernel` ran a forward at `batch` (and its backward when
    `grads` is "both" or "weight"; "none": forward only, e.g. evaluation). Follows the kernels:
    `csr` builds its scalar expansion (on the transposed structure) and, in a fused backward, the
    sources' degree groups; `blocked` the targets' degree groups unless the batch is small
    (`blocked._small_batch`), and in a backward with the input gradient the transposed structure
    and the sources' groups; `triton` the transposed structure and its int32 copies."""
    built = {"csr"}
    w_shape = (0, d_v, d_u)
    if kernel == "csr":
        built |= {"expansion", "transposed"}
        if grads != "none" and _kernels.csr_fused_backward(d_u, cols, batch, grads == "both"):
            built |= {"t_groups"}
    elif kernel == "blocked":
        if not _small_batch(w_shape, batch):
            built.add("groups")
        if grads == "both":
            built |= {"transposed", "t_groups"}
    elif kernel == "triton":
        built |= {"transposed", "triton"}
    return built


def index_structures(m: float, rows: int, cols: float, d_v: int, d_u: int,
                     runs: Iterable[tuple[str, int, str]]) -> dict[str, float]:
    """`{structure: bytes}` one CSR holds after the kernel runs `(kernel, batch, grads)` of a run
    (training and evaluation may choose different kernels: their structures add up)."""
    built: set[str] = set()
    for kernel, batch, grads in runs:
        built |= structures_built(kernel, d_v, d_u, cols, batch, grads)
    if m <= 0:  # no edges: the kernels return zeros; only the row pointer exists
        return {"csr": 8.0 * (rows + 1)}
    return {k: float(structure_bytes(k, m, rows, cols, d_u)) for k in STRUCTURES if k in built}


def regenerated_index_bytes(n_blocks: int) -> float:
    """A regenerated edge's `BlockTopology`: per sampling block its index and two offsets (int64)."""
    return 8.0 * n_blocks + 16.0 * (n_blocks + 1)


def plan_exchange_bytes(m: float, m_local: float, mode: str, sent_rows: float, halo_rows: float) -> float:
    """What the plan keeps of a stored exchanging edge (`plan.EdgePlan`, `exchange.Exchange`): the
    local-first mask over its m edges (bool; none when every source is local) and, in all-to-all
    mode, the rows it sends and the halo's global indices (int64)."""
    mask = float(m) if m_local < m else 0.0
    return mask + (8.0 * (sent_rows + halo_rows) if mode == "alltoall" else 0.0)


def shard_array_bytes(partition: str, lift_parallel: int, fibre_sizes: Iterable[int]) -> float:
    """Ownership arrays: `block` is ranges (nothing per vertex); `graph` / `random` keep an owner
    (int32) and a position (int64) per vertex of every non-input fibre."""
    if lift_parallel == 1 or partition == "block":
        return 0.0
    return 12.0 * sum(fibre_sizes)


def workspace_bytes(slot_elems: float, out_elems: float, es: int, device: str) -> float:
    """The blocked kernels' scratch on CPU (cached per thread): four slots of at most a chunk of
    `slot_elems` values and the sorted output (cached up to `WS_CACHE_MAX` values). An upper bound:
    the real slots hold less than a chunk when a weight or a degree group is smaller (measured at
    0.3 to 0.6 of it, `tests/test_estimate_terms.py`; tens of MB at most). On a GPU the same slots
    are allocated per call: returned here too (the caller counts them as transient)."""
    if device == "cpu":
        return es * (4 * min(_workspace.CHUNK_ELEMS, slot_elems) + min(_workspace.WS_CACHE_MAX, out_elems))
    return es * 4 * min(_workspace.CHUNK_ELEMS_ACCEL, slot_elems)


# ---------------------------------------------------------------- data, logits, exchange, vertices
def label_bytes(loss: str, out_dim: int) -> int:
    """Bytes of one sample's label: an int64 class index for cross-entropy, else float32 [out_dim]."""
    return 8 if loss == "cross_entropy" else 4 * out_dim


def data_bytes(n_train: int, n_test: int, in_dim: int, label: int, lazy: bool, batch: int = 0,
               eval_chunk: int = 0, index_bytes: float = 0.0) -> float:
    """The data one rank holds between steps. In memory (`lazy` False: teacher, file, mnist1d,
    digits): x float32 `[N, in_dim]` and the labels (`label` bytes each) of the train and test
    sets, and the epoch's permutation of the training rows (int64). Read lazily (`shards`): the
    rows of one batch and of one evaluation chunk, and the shard index (`index_bytes`)."""
    row = 4 * in_dim + label
    if lazy:
        return float((batch + eval_chunk) * row + index_bytes)
    return float((n_train + n_test) * row + 8 * n_train)


def batch_bytes(batch: int, in_dim: int, label: int) -> float:
    """One step's batch, gathered from the arrays: x `[B, in_dim]` float32 and its labels."""
    return float(batch * (4 * in_dim + label))


def logit_bytes(batch: int, out_dim: int, es: int, loss: str, grad: bool = True) -> list[float]:
    """Tensors alive at the loss, at the end of a forward: the logits `[B, out_dim]` (the readout's
    output, in the model's dtype), the loss's two fp32 temporaries (MSE: the difference, saved for
    the backward, and its square; cross-entropy (`loss`): the log-softmax, saved, and the softmax
    its backward makes), the fp32 copy of bf16 logits, and with `grad` the logits' gradient."""
    del loss  # both losses keep two fp32 [B, out_dim] tensors (only the labels differ: `label_bytes`)
    logits = float(batch * out_dim)
    out = [logits * es, logits * 4, logits * 4]
    if es != 4:
        out.append(logits * 4)
    if grad:
        out.append(logits * es)
    return out


def expected_halo_rows(n_u: int, own_u: int, n_v: int, p: float) -> float:
    """Expected distinct remote sources feeding a rank's n_v targets: each of the n_u - own_u
    remote sources feeds one of them with probability 1 - (1 - p)^n_v, p = k / n_u (exact for
    both laws and, to first order, the 1 - (1 - 1/n_u)^(n_v k) of uniform draws)."""
    return (n_u - own_u) * (1 - (1 - p) ** n_v)
