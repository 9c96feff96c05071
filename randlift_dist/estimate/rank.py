"""From a config to the shapes of each rank, and from those to the estimate: the glue between the
config and the pure terms (`terms.py`) and phases (`phases.py`).

Every decision the runtime makes is asked of the runtime's own function, never re-derived here:
the world and batch checks (`Config.check_world`), the rows of each rank (`partition.
equal_load_bounds`: the `block` strategy's snapping, with equal expected load per vertex), the
exchange mode and volume (`exchange.choose_mode`, `exchange.rows_sent`), the kernel and its
backward path (`ops.kernels.choose_impl`, `csr_fused_backward`), the regenerated kernel's path
and chunk (`ops.regen.scalar_path`, `chunk_edges`), the evaluation chunk (`limits.EVAL_CHUNK`).
Edge counts are expectations of the lift law (`Lift.in_degree_of`; exact for `fixed_degree`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data import split_sizes
from ..exchange import choose_mode, rows_sent
from ..limits import EVAL_CHUNK
from ..ops import kernels as _kernels
from ..ops import regen as _regen
from ..partition import equal_load_bounds
from . import phases as ph
from . import terms as tm

PARTS = ("baseline", "weights", "gradients", "optimizer_state", "master_weights", "indices", "shard_arrays",
         "workspaces", "data", "allocator_kept", "transient")
DEVICES = ("cpu", "cuda")


class EstimateError(ValueError):
    """The run cannot be estimated as asked; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data term needs (`terms.data_bytes`), read from the config in `data_spec` only."""

    kind: str
    n_train: int
    n_test: int
    in_dim: int
    label: int  # bytes of one sample's label
    lazy: bool  # rows read from shards on demand (O(batch)), not arrays in memory (O(N))
    loss: str


def data_spec(cfg: Config, in_dim: int, out_dim: int) -> DataSpec:
    """What the data and logit terms read: `data.kind` (`shards` is read lazily), the rows of each
    split (`data.split_sizes`: the settings, a file's headers or a shard index; nothing is loaded)
    and `train.loss` (`cross_entropy`: int64 labels)."""
    loss = cfg.train.loss
    n_train, n_test = split_sizes(cfg)
    return DataSpec(cfg.data.kind, n_train, n_test, in_dim, tm.label_bytes(loss, out_dim), cfg.data.kind == "shards",
                    loss)


def eval_batches(n_test: int, data_parallel: int, step: int) -> tuple[int, ...]:
    """Every batch size the no-grad test forward runs on some replica: each replica takes its
    floor-split slice of the test rows (`Trainer.evaluate`) in chunks of `step`."""
    sizes = set()
    for k in range(data_parallel):
        n = n_test * (k + 1) // data_parallel - n_test * k // data_parallel
        if n >= step:
            sizes.add(step)
        if n % step:
            sizes.add(n % step)
    return tuple(sorted(sizes))


@dataclasses.dataclass(frozen=True)
class Run:
    """Run-wide facts: layout, batches, device, dtype, engine state, kernels, data."""

    world_size: int
    lift_parallel: int
    data_parallel: int
    batch: int  # per replica
    micro_batch: int
    eval_batches: tuple[int, ...]
    device: str
    dtype: torch.dtype
    engine: tm.EngineState
    accumulate: bool  # later micro-batches add their weight gradients to .grad
    regen: bool
    impl: str
    triton: bool
    partition: str
    exchange: str
    threshold: float
    out_dim: int
    data: DataSpec

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def es(self) -> int:
        return self.engine.es

    def kernel(self, d_v: int, d_u: int, batch: int) -> str:
        return _kernels.choose_impl(self.impl, d_v, d_u, batch, self.dtype, self.device, self.triton)


def make_run(cfg: Config, world_size: int | None, device: str | None, triton: bool | None,
             in_dim: int, out_dim: int) -> Run:
    par, tr = cfg.parallel, cfg.train
    L = par.lift_parallel
    P = L if world_size is None else world_size
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise EstimateError(f"--world-size {P!r}: must be a positive integer, a multiple of "
                            f"parallel.lift_parallel={L} (world = lift_parallel x data_parallel)")
    D = cfg.check_world(P)  # the trainer's own checks of the world, batch and micro-batch
    device = device or ("cuda" if par.backend == "nccl" else "cpu")
    if device not in DEVICES:
        raise EstimateError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    ds = par.engine == "deepspeed"
    dtype = torch.bfloat16 if ds and par.precision == "bf16" else (
        torch.float64 if not ds and tr.dtype == "float64" else torch.float32)
    es = torch.empty(0, dtype=dtype).element_size()
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if tr.momentum > 0 else 0}[tr.optimizer]
    eng = tm.EngineState(ds, par.zero_stage, D, es, moments, par.offload_optimizer)
    B = tr.batch_size // D
    Bm = tr.micro_batch_size or B
    data = data_spec(cfg, in_dim, out_dim)
    return Run(P, L, D, B, Bm, eval_batches(data.n_test, D, tr.micro_batch_size or EVAL_CHUNK), device, dtype, eng,
               cfg.micro_batches(D) > 1, cfg.model.topology == "regenerate", cfg.model.impl,
               device == "cuda" if triton is None else bool(triton), par.partition, par.exchange,
               par.allgather_threshold, out_dim, data)


@dataclasses.dataclass(frozen=True)
class EdgeShape:
    """One base edge e = (u, v) on one rank: expected in-degree k, fibre sizes, this rank's target
    rows n_v and source rows own_u, the exchange (mode, expected halo rows of this rank)."""

    name: str
    key: tuple[str, str]
    d_u: int
    d_v: int
    k: float
    n_u: int
    n_v: int
    own_u: int
    max_own_u: int
    lift_parallel: int
    src_input: bool
    mode: str  # none, alltoall, allgather
    halo: float
    n_blocks: int

    @property
    def exchanging(self) -> bool:
        return self.mode != "none"

    @property
    def m(self) -> float:
        return self.n_v * self.k

    @property
    def s(self) -> int:
        return self.d_v * self.d_u

    @property
    def m_local(self) -> float:
        return self.m * self.own_u / self.n_u if self.exchanging else self.m

    @property
    def received(self) -> float:
        """Rows of the received buffer (all-gather: every rank's shard, padded)."""
        return float(self.lift_parallel * self.max_own_u) if self.mode == "allgather" else self.halo

    @property
    def sent(self) -> float:
        """Rows sent per sample (by symmetry, what the peers need from this rank)."""
        if not self.exchanging:
            return 0.0
        if self.mode == "allgather":
            return float(rows_sent("allgather", 0, self.max_own_u, self.lift_parallel))
        return self.halo


def fibre_bounds(base, lift, L: int) -> dict[str, list[tuple[int, int]]]:
    """`[lo, hi)` of every fibre on each lift-parallel rank (an input fibre: all of it, everywhere)."""
    out = {}
    for v in base.vertices:
        n = lift.n(v)
        if base.vertices[v].role == "input":
            out[v] = [(0, n)] * L
        else:
            b = equal_load_bounds(n, L, lift.block_size).tolist()
            out[v] = [(b[r], b[r + 1]) for r in range(L)]
    return out


def _blocks(lo: int, hi: int, block: int) -> int:
    """Sampling blocks holding rows `[lo, hi)` (`ShardPlan.target_blocks`)."""
    return -(-hi // block) - lo // block if hi > lo else 0


def edge_shapes(run: Run, base, lift, bounds: dict[str, list[tuple[int, int]]]) -> list[list[EdgeShape]]:
    """`[rank][edge]` shapes; the exchange mode is the runtime's choice from every rank's halo."""
    L = run.lift_parallel
    rows = {v: [hi - lo for lo, hi in b] for v, b in bounds.items()}
    per_rank: list[list[EdgeShape]] = [[] for _ in range(L)]
    for e in base.edges:
        u, v = e.src, e.dst
        n_u, p = lift.n(u), lift.prob(e)
        src_input = base.vertices[u].role == "input"
        exch = L > 1 and not src_input
        halo = [tm.expected_halo_rows(n_u, rows[u][r], rows[v][r], p) if exch else 0.0 for r in range(L)]
        max_own = max(rows[u])
        mode = choose_mode(round(sum(halo)), L * (L - 1) * max_own, run.exchange, run.threshold) if exch else "none"
        for r in range(L):
            per_rank[r].append(EdgeShape(str(e), e.key, base.dim(u), base.dim(v), lift.in_degree_of(e), n_u,
                                         rows[v][r], rows[u][r], max_own, L, src_input, mode, halo[r],
                                         _blocks(*bounds[v][r], lift.block_size)))
    return per_rank


def _edge_runs(run: Run, e: EdgeShape, src_grad: bool) -> list[tuple[str, int, str]]:
    """The kernel runs of one CSR: training (forward and backward) and each evaluation batch."""
    train = (run.kernel(e.d_v, e.d_u, run.micro_batch), run.micro_batch, "both" if src_grad else "weight")
    return [train] + [(run.kernel(e.d_v, e.d_u, b), b, "none") for b in run.eval_batches]


def _blocked_code(kernel: str, d_u: int, cols: float, batch: int, grads: str) -> bool:
    """Whether a kernel run goes through the blocked kernels' code (and their workspaces)."""
    if kernel == "blocked":
        return True
    return kernel == "csr" and grads != "none" and _kernels.csr_fused_backward(d_u, cols, batch, grads == "both")


def rank_estimate(run: Run, base, lift, rows: dict[str, list[int]], edges: list[EdgeShape], r: int) -> dict[str, Any]:
    """The persistent parts, the phases and the peak of lift-parallel rank r."""
    es, Bm, cpu, eng = run.es, run.micro_batch, run.cpu, run.engine
    sources = {e.src for e in base.edges}
    verts = [tm.VertexShape(v, base.dim(v), rows[v][r], base.vertices[v].activation, v in sources,
                            run.out_dim if v in base.outputs else 0)
             for v in base.order if base.vertices[v].role != "input"]
    # parameters, in named_parameters order within kinds: (values, rows, rows in checkpoint key order)
    vec = [(rows[v][r] * base.dim(v), rows[v][r], True) for v in base.vertices if base.vertices[v].bias]
    vec += [(rows[t][r] * run.out_dim * base.dim(t), rows[t][r], True) for t in base.outputs]
    edge_params = [(e.m * e.s, e.m, not e.exchanging or run.regen) for e in edges]
    N = sum(x for x, _, _ in vec + edge_params)
    idx = 0.0
    temporaries: dict[Any, list[float]] = {}
    edge_saved: dict[Any, list[float]] = {}
    ws_train = ws_eval = (0.0, 0.0)  # (slot values, output values) of the blocked code's chunks
    halo_row_bytes = 0.0
    eval_extra: list[float] = []
    for e in edges:
        kernel = "regenerate" if run.regen else run.kernel(e.d_v, e.d_u, Bm)
        regen = None
        if run.regen:
            scalar = _regen.scalar_path(e.d_v, e.d_u, run.device, run.dtype)
            c = min(e.m, _regen.chunk_edges(e.d_v, e.d_u, Bm, scalar))
            regen = ((e.own_u + e.received) if e.exchanging else e.n_u, c, scalar)
            idx += tm.regenerated_index_bytes(e.n_blocks)
            csrs = []
        elif e.exchanging:
            csrs = [(e.m_local, e.own_u, True), (e.m - e.m_local, e.received, True)]
            idx += tm.plan_exchange_bytes(e.m, e.m_local, e.mode, e.sent, e.halo)
        else:
            csrs = [(e.m, e.n_u, not e.src_input)]
        fused = False
        for m, cols, src_grad in csrs:
            runs = _edge_runs(run, e, src_grad)
            idx += sum(tm.index_structures(m, e.n_v, cols, e.d_v, e.d_u, runs).values())
            for kern, b, grads in runs:
                if _blocked_code(kern, e.d_u, cols, b, grads):
                    slots = e.m * max(e.d_u * b, e.d_v * b, e.s)
                    out = max(e.n_v * e.d_v * b, e.n_u * e.d_u * b)
                    if grads == "none":
                        ws_eval = (max(ws_eval[0], slots), max(ws_eval[1], out))
                    else:
                        ws_train = (max(ws_train[0], slots), max(ws_train[1], out))
            fused |= kernel == "csr" and _kernels.csr_fused_backward(e.d_u, cols, Bm, src_grad)
        if e.exchanging:
            halo_row_bytes = max(halo_row_bytes, e.received * e.d_u * es)
            edge_saved[e.key] = [(e.received + (e.own_u if run.regen else 0)) * e.d_u * Bm * es]
        if kernel == "reference":  # autograd keeps the gathered sources for the weight gradient
            edge_saved.setdefault(e.key, []).append(e.m * e.d_u * Bm * es)
            eval_extra += [e.m * (e.d_u + e.d_v) * max(run.eval_batches, default=0) * es]
        temporaries[e.key] = ph.edge_temporaries(
            kernel, es, Bm, e.m, e.d_v, e.d_u, e.n_v, copy_grad=run.accumulate or eng.deepspeed,
            split=(e.m_local, e.m - e.m_local) if e.exchanging and not run.regen else None,
            halo=(e.sent, e.received) if e.exchanging else None, cpu=cpu, regen=regen, fused=fused,
            input_grad=not e.src_input)
    shard = tm.shard_array_bytes(run.partition, run.lift_parallel, (lift.n(v.name) for v in verts))
    ws_all = tm.workspace_bytes(max(ws_train[0], ws_eval[0]), max(ws_train[1], ws_eval[1]), es, run.device)
    ws, ws_bwd, ws_ev = (ws_all, 0.0, 0.0) if cpu else (0.0, tm.workspace_bytes(*ws_train, es, run.device),
                                                        tm.workspace_bytes(*ws_eval, es, run.device))
    d = run.data
    B_eval = max(run.eval_batches, default=0)
    data = tm.data_bytes(d.n_train, d.n_test, d.in_dim, d.label, d.lazy, run.batch, B_eval)
    host = tm.offloaded_bytes(N, eng) + (0.0 if cpu else data)
    grads = tm.gradient_bytes(N, eng)
    # ---- phases
    saved = {v.name: tm.vertex_saved(v, Bm, es) for v in verts}
    act_max = max((v.values(Bm) * es for v in verts), default=0.0)
    step_batch = [tm.batch_bytes(run.batch if cpu else Bm, d.in_dim, d.label)]
    extra = step_batch + ([ws_bwd] if ws_bwd else [])
    loss = tm.logit_bytes(Bm, run.out_dim, es, d.loss)
    grad_of = {e.key: e.m * e.s * es for e in edges}
    if eng.deepspeed:
        every = [x for a in saved.values() for x in a] + [x for a in edge_saved.values() for x in a]
        backward, grads_at_peak = ph.backward_deepspeed(every, act_max, temporaries, extra + loss), grads
    else:
        in_edges = {v.name: [e.key for e in base.in_edges(v.name)] for v in verts}
        backward, grads_at_peak = ph.backward_torch([v.name for v in verts], saved, in_edges, edge_saved,
                                                    temporaries, grad_of, act_max, extra, loss, run.accumulate)
    if eng.deepspeed:
        optimizer = ph.optimizer_deepspeed(N, eng.shards, eng.has_master, eng.offload)
    else:
        optimizer = ph.optimizer_torch([x for x, _, _ in vec + edge_params], run.data_parallel)
    outputs = [x for v in verts for x in tm.vertex_eval(v, B_eval, es)]
    ev_extra = tm.logit_bytes(B_eval, run.out_dim, es, d.loss, grad=False) + eval_extra + ([ws_ev] if ws_ev else [])
    readout = [x for v in verts for x in v.readout_copies(B_eval, es)]
    evaluation = ph.eval_phase(outputs, readout, halo_row_bytes, B_eval, cpu, ev_extra) if B_eval else []
    checkpoint = ph.checkpoint_phase(edge_params + vec, [e.m for e in edges], eng.moments, run.regen, cpu)
    setup, setup_blocks = ph.setup_phase([(e.m, e.s, e.n_v, e.n_blocks, e.exchanging, run.regen) for e in edges])
    phases = {"setup": setup_blocks, "backward": backward, "optimizer": optimizer, "eval": evaluation,
              "checkpoint": checkpoint}
    # the torch engine holds no gradients between steps: evaluation and checkpoints run in their room
    credit = {k: (0.0 if eng.deepspeed or k not in ("eval", "checkpoint") else grads) for k in phases}
    credit["backward"] = grads - grads_at_peak  # the weight gradients not made yet at its peak
    kept, transient, phase = ph.allocator(phases, credit, cpu)
    parts = {"baseline": tm.baseline_bytes(run.device, run.world_size), "weights": tm.weight_bytes(N, es),
             "gradients": grads, "optimizer_state": tm.optimizer_state_bytes(N, eng),
             "master_weights": tm.master_weight_bytes(N, eng), "indices": idx, "shard_arrays": shard,
             "workspaces": ws, "data": data if cpu else 0.0, "allocator_kept": kept, "transient": transient}
    parts = {k: float(round(x)) for k, x in parts.items()}
    total = sum(parts.values())
    # set-up runs in host memory (the network moves to the device once built); the partition's draws
    setup_total = tm.CPU_BASELINE + shard + setup + 32 * max(rows[v][r] for v in base.vertices)
    peak = max(total, setup_total) if cpu else total
    sent = sum(e.sent * e.d_u * run.batch * es for e in edges)
    return {"parts": parts, "phase": phase if total >= setup_total or not cpu else "setup",
            "peak_bytes_per_rank": float(peak), "setup": float(round(setup_total)), "host": float(round(host)),
            "params": N, "sent": float(round(sent)),
            "phases": {k: float(round(sum(v))) for k, v in phases.items()},
            "kernels": {e.name: ("regenerate" if run.regen else run.kernel(e.d_v, e.d_u, Bm)) for e in edges}}


def estimate(cfg: Config, world_size: int | None = None, device: str | None = None,
             triton: bool | None = None) -> dict[str, Any]:
    """The memory and exchange model of `cfg` on `world_size` ranks (default: lift_parallel), per
    rank, the busiest rank reported. `device`: cpu or cuda (default: cuda when parallel.backend is
    nccl); `triton`: whether triton is installed there (default: on cuda, as with torch's CUDA
    wheels). Raises `EstimateError` / `ConfigError` naming the value and the fix."""
    base, lift = cfg.build_lift()
    out_dim = cfg.out_dim(base)
    run = make_run(cfg, world_size, device, triton, base.in_dim, out_dim)
    bounds = fibre_bounds(base, lift, run.lift_parallel)
    rows = {v: [hi - lo for lo, hi in b] for v, b in bounds.items()}
    per_rank_edges = edge_shapes(run, base, lift, bounds)
    per_rank = [rank_estimate(run, base, lift, rows, per_rank_edges[r], r) for r in range(run.lift_parallel)]
    worst = max(per_rank, key=lambda x: x["peak_bytes_per_rank"])
    params = sum(lift.expected_edges(e) * base.dim(e.dst) * base.dim(e.src) for e in base.edges)
    params += sum(lift.n(v) * base.dim(v) for v in base.vertices if base.vertices[v].bias)
    params += sum(lift.n(t) * out_dim * base.dim(t) for t in base.outputs)
    edges_out = [{"edge": e0.name, "edges": lift.expected_edges(base.edge(e0.key)), "mode": e0.mode,
                  "halo_rows": sum(rk[i].halo for rk in per_rank_edges),
                  "halo_rows_per_rank": [rk[i].halo for rk in per_rank_edges], "d_src": e0.d_u, "d_dst": e0.d_v,
                  "kernel": worst["kernels"][e0.name]}
                 for i, e0 in enumerate(per_rank_edges[0])]
    eng = run.engine
    return {"peak_bytes_per_rank": worst["peak_bytes_per_rank"],
            **{f"{k}_bytes": worst["parts"][k] for k in PARTS},
            "peak_phase": worst["phase"], "setup_peak_bytes_per_rank": worst["setup"],
            "host_bytes_per_rank": worst["host"], "params": params, "params_per_rank": worst["params"],
            "bytes_per_param": worst["peak_bytes_per_rank"] / max(worst["params"], 1),
            "exchange_bytes_forward_per_step": worst["sent"], "exchange_bytes_backward_per_step": worst["sent"],
            "world_size": run.world_size, "lift_parallel": run.lift_parallel, "data_parallel": run.data_parallel,
            "batch_per_replica": run.batch, "micro_batch": run.micro_batch, "device": run.device,
            "triton": run.triton, "engine": cfg.parallel.engine,
            "precision": "bf16" if run.dtype == torch.bfloat16 else f"fp{eng.es * 8}",
            "zero_stage": cfg.parallel.zero_stage, "phases": worst["phases"], "edges": edges_out, "parts": list(PARTS)}


__all__ = ["PARTS", "EstimateError", "estimate"]
