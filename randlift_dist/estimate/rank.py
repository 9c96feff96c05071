"""From a config to each rank's estimate: the glue between the config (`runspec.py`), the shapes
of each rank (`shapes.py`), the terms of its edges and vertices (`items.py`, `activation_memory.py`),
the persistent terms (`terms.py`) and the phases (`phases.py`).

Every decision the runtime makes is asked of the runtime's own function (see those modules); the
busiest lift-parallel rank is reported. Parameters come from the base graph's own shapes
(`BaseGraph.weight_shape`, `vertex_parameters`): the model builds its parameters from the same.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import activation_memory as am
from ..config import Config
from . import phases as ph
from . import terms as tm
from .items import edge_grads, edge_terms, vertex_eval_moments, vertex_moments
from .runspec import EstimateError, Run, make_run
from .shapes import EdgeShape, edge_shapes, expected_params, fibre_bounds, vertex_param_sizes

PARTS = ("baseline", "weights", "gradients", "optimizer_state", "master_weights", "indices", "shard_arrays",
         "workspaces", "data", "allocator_kept", "transient")


def rank_estimate(run: Run, base, lift, rows: dict[str, list[int]], edges: list[EdgeShape], r: int) -> dict[str, Any]:
    """The persistent parts, the phases and the peak of lift-parallel rank r."""
    es, Bm, cpu, eng = run.es, run.micro_batch, run.cpu, run.engine
    B_eval = max(run.eval_batches, default=0)
    verts = [v for v in base.order if base.vertices[v].role != "input"]
    n = {v: rows[v][r] for v in base.vertices}
    # parameters, in named_parameters order within kinds: (values, rows, rows in checkpoint key order)
    vec = [(x, n[v], True) for v in base.vertices for x in vertex_param_sizes(base, v, n[v])]
    vec += [(n[t] * run.out_dim * base.dim(t), n[t], True) for t in base.outputs]
    edge_params = [(e.m * e.s, e.m, not e.exchanging or run.regen) for e in edges]
    N = sum(x for x, _, _ in vec + edge_params)
    terms = {e.key: edge_terms(run, base, e) for e in edges}
    idx = sum(t.idx for t in terms.values())
    ws_train = tuple(max(t.ws_train[i] for t in terms.values()) for i in (0, 1))
    ws_eval = tuple(max(t.ws_eval[i] for t in terms.values()) for i in (0, 1))
    shard = tm.shard_array_bytes(run.partition, run.lift_parallel, (lift.n(v) for v in verts))
    ws_all = tm.workspace_bytes(max(ws_train[0], ws_eval[0]), max(ws_train[1], ws_eval[1]), es, run.device)
    ws, ws_bwd, ws_ev = (ws_all, 0.0, 0.0) if cpu else (0.0, tm.workspace_bytes(*ws_train, es, run.device),
                                                        tm.workspace_bytes(*ws_eval, es, run.device))
    d = run.data
    data = tm.data_bytes(d.n_train, d.n_test, d.in_dim, d.label, d.lazy, run.batch, B_eval)
    host = tm.offloaded_bytes(N, eng) + (0.0 if cpu else data)
    grads = tm.gradient_bytes(N, eng)
    # ---- phases
    saved = {v: [x for xs in am.vertex_saved(base, v, n[v], Bm, es, run.out_dim).values() for x in xs] for v in verts}
    inputs = [x for v in base.inputs for x in am.input_saved(base, v, n[v], Bm, es)]
    step_batch = [tm.batch_bytes(run.batch if cpu else Bm, d.in_dim, d.label)]
    extra = step_batch + inputs + ([ws_bwd] if ws_bwd else [])
    loss = tm.logit_bytes(Bm, run.out_dim, es, d.loss)
    grad_of = {e.key: e.m * e.s * es for e in edges}
    moments = {e.key: edge_grads(base, e, Bm, es) + terms[e.key].temporaries for e in edges}
    moments.update({v: vertex_moments(base, v, n[v], Bm, es) for v in verts})
    edge_saved = {k: t.saved for k, t in terms.items() if t.saved}
    if eng.deepspeed:
        every = [x for a in saved.values() for x in a] + [x for a in edge_saved.values() for x in a]
        backward, grads_at_peak = ph.backward_deepspeed(every, moments, extra + loss), grads
        optimizer = ph.optimizer_deepspeed(N, eng.shards, eng.has_master, eng.offload)
    else:
        in_edges = {v: [e.key for e in base.in_edges(v)] for v in verts}
        backward, grads_at_peak = ph.backward_torch(verts, saved, in_edges, edge_saved, moments, grad_of, extra,
                                                    loss, run.accumulate)
        optimizer = ph.optimizer_torch([x for x, _, _ in vec + edge_params], run.data_parallel)
    outputs = {v: am.vertex_values(base, v, n[v], B_eval) * es for v in verts}
    outputs.update({v: sum(am.input_saved(base, v, n[v], B_eval, es)) for v in base.inputs})
    ev_moments = {v: vertex_eval_moments(base, v, n[v], B_eval, es, [terms[e.key].eval_moment for e in
                                                                     base.in_edges(v)]) for v in verts}
    readout = [float(n[t] * run.out_dim * base.dim(t) * es) for t in base.outputs]  # the rows' rearranged copy
    ev_extra = tm.logit_bytes(B_eval, run.out_dim, es, d.loss, grad=False) + [x for t in terms.values()
                                                                             for x in t.eval_extra]
    evaluation = ph.eval_phase(base.order, outputs, ev_moments, readout,
                               ev_extra + ([ws_ev] if ws_ev else [])) if B_eval else []
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
    sent = sum(e.sent * e.row * run.batch * es for e in edges)
    return {"parts": parts, "phase": phase if total >= setup_total or not cpu else "setup",
            "peak_bytes_per_rank": float(peak), "setup": float(round(setup_total)), "host": float(round(host)),
            "params": N, "sent": float(round(sent)),
            "phases": {k: float(round(sum(v))) for k, v in phases.items()},
            "kernels": {e.name: terms[e.key].kernel for e in edges}}


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
    per_rank_edges = edge_shapes(run.lift_parallel, run.exchange, run.threshold, base, lift, bounds)
    per_rank = [rank_estimate(run, base, lift, rows, per_rank_edges[r], r) for r in range(run.lift_parallel)]
    worst = max(per_rank, key=lambda x: x["peak_bytes_per_rank"])
    params = expected_params(base, lift, out_dim)
    edges_out = [{"edge": e0.name, "edges": lift.expected_edges(base.edge(e0.key)), "mode": e0.mode,
                  "halo_rows": sum(rk[i].halo for rk in per_rank_edges),
                  "halo_rows_per_rank": [rk[i].halo for rk in per_rank_edges], "d_src": e0.d_u, "d_dst": e0.d_v,
                  "features": e0.features, "row_values": e0.row,
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
            "batch_per_replica": run.batch, "micro_batch": run.micro_batch, "eval_batches": list(run.eval_batches),
            "device": run.device,
            "triton": run.triton, "engine": cfg.parallel.engine,
            "precision": "bf16" if run.dtype == torch.bfloat16 else f"fp{eng.es * 8}",
            "zero_stage": cfg.parallel.zero_stage, "phases": worst["phases"], "edges": edges_out, "parts": list(PARTS)}


__all__ = ["PARTS", "EstimateError", "estimate"]
