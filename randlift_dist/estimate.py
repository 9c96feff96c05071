"""Memory and communication model of a run, per rank, from its config alone (no process group,
no sampled lift): `python -m randlift_dist.estimate --config FILE [--world-size P] [key=value ...]
[--json]`.

Inputs: the `Lift` of `cfg.build_lift()` (sizes and laws; nothing sampled), the layout
(`world = lift_parallel L x data_parallel D`), the engine, precision, ZeRO stage and optimizer.
Edge counts are expectations of the lift law (`Lift.in_degree_of`); ownership is the `block`
partition with equal expected load per vertex (contiguous ranges of n_v / L, snapped to sampling
blocks when n_v >= 8 x block_size x L, as `partition.block_partition` does). Every byte count is
per rank; the busiest rank is reported. Notation: m_e edges of base edge e=(u, v) on the rank,
N its parameters, n_v its rows of fibre v, B the micro-batch (batch / D), es the bytes of one
activation or weight value (4 fp32, 2 bf16), s_e = d_v x d_u.

Persistent terms (why):
- weights N x es; gradients N x es (`zero_grad(set_to_none=False)` keeps them; ZeRO-2 shards
  them over D); optimizer state 8 B (Adam: two fp32 moments) or 4 B (SGD momentum) per
  parameter, / D from ZeRO-1; master weights 4 B / param for bf16 or any ZeRO stage (DeepSpeed
  keeps an fp32 copy; / D from ZeRO-1) plus its fp32 gradient partition; offload moves master,
  moments and fp32 gradients to the host (`host_bytes_per_rank`).
- indices (`ops.CSR`): row and col int64 (16 B / edge) + indptr 8 B / target row; the transposed
  structure built on first backward: perm and t_row int64 (16 B / edge) + t_indptr 8 B / source
  row; degree groups of the blocked kernel: order and inv int64 (16 B / row, both directions);
  the scalar expansion of the CSR kernel (d_v = 1 on CPU): int32 copies, 12 B / scalar weight
  (+ 4 B / row). With L > 1 an exchanging edge has a local and a remote CSR.
- shard arrays: per non-input fibre `owners` int32 (4 B x n_v: whole fibre, every rank), `own`
  int64 (8 B / own row), `local_pos` int32 (4 B x n_v) and, in all-gather mode, `pos_in_owner`.
- kernel workspaces (CPU): per-thread cached scratch, four slots of at most 2^21 values and one
  of at most 2^23 (`ops/kernels.py`); on GPUs allocated per call, 2^25 values per slot.
- data: the train / test arrays, float32. baseline: the Python + torch process itself
  (measured, see `docs/scale.md`), or CUDA context + NCCL on a GPU (assumed 1 GiB).

Phase terms (the peak is the largest phase; `peak_phase` names it):
- backward: activations saved for the backward: per non-input vertex its output `[n_v, d, B]`,
  plus its pre-activation when the nonlinearity saves its input (gelu; relu/tanh/sigmoid save
  the output itself), plus the halo each exchanging edge received (all-to-all: halo rows x d_u
  x B; all-gather: L x max_own rows); the kernels save only y and w. Live in the backward: three
  activation-sized gradients (the vertex's, its pre-activation's, a source's being summed), the
  gradient of the largest edge before it is added to `.grad` (x 2 when the weight is split in a
  local and a remote slice: each slice's backward materialises a full-size zero-filled gradient),
  the CSR kernel's backward copies (4 arrays of the scalar weights), the halo's gradient buffers.
- optimizer: torch engine on CPU: the gradient norm's float64 copy and square of the largest
  gradient (16 B / value) vs Adam's `sqrt` and `/` temporaries (8 B / value); on GPUs torch
  Adam's foreach `sqrt` of every moment (4 B / parameter it steps).
- eval: `no_grad` forward of the test set in chunks of 1024 (every vertex's output is kept).
- setup (a phase without gradients or moments): the edges built so far plus, for the edge being
  built, its per-block arrays and their concatenation (2 x (16 B + s_e x 4 B) per edge), or at
  L > 1 the permutation buffers (a weight copy + ~48 B / edge for `split_edges` / `np.unique`);
  and the partition's in-degree draws (32 B / target row).

Communication (per rank and step, forward; the backward sends the same back): the expected
number of distinct remote sources of the rank's edges: each remote source i is used by one of
its n_v rows with probability 1 - (1 - p)^n_v (p = k / n_u: exact for both laws, and equal to
the first order to 1 - (1 - 1/n_u)^(n_v k)), times the n_u - own_u remote sources; all-to-all
sends those rows, all-gather sends L - 1 copies of max_own rows; the mode per base edge is the
runtime's (`comm.choose_mode`: all-gather when the total halo >= threshold x L (L - 1) max_own).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .plan import choose_mode
from .config import Config, ConfigError, load_config

GiB = 2**30
# Resident memory of one training process before the model (Python, torch, numpy, the trainer's
# imports, allocator slack); calibrated on the CPU machine of docs/scale.md (`bench/memory.py`).
CPU_BASELINE = 400 * 2**20
TORCHRUN_EXTRA = 40 * 2**20  # per rank under torchrun: gloo, the c10d store client, more threads
CUDA_BASELINE = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers (assumed, not measured)
CHUNK_CPU, CHUNK_GPU, WS_CACHE_MAX = 1 << 21, 1 << 25, 1 << 23  # as in ops/kernels.py
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce bucket (elements), ZeRO-2
EVAL_CHUNK = 1024  # Engine.sum_squared_error
MMAP_MAX = 32 * 2**20  # glibc's largest mmap threshold: smaller freed blocks stay in the heap
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


def _index_bytes(m: float, rows: int, cols: int, d_u: int, kernel: str, small_batch: bool, src_grad: bool) -> float:
    """CSR + cached kernel structures of one CSR (see the module doc)."""
    if m <= 0:
        return 8 * (rows + 1)
    b = 16 * m + 8 * (rows + 1)  # row, col, indptr
    transposed = src_grad or kernel == "csr"  # input fibres need no input gradient
    if transposed:
        b += 16 * m + 8 * (cols + 1)  # t_row, perm, t_indptr
    if kernel == "csr":  # int32 scalar expansion
        b += 12 * m * d_u + 4 * (rows + 1) + 4 * (cols * d_u + 1)
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
           "micro_batch": getattr(tr, "micro_batch_size", None) or B, "device": device,
           "engine": par.engine, "precision": "bf16" if bf16 else f"fp{es * 8}", "zero_stage": par.zero_stage,
           "phases": worst["phases"], "edges": edges_out, "parts": list(PARTS)}
    return out


def _split(sizes: list[float]) -> tuple[float, float]:
    """`(small, big)`: bytes of tensors below / above the mmap threshold."""
    small = sum(x for x in sizes if x < MMAP_MAX)
    return small, sum(sizes) - small


def _rank(cfg, base, lift, r, L, D, B, es, device, rows, exch, modes, edges_out, out_dim) -> dict[str, Any]:
    par, tr = cfg.parallel, cfg.train
    ds = par.engine == "deepspeed"
    cpu = device == "cpu"
    Bm = getattr(tr, "micro_batch_size", None) or B  # activations live for one micro-batch
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if tr.momentum > 0 else 0}[tr.optimizer]
    tensors = [rows[v][r] * base.dim(v) for v in base.vertices if base.vertices[v].bias]
    tensors += [rows[t][r] * out_dim * base.dim(t) for t in base.outputs]
    keys = [rows[v][r] for v in base.vertices if base.vertices[v].bias] + [rows[t][r] for t in base.outputs]
    idx = sent = 0.0
    bwd_tmp: list[list[float]] = []  # candidates: the temporaries of one edge's backward
    halos: list[float] = []  # halo buffers the remote aggregates save
    setup_held = setup = 0.0
    setup_small: list[float] = []
    ws_slots = ws_out = 0.0
    for e, st in zip(base.edges, edges_out):
        u, v, d_u, d_v = e.src, e.dst, base.dim(e.src), base.dim(e.dst)
        k, n_u = lift.in_degree_of(e), lift.n(u)
        n_v, own_u = rows[v][r], rows[u][r]
        m = n_v * k
        s = d_v * d_u
        tensors.append(m * s)
        keys.append(m)
        kernel = cfg.model.impl
        if kernel not in ("csr", "blocked", "reference"):
            kernel = "csr" if d_v == 1 and cpu else "blocked"
        small = Bm * max(d_u, d_v) < s
        tmp = [m * s * es]  # the kernel's weight gradient, before it is added to .grad
        if exch[e.key]:
            m_loc = m * own_u / n_u
            halo = st["halo_rows_per_rank"][r]
            ag = modes[e.key] == "allgather"
            cols_rem = L * max(rows[u]) if ag else halo
            idx += _index_bytes(m_loc, n_v, own_u, d_u, kernel, small, True)
            idx += _index_bytes(m - m_loc, n_v, cols_rem, d_u, kernel, small, True)
            sent_rows = (L - 1) * max(rows[u]) if ag else halo  # by symmetry: what peers need from us
            sent += sent_rows * d_u * B * es
            halos.append(cols_rem * d_u * Bm * es)
            # each slice's backward gives a full-size zero-filled gradient; the halo's gradient buffers
            tmp = [m * s * es, m * s * es, max(m_loc, m - m_loc) * s * es,
                   sent_rows * d_u * Bm * es, cols_rem * d_u * Bm * es]
            setup_tmp = m * (s * 4 + 48)
        else:
            idx += _index_bytes(m, n_v, n_u, d_u, kernel, small, base.vertices[u].role != "input")
            setup_tmp = 0.0
        if kernel == "csr":  # transposed values, the sampled pattern's zeros and values, index copies
            tmp += [m * d_u * es] * 3 + [m * d_u * 4]
        elif kernel == "blocked":
            ws_slots = max(ws_slots, m * max(d_u * Bm, d_v * Bm, s))
            ws_out = max(ws_out, n_v * d_v * Bm, n_u * d_u * Bm)
        bwd_tmp.append(tmp)
        # setup: this edge's per-block arrays and their concatenation on top of the edges built so far
        per_edge = 16 + 4 * s
        setup = max(setup, setup_held + max(2 * m * per_edge, setup_tmp))
        n_blocks = max(1, math.ceil(n_v / lift.block_size))
        setup_small.append(_split([m * per_edge / n_blocks] * n_blocks)[0])
        setup_held += m * s * 4 + 16 * m + 8 * n_v
    N = sum(tensors)
    # ---- ownership arrays: none for `block` (ranges); graph / random: owner int32 + position int64
    shard = 0.0
    if L > 1 and par.partition != "block":
        shard = sum(12 * lift.n(v) for v in base.vertices if base.vertices[v].role != "input")
    d = cfg.data
    data = (d.n_train + d.n_test) * (base.in_dim + out_dim) * 4 if cpu else 0.0  # host memory on GPUs
    # ---- kernel workspaces: cached on CPU (4 slots <= 2^21 values, the sorted output <= 2^23)
    chunk = CHUNK_CPU if cpu else CHUNK_GPU
    slots = 4 * min(chunk, ws_slots) + (min(WS_CACHE_MAX, ws_out) if cpu else 0)
    ws, ws_tmp = (slots * es, 0.0) if cpu else (0.0, slots * es)
    # ---- persistent states per engine
    if ds:
        shard_os = D if par.zero_stage >= 1 else 1
        grads = N * es / (D if par.zero_stage == 2 else 1)
        if par.zero_stage == 2:
            grads += min(N, DS_BUCKET) * es
        # fp32 master copy and its fp32 gradient: ZeRO >= 1 (partitions), or bf16 at stage 0
        master = (N * 4 / shard_os) * (2 if (es == 2 or par.zero_stage >= 1) else 0)
        opt = N * 4 * moments / shard_os
    else:
        shard_os, grads, master, opt = 1, N * es, 0.0, N * es * moments
    host = 0.0
    if ds and par.offload_optimizer:
        host, opt, master = opt + master, 0.0, 0.0
    # ---- phases: the tensors alive on top of the persistent terms
    acts, act_max = [], 0.0
    for v in base.order:
        vx = base.vertices[v]
        if vx.role == "input":
            continue
        a = rows[v][r] * vx.dim * Bm * es
        acts += [a] * (2 if vx.activation == "gelu" else 1)
        act_max = max(act_max, a)
    backward = acts + halos + [act_max] * 3 + max(bwd_tmp, key=sum, default=[]) + [ws_tmp]
    if ds:
        optimizer = [] if par.offload_optimizer else [4 * N / shard_os]
    elif cpu:  # the gradient norm's float64 copy and square of each gradient, one at a time
        optimizer = [8 * max(tensors)] * 2 + ([4 * N] if D > 1 else [])
    else:  # torch's foreach Adam: a sqrt of every second moment
        optimizer = [4 * N] + ([4 * N] if D > 1 else [])
    B_eval = min(EVAL_CHUNK, max(1, d.n_test // D)) if d.n_test else 0
    evaluation = [rows[v][r] * base.dim(v) * B_eval * es for v in base.vertices
                  if base.vertices[v].role != "input"] + [ws_tmp]
    # checkpoint: every parameter's fp32 value and moments gathered in key order, with its keys
    checkpoint = [4 * x for x in tensors] * (1 + moments) + [8 * x for x in keys] * 2 + [16 * max(keys)]
    phases = {"setup": [max(setup_small, default=0.0)], "backward": backward, "optimizer": optimizer,
              "eval": evaluation, "checkpoint": checkpoint}
    split = {k: _split(x) for k, x in phases.items()}
    if cpu:  # the heap keeps its high-water mark; big tensors are mapped and unmapped per phase
        heap_phase = max(split, key=lambda k: split[k][0])
        big_phase = max(split, key=lambda k: split[k][1])
        kept, transient = split[heap_phase][0], split[big_phase][1]
        phase = big_phase if transient >= kept else heap_phase
    else:  # the caching allocator reuses freed blocks: the largest phase
        phase = max(split, key=lambda k: sum(split[k]))
        kept, transient = 0.0, sum(split[phase])
    baseline = (CPU_BASELINE + (TORCHRUN_EXTRA if L * D > 1 else 0)) if cpu else CUDA_BASELINE
    parts = {"baseline": baseline, "weights": N * es, "gradients": grads, "optimizer_state": opt,
             "master_weights": master, "indices": idx, "shard_arrays": shard, "workspaces": ws, "data": data,
             "allocator_kept": kept, "transient": transient}
    parts = {k: float(round(x)) for k, x in parts.items()}
    total = sum(parts.values())
    setup_total = baseline + shard + setup + 32 * max(rows[v][r] for v in base.vertices)
    peak = max(total, setup_total)
    return {"parts": parts, "phase": phase if total >= setup_total else "setup", "peak_bytes_per_rank": float(peak),
            "setup": float(round(setup_total)), "host": float(round(host)), "params": N, "sent": float(round(sent)),
            "phases": {k: float(round(sum(v))) for k, v in split.items()}}


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


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
              f"   (phase: {est['peak_phase']}; activations and transient are that phase's)",
              f"{'setup peak':<18}{_fmt(est['setup_peak_bytes_per_rank']):>14}",
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
