"""Memory and communication model of a run, per rank, from its config alone (no process group,
no sampled lift): `python -m randlift_dist.estimate --config FILE [--world-size P] [key=value ...]
[--json]`. Measured against real runs by `bench/memory.py`; results in `docs/scale.md`.

Inputs: the `Lift` of `cfg.build_lift()` (sizes and laws; nothing is sampled), the layout
(`world = lift_parallel L x data_parallel D`), engine, precision, ZeRO stage, optimizer. Edge
counts are expectations of the lift law (`Lift.in_degree_of`; exact for `fixed_degree`). Rows
per rank follow the `block` partition with equal expected load per vertex (contiguous ranges of
n_v / L, snapped to sampling blocks when n_v >= 8 x block_size x L). The busiest rank is
reported. Notation: m edges of base edge e = (u, v) on the rank, N its parameters, n_v its rows
of fibre v, B the micro-batch, es the bytes of a value (4 fp32, 2 bf16), s = d_v x d_u.

Persistent terms (held from the first step on):
- weights N x es; gradients N x es (DeepSpeed keeps them; ZeRO-2: / D plus its reduce bucket; the
  torch engine holds them from the backward to the optimizer step only: set to None between
  steps, so evaluation and checkpoints run without them, and the backward makes them one edge at
  a time, see below); optimizer state: Adam's two fp32 moments (8 B / param, SGD momentum
  4 B), / D from ZeRO-1; master weights: DeepSpeed's fp32 copy (4 B / param, / D from ZeRO-1)
  for bf16 or ZeRO >= 1. Offload moves master, moments and the fp32 gradient partition to the
  host (`host_bytes_per_rank`).
- indices (`ops.CSR`): row, col int64 (16 B / edge), indptr (8 B / row); the transposed structure
  (perm, t_row int64: 16 B / edge, t_indptr 8 B / source row) unless the source is an input;
  the blocked kernel's degree groups (order + inv 16 B / row, the edges in group order 8 B / edge,
  per direction); the CSR kernel's int32 scalar expansion (d_v = 1 on CPU: 12 B / scalar weight)
  and, where its backward is fused (B >= 16, and d_u > 1 or big sources), transposed groups.
  An exchanging edge has a local and a remote CSR (the remote one over the halo rows).
- ownership arrays: none for `block` (ranges); `graph` / `random`: owner int32 + position int64.
- kernel workspaces: on CPU cached per thread, four slots of at most a chunk of values and the
  sorted output (`ops/kernels.py`'s sizes); on GPUs allocated per call, a transient.
- data (train + test arrays, fp32, host); baseline: the Python + torch process (measured on CPU,
  `CPU_BASELINE`), or the CUDA context + NCCL buffers on a GPU (assumed 1 GiB, not measured).

Phases (the tensors alive on top of the persistent terms):
- backward: saved for it are, per non-input vertex, its output `[n_v, d, B]` and its
  pre-activation when the nonlinearity saves its input (gelu; the kernels save only y and w), and
  the halo each exchanging edge received (all-to-all: halo rows x d_u x B; all-gather: L x
  max_own rows). The torch engine's backward is walked in reverse vertex order: a vertex's saved
  tensors go when its gradient reaches it, an edge's halo once the edge's gradient is made, and
  each weight gradient stays (as `.grad`: the kernel's tensor is handed over, no copy, except in
  later micro-batches, which start with every gradient made and add each edge's into it); the
  peak is the largest moment, the tensors alive then plus the gradients made so far (the rest of
  the gradients term is credited back). At each edge: three activation-sized gradients, the
  edge's temporaries: a split local / remote weight (exchanging edges) gets a full-size
  zero-filled gradient per slice from the kernel's slice gradient (one becomes `.grad`, the other
  is added to it), the halo's gradient buffers (received, sent, and on CPU gloo's flat copy), the
  CSR kernel's backward copies (3 value arrays and an index array per scalar weight). DeepSpeed:
  everything saved plus the largest edge's temporaries, with every gradient held.
- optimizer: torch engine: the gradient norm's float64 buffer of one chunk of 2**20 values
  (8 MiB; fused Adam, on CPU and GPU, needs no temporaries); with D > 1 the flat all-reduce
  buffer (4 B / param). DeepSpeed: the step's fp32 gradient partition and torch's foreach sqrt
  of the moments (4 B each / param / D; none with offload).
- eval: the `no_grad` test forward in chunks of min(micro-batch or 1024, n_test / D): every
  vertex's output (kept until the readout), two partial sums, and at an exchange the received,
  sent and (CPU) gloo-copied halo. Torch engine: no gradients then (credited).
- checkpoint (the run's last step at least): int64 row keys (8 B / row, and the edge index of the
  largest edge while it is derived); rows not in key order (exchanging edges hold local rows
  first) are gathered in key order one parameter at a time (edges, biases, readouts): a
  parameter's fp32 value and moments, the order, the sorted keys (`checkpoint._collect`; the
  writer has dropped the previous parameter's by then). Torch engine: no
  gradients then (credited). On GPUs this is host memory, except one tensor's fp32 copies.
- regenerated topology, backward per edge: the source-sized input gradient, the chunks of edges in
  flight (the one computed and the `DRAW_AHEAD` being drawn, ~64 B of indices per edge) and the
  scalar CPU path's sampled and permuted weight values (8 B / edge), or three gathered
  `[chunk edges, d, B]` buffers; an exchanging edge saves its own and received rows as one buffer.
- setup (no gradients or moments yet): the edges built so far plus, for the edge being built, its
  per-block arrays and their concatenation (2 x (16 + 4 s) B / edge) or, at L > 1, the weight
  permutation and `split_edges` arrays (4 s + 48 B / edge), and the partition's draws (32 B / row).

Allocator (CPU): the training CLI fixes glibc's mmap threshold at 4 MiB (`train.limit_heap`; by
default glibc raises it up to 32 MiB and then keeps freed activations and gradients in heaps it
reuses only in part: +0.4 GB per rank, varying between runs, on a 2-rank 52M lift). Tensors of
4 MiB or more are mapped and unmapped (`transient`: the largest phase's); smaller ones are served
from the heap, which keeps freed blocks resident, reused by the next phase only in part
(`allocator_kept`: midway between full reuse, the largest phase's small tensors, and none, their
sum; a few MB at d = 16). The model is of the CLI: a process that builds a `Trainer` itself runs
with glibc's default threshold.
On GPUs the caching allocator reuses freed blocks: the peak adds the largest phase.
`peak_bytes_per_rank` = the sum of the parts, or the setup peak when that is larger.

Communication (per rank and step; the backward sends the same back): the expected number of
distinct remote sources of the rank's edges. A remote source i feeds one of the rank's n_v rows
with probability 1 - (1 - p)^n_v (p = k / n_u; exact for both laws and, to first order, the
1 - (1 - 1/n_u)^(n_v k) of uniform draws), over the n_u - own_u remote sources. All-to-all sends
those rows (by symmetry, what the peers need from this rank), all-gather sends L - 1 copies of
max_own rows; the mode is the runtime's (`plan.choose_mode`: all-gather once the total halo
reaches the threshold x L (L - 1) max_own).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .config import Config, ConfigError, load_config
from .plan import choose_mode
from .planstats import format_bytes
from .ops import kernels as _kernels
from .ops import workspace as _workspace

GiB = 2**30
# Resident memory of one training process before the model (Python, torch, numpy, the trainer's
# imports, allocator slack); calibrated on the CPU machine of docs/scale.md (`bench/memory.py`).
CPU_BASELINE = 390 * 2**20
TORCHRUN_EXTRA = 4 * 2**20  # per rank under torchrun: gloo and the c10d store client (measured: +3 MB)
CUDA_BASELINE = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers (assumed, not measured)
# the kernels' chunk and workspace sizes, and when the CSR path's backward is fused
CHUNK_CPU, CHUNK_GPU, WS_CACHE_MAX = _workspace.CHUNK_ELEMS, _workspace.CHUNK_ELEMS_ACCEL, _workspace.WS_CACHE_MAX
FUSED_MIN_BATCH, FUSED_MIN_SCALAR = _kernels._FUSED_MIN_BATCH, _kernels._FUSED_MIN_SCALAR_ELEMS
# regenerated topology (`ops/regen.py`): chunk sizes, runs drawn ahead, index bytes per chunk edge
REGEN_CHUNK_EDGES, REGEN_CHUNK_ELEMS = _workspace.REGEN_CHUNK_EDGES, _workspace.REGEN_CHUNK_ELEMS
DRAW_AHEAD = 2  # model._DRAW_AHEAD (model.py is above this module's imports)
REGEN_IDX_BYTES = 64  # row, col, sort key, permutation (int64), int32 copies, the sampler's arrays
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce bucket (elements), ZeRO-2
EVAL_CHUNK = 1024  # Engine.sum_squared_error without micro-batches
NORM_CHUNK = 1 << 20  # values per float64 chunk of engine.grad_norm
# glibc's mmap threshold, fixed by the training CLI (`train.limit_heap`): smaller freed blocks stay in the heap
MMAP_THRESHOLD = 4 << 20
PARTS = ("baseline", "weights", "gradients", "optimizer_state", "master_weights", "indices", "shard_arrays",
         "workspaces", "data", "allocator_kept", "transient")


class EstimateError(ValueError):
    """The run cannot be estimated as asked; the message names the value and the fix."""


def _ranges(n: int, L: int, block: int) -> list[int]:
    """Rows of each rank under the `block` partition with equal expected load per vertex."""
    cuts = [math.ceil(n * r / L) for r in range(1, L)]
    if n >= 8 * block * L:
        cuts = [min(n, int(round(c / block)) * block) for c in cuts]
    b = [0] + cuts + [n]
    return [max(0, b[r + 1] - max(b[: r + 1])) for r in range(L)]


def _index_bytes(m: float, rows: int, cols: int, d_u: int, kernel: str, B: int, small_batch: bool,
                 src_grad: bool) -> float:
    """CSR + cached kernel structures of one CSR (see the module doc)."""
    if m <= 0:
        return 8 * (rows + 1)
    b = 16 * m + 8 * (rows + 1)  # row, col, indptr
    transposed = src_grad or kernel == "csr"  # input fibres need no input gradient
    if transposed:
        b += 16 * m + 8 * (cols + 1)  # t_row, perm, t_indptr
    if kernel == "csr":  # int32 scalar expansion; the fused backward's transposed degree groups
        b += 12 * m * d_u + 4 * (rows + 1) + 4 * (cols * d_u + 1)
        if src_grad and B >= FUSED_MIN_BATCH and (d_u > 1 or cols * d_u * B >= FUSED_MIN_SCALAR):
            b += 16 * cols + 8 * m
    elif kernel == "blocked":  # degree groups: order + inv per row, the edges in that order
        b += (0 if small_batch else 16 * rows + 8 * m) + (16 * cols + 8 * m if src_grad else 0)
    return b


def estimate(cfg: Config, world_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The model of the module doc for `cfg` on `world_size` ranks (default: lift_parallel)."""
    par, tr = cfg.parallel, cfg.train
    L = par.lift_parallel
    P = L if world_size is None else world_size
    if isinstance(P, bool) or not isinstance(P, int) or P < 1 or P % L:
        raise EstimateError(f"--world-size {P!r} does not fit parallel.lift_parallel={L}: use a positive "
                            f"multiple of {L} (world = lift_parallel x data_parallel)")
    D = P // L
    if tr.batch_size % D:
        raise EstimateError(f"train.batch_size={tr.batch_size} is not divisible by the data-parallel degree {D}: "
                            f"use a multiple of {D}")
    device = device or ("cuda" if par.backend == "nccl" else "cpu")
    if device not in ("cpu", "cuda"):
        raise EstimateError(f"--device {device!r}: choose cpu or cuda")
    base, lift = cfg.build_lift()
    out_dim = cfg.model.out_dim or base.dim(base.outputs[0])
    B = tr.batch_size // D
    ds = cfg.parallel.engine == "deepspeed"
    bf16 = ds and par.precision == "bf16"
    es = 2 if bf16 else (8 if (not ds and tr.dtype == "float64") else 4)
    bs = lift.block_size
    rows = {v: ([lift.n(v)] * L if base.vertices[v].role == "input" else _ranges(lift.n(v), L, bs))
            for v in base.vertices}
    exch = {e.key: L > 1 and base.vertices[e.src].role != "input" for e in base.edges}
    # ---- halo and exchange modes (every rank's expectation, the runtime's choice)
    edges_out, modes = [], {}
    for e in base.edges:
        n_u, d_u, d_v = lift.n(e.src), base.dim(e.src), base.dim(e.dst)
        p = lift.prob(e)
        halo = [0.0] * L
        if exch[e.key]:
            halo = [(n_u - rows[e.src][r]) * (1 - (1 - p) ** rows[e.dst][r]) for r in range(L)]
            max_own = max(rows[e.src])
            modes[e.key] = choose_mode(round(sum(halo)), L * (L - 1) * max_own, par.exchange, par.allgather_threshold)
        else:
            modes[e.key] = "none"
        edges_out.append({"edge": str(e), "edges": lift.expected_edges(e), "mode": modes[e.key],
                          "halo_rows": sum(halo), "halo_rows_per_rank": halo, "d_src": d_u, "d_dst": d_v})
    per_rank = [_rank(cfg, base, lift, r, L, D, B, es, device, rows, exch, modes, edges_out, out_dim)
                for r in range(L)]
    worst = max(per_rank, key=lambda x: x["peak_bytes_per_rank"])
    params = sum(lift.expected_edges(e) * base.dim(e.dst) * base.dim(e.src) for e in base.edges)
    params += sum(lift.n(v) * base.dim(v) for v in base.vertices if base.vertices[v].bias)
    params += sum(lift.n(t) * out_dim * base.dim(t) for t in base.outputs)
    out = {"peak_bytes_per_rank": worst["peak_bytes_per_rank"], **{f"{k}_bytes": worst["parts"][k] for k in PARTS},
           "peak_phase": worst["phase"], "setup_peak_bytes_per_rank": worst["setup"],
           "host_bytes_per_rank": worst["host"], "params": params, "params_per_rank": worst["params"],
           "bytes_per_param": worst["peak_bytes_per_rank"] / max(worst["params"], 1),
           "exchange_bytes_forward_per_step": worst["sent"], "exchange_bytes_backward_per_step": worst["sent"],
           "world_size": P, "lift_parallel": L, "data_parallel": D, "batch_per_replica": B,
           "micro_batch": tr.micro_batch_size or B, "device": device,
           "engine": par.engine, "precision": "bf16" if bf16 else f"fp{es * 8}", "zero_stage": par.zero_stage,
           "phases": worst["phases"], "edges": edges_out, "parts": list(PARTS)}
    return out


def _split(sizes: list[float]) -> tuple[float, float]:
    """`(small, big)`: bytes of tensors below / above the mmap threshold."""
    small = sum(x for x in sizes if x < MMAP_THRESHOLD)
    return small, sum(sizes) - small


def _rank(cfg, base, lift, r, L, D, B, es, device, rows, exch, modes, edges_out, out_dim) -> dict[str, Any]:
    par, tr = cfg.parallel, cfg.train
    ds = par.engine == "deepspeed"
    cpu = device == "cpu"
    Bm = tr.micro_batch_size or B  # activations live for one micro-batch
    regen = cfg.model.topology == "regenerate"  # no stored indices (see the module doc)
    accumulate = cfg.micro_batches(D) > 1  # later micro-batches add their weight gradients to .grad
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if tr.momentum > 0 else 0}[tr.optimizer]
    tensors = [rows[v][r] * base.dim(v) for v in base.vertices if base.vertices[v].bias]
    tensors += [rows[t][r] * out_dim * base.dim(t) for t in base.outputs]
    keys = [rows[v][r] for v in base.vertices if base.vertices[v].bias] + [rows[t][r] for t in base.outputs]
    sorted_rows = [True] * len(keys)  # parameter rows already in checkpoint key order
    idx = sent = 0.0
    bwd_tmp: dict[Any, list[float]] = {}  # per edge: the temporaries of its backward
    halos: dict[Any, float] = {}  # per exchanging edge: the halo buffer its remote aggregate saves
    halo_row_bytes = 0.0  # the largest halo buffer per sample
    setup_held = setup = 0.0
    setup_small: list[list[float]] = []  # per edge: its per-block arrays
    ws_slots = ws_out = 0.0
    for e, st in zip(base.edges, edges_out):
        u, v, d_u, d_v = e.src, e.dst, base.dim(e.src), base.dim(e.dst)
        k, n_u = lift.in_degree_of(e), lift.n(u)
        n_v, own_u = rows[v][r], rows[u][r]
        m = n_v * k
        s = d_v * d_u
        tensors.append(m * s)
        keys.append(m)
        sorted_rows.append(not exch[e.key] or regen)
        kernel = cfg.model.impl
        if kernel not in ("csr", "blocked", "reference"):
            kernel = "csr" if d_v == 1 and cpu else "blocked"
        small = Bm * max(d_u, d_v) < s
        # the kernel's weight gradient becomes .grad as it is (the torch engine sets them to None
        # between steps; DeepSpeed's hooks copy it), or is added to .grad (later micro-batches)
        tmp = [m * s * es] if (accumulate or ds) else []
        if exch[e.key]:
            m_loc = m * own_u / n_u
            halo = st["halo_rows_per_rank"][r]
            ag = modes[e.key] == "allgather"
            cols_rem = L * max(rows[u]) if ag else halo
            if not regen:
                idx += _index_bytes(m_loc, n_v, own_u, d_u, kernel, Bm, small, True)
                idx += _index_bytes(m - m_loc, n_v, cols_rem, d_u, kernel, Bm, small, True)
            sent_rows = (L - 1) * max(rows[u]) if ag else halo  # by symmetry: what peers need from us
            sent += sent_rows * d_u * B * es
            # regenerated: own and received rows concatenated into one saved source buffer
            halos[e.key] = (cols_rem + (own_u if regen else 0)) * d_u * Bm * es
            halo_row_bytes = max(halo_row_bytes, cols_rem * d_u * es)
            # each slice's backward gives a full-size zero-filled gradient (one becomes .grad, the other
            # is added to it) from the kernel's gradient of the slice; the halo's gradient buffers
            # (received, sent, and on CPU gloo's flat copy of the sent one)
            tmp += [m * s * es, max(m_loc, m - m_loc) * s * es, sent_rows * d_u * Bm * es]
            tmp += [cols_rem * d_u * Bm * es] * (2 if cpu else 1)
            setup_tmp = m * (s * 4 + 48) if not regen else 0.0
        elif not regen:
            idx += _index_bytes(m, n_v, n_u, d_u, kernel, Bm, small, base.vertices[u].role != "input")
            setup_tmp = 0.0
        else:
            setup_tmp = 0.0
        n_blocks = max(1, math.ceil(n_v / lift.block_size))
        if regen:  # two offsets per block; in the backward the source-sized input gradient and the
            # chunks in flight: indices (~REGEN_IDX_BYTES per edge, the current one and those drawn
            # ahead) and, on the scalar CPU path, sampled and permuted weight values (8 B / edge),
            # else three gathered `[edges, d, B]` buffers of at most REGEN_CHUNK_ELEMS values
            idx += 16 * (n_blocks + 1)
            scalar_cpu = s == 1 and cpu and es in (4, 8)
            c = min(m, REGEN_CHUNK_EDGES if scalar_cpu else max(1, REGEN_CHUNK_ELEMS // (max(d_u, d_v) * Bm)))
            src_rows = (own_u + cols_rem) if exch[e.key] else n_u
            tmp += [src_rows * d_u * Bm * es] + [c * REGEN_IDX_BYTES] * (1 + DRAW_AHEAD)
            tmp += [8 * c] if scalar_cpu else [c * max(d_u, d_v) * Bm * es] * 3
            kernel = "regenerate"
        if kernel == "csr":  # transposed values, the sampled pattern's zeros and values, index copies
            tmp += [m * d_u * es] * 3 + [m * d_u * 4]
        elif kernel == "blocked":
            ws_slots = max(ws_slots, m * max(d_u * Bm, d_v * Bm, s))
            ws_out = max(ws_out, n_v * d_v * Bm, n_u * d_u * Bm)
        bwd_tmp[e.key] = tmp
        # setup: this edge's per-block arrays and their concatenation on top of the edges built so far
        per_edge = (0 if regen else 16) + 4 * s  # regenerated: weights only, drawn block by block
        setup = max(setup, setup_held + max((1 if regen else 2) * m * per_edge, setup_tmp))
        setup_small.append([m * per_edge / n_blocks] * n_blocks)
        setup_held += m * s * 4 + (0 if regen else 16 * m + 8 * n_v)
    N = sum(tensors)
    # ---- ownership arrays: none for `block` (ranges); graph / random: owner int32 + position int64
    shard = 0.0
    if L > 1 and par.partition != "block":
        shard = sum(12 * lift.n(v) for v in base.vertices if base.vertices[v].role != "input")
    d = cfg.data
    data = (d.n_train + d.n_test) * (base.in_dim + out_dim) * 4 if cpu else 0.0  # host memory on GPUs
    # ---- kernel workspaces: cached on CPU (4 slots of at most a chunk, the sorted output)
    chunk = CHUNK_CPU if cpu else CHUNK_GPU
    slots = 4 * min(chunk, ws_slots) + (min(WS_CACHE_MAX, ws_out) if cpu else 0)
    ws, ws_tmp = (slots * es, 0.0) if cpu else (0.0, slots * es)
    # ---- persistent states per engine
    if ds:
        shard_os = D if par.zero_stage >= 1 else 1
        grads = N * es / (D if par.zero_stage == 2 else 1)
        if par.zero_stage == 2:
            grads += min(N, DS_BUCKET) * es
        # the fp32 master copy: ZeRO >= 1 (a partition), or bf16 at stage 0
        master = N * 4 / shard_os if (es == 2 or par.zero_stage >= 1) else 0.0
        opt = N * 4 * moments / shard_os
    else:
        shard_os, grads, master, opt = 1, N * es, 0.0, N * es * moments
    host = 0.0
    if ds and par.offload_optimizer:  # master, moments and the fp32 gradient partition on the host
        host, opt, master = opt + master + 4 * N / shard_os, 0.0, 0.0
    # ---- phases: the tensors alive on top of the persistent terms
    acts, act_max = {}, 0.0
    for v in base.order:
        vx = base.vertices[v]
        if vx.role == "input":
            continue
        a = rows[v][r] * vx.dim * Bm * es
        acts[v] = [a] * (2 if vx.activation == "gelu" else 1)
        act_max = max(act_max, a)
    grad_of = {e.key: t * es for e, t in zip(base.edges, tensors[len(tensors) - len(base.edges):])}
    if ds:  # gradients held throughout: all saved tensors and the largest edge's temporaries
        backward = [x for a in acts.values() for x in a] + list(halos.values()) + [act_max] * 3 + \
            max(bwd_tmp.values(), key=sum, default=[]) + [ws_tmp]
        grads_at_peak = grads
    else:  # the backward walks the vertices in reverse: a vertex's saved tensors go before its
        # in-edges' gradients are computed, an edge's halo once its gradient is made, and each weight
        # gradient stays as .grad; the peak is the largest moment (usually the first edges)
        # (later micro-batches start with every gradient made and add each edge's into it)
        live_a, live_h, done = dict(acts), dict(halos), (sum(grad_of.values()) if accumulate else 0.0)
        backward, grads_at_peak = [], 0.0
        for v in reversed(base.order):
            if v not in acts:
                continue
            del live_a[v]
            for e in base.in_edges(v):  # while its gradient is made (counted with the gradients)
                done += 0.0 if accumulate else grad_of[e.key]
                now = [x for a in live_a.values() for x in a] + list(live_h.values()) + [act_max] * 3 + \
                    bwd_tmp[e.key] + [ws_tmp]
                if sum(now) + done > sum(backward) + grads_at_peak:
                    backward, grads_at_peak = now, done
                live_h.pop(e.key, None)
    if ds:  # the step's fp32 gradient partition and torch's foreach sqrt of the second moments
        optimizer = [] if par.offload_optimizer else [4 * N / shard_os] * (2 if master else 1)
    else:  # the gradient norm's float64 buffer of one chunk, the data-parallel flat all-reduce
        # buffer; the torch engine's Adam is fused (no temporaries, on CPU and GPU)
        optimizer = [8 * min(max(tensors), NORM_CHUNK)] + ([4 * N] if D > 1 else [])
    B_eval = min(cfg.train.micro_batch_size or EVAL_CHUNK, max(1, d.n_test // D)) if d.n_test else 0
    # every vertex's output (kept until the readout), two partial sums, and an exchange: received,
    # sent and (CPU) gloo's flat copy of the received rows
    out_eval = [rows[v][r] * base.dim(v) * B_eval * es for v in base.vertices if base.vertices[v].role != "input"]
    evaluation = out_eval + [max(out_eval, default=0.0)] * 2 + [ws_tmp] + \
        [halo_row_bytes * B_eval] * (3 if cpu else 2) if halo_row_bytes else out_eval + [ws_tmp]
    # checkpoint: every parameter's int64 row keys; rows not in key order (an exchanging edge's local
    # rows come first) are gathered into key order: fp32 value and moments, sorted keys, the order
    # one parameter at a time (checkpoint._collect is a generator): the largest one's copies
    # (`rows.write_rows` drops an entry before the next is made); parameters come in
    # `named_parameters` order: edges, biases, readouts.
    # Row keys are made per parameter when it is written (`rows.row_keys` is lazy): the largest
    # edge's keys and, stored, its edge index while they are derived (src, dst, dst * n_u: 3 x 8 B /
    # edge; regenerated edges are keyed block range by block range)
    edge_keys = keys[len(keys) - len(base.edges):]
    checkpoint = [8 * max(keys)] + ([] if regen else [8 * max(edge_keys, default=0)] * 3)
    n_vec = len(tensors) - len(base.edges)
    in_order = list(zip(tensors, keys, sorted_rows))
    in_order = in_order[n_vec:] + in_order[:n_vec]
    copies = []
    for x, n_rows, srt in in_order:
        if not srt:
            copies = max(copies, [4 * x] * (1 + moments) + [8 * n_rows] * 2, key=sum)
    checkpoint += copies
    if not cpu:  # gathered in host memory: on the device only one tensor's fp32 copies at a time
        checkpoint = [4 * max(tensors)] * (1 + moments)
    phases = {"setup": max(setup_small, key=lambda x: _split(x)[0], default=[]), "backward": backward, "optimizer": optimizer,
              "eval": evaluation, "checkpoint": checkpoint}
    split = {k: _split(x) for k, x in phases.items()}
    # the torch engine holds no gradients between steps: evaluation and checkpoints run in their room
    credit = {k: (0.0 if ds or k not in ("eval", "checkpoint") else grads) for k in phases}
    credit["backward"] = grads - grads_at_peak  # the weight gradients not made yet at its peak
    if cpu:  # the heap keeps what each phase freed below the mmap threshold; big tensors come and go
        smalls = [small for small, _ in split.values()]
        kept = (max(smalls) + sum(smalls)) / 2  # between full reuse (the largest) and none (the sum)
        phase = max(split, key=lambda k: split[k][1] - credit[k])
        transient = max(0.0, split[phase][1] - credit[phase])
        phase = phase if transient else "none"
    else:  # the caching allocator reuses freed blocks: the largest phase
        phase = max(split, key=lambda k: sum(split[k]) - credit[k])
        kept, transient = 0.0, max(0.0, sum(split[phase]) - credit[phase])
    baseline = (CPU_BASELINE + (TORCHRUN_EXTRA if L * D > 1 else 0)) if cpu else CUDA_BASELINE
    parts = {"baseline": baseline, "weights": N * es, "gradients": grads, "optimizer_state": opt,
             "master_weights": master, "indices": idx, "shard_arrays": shard, "workspaces": ws, "data": data,
             "allocator_kept": kept, "transient": transient}
    parts = {k: float(round(x)) for k, x in parts.items()}
    total = sum(parts.values())
    # set-up runs in host memory (the network moves to the device once built)
    setup_total = CPU_BASELINE + shard + setup + 32 * max(rows[v][r] for v in base.vertices)
    peak = max(total, setup_total) if cpu else total
    return {"parts": parts, "phase": phase if total >= setup_total or not cpu else "setup", "peak_bytes_per_rank": float(peak),
            "setup": float(round(setup_total)), "host": float(round(host)), "params": N, "sent": float(round(sent)),
            "phases": {k: float(round(sum(v))) for k, v in split.items()}}


def _fmt(n: float) -> str:
    return format_bytes(n, 2)


def format_table(est: dict[str, Any]) -> str:
    lines = [f"world {est['world_size']} = lift_parallel {est['lift_parallel']} x data_parallel {est['data_parallel']}; "
             f"micro-batch {est['micro_batch']}; {est['engine']} {est['precision']} ZeRO-{est['zero_stage']} on "
             f"{est['device']}",
             f"parameters {est['params']:,.0f} (per rank {est['params_per_rank']:,.0f})", "",
             f"{'per rank':<18}{'bytes':>14}{'B/param':>10}"]
    for k in PARTS:
        b = est[f"{k}_bytes"]
        lines.append(f"{k:<18}{_fmt(b):>14}{b / max(est['params_per_rank'], 1):>10.2f}")
    lines += [f"{'peak':<18}{_fmt(est['peak_bytes_per_rank']):>14}{est['bytes_per_param']:>10.2f}"
              f"   (largest transient: {est['peak_phase']})",
              f"{'setup peak':<18}{_fmt(est['setup_peak_bytes_per_rank']):>14}"
              + ("   (host memory)" if est["device"] == "cuda" else ""),
              f"{'host (offload)':<18}{_fmt(est['host_bytes_per_rank']):>14}",
              f"exchange per step and rank: forward {_fmt(est['exchange_bytes_forward_per_step'])}, "
              f"backward {_fmt(est['exchange_bytes_backward_per_step'])}", "",
              f"{'edge':<12}{'mode':<10}{'edges':>14}{'halo rows':>14}"]
    for e in est["edges"]:
        lines.append(f"{e['edge']:<12}{e['mode']:<10}{e['edges']:>14,.0f}{e['halo_rows']:>14,.0f}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m randlift_dist.estimate",
                 description="Predicted memory per rank and exchange volume of a run, from its config alone.")
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny run)")
    ap.add_argument("--world-size", type=int, default=None, help="total ranks (default: parallel.lift_parallel)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the model lives (default: cuda when parallel.backend=nccl, else cpu)")
    ap.add_argument("--json", action="store_true", help="print a JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.lift.size=4096")
    args = ap.parse_args(argv)
    try:
        est = estimate(load_config(args.config, args.overrides), args.world_size, args.device)
    except (ConfigError, EstimateError) as err:
        print(f"{ap.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=1) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
