"""The terms of one base edge and of one vertex on one rank, with positions: what `rank.py` sums
into the persistent parts and feeds to the phases (`phases.py`).

An edge (`edge_terms`): its index bytes (the structures of every kernel call of every CSR it
holds: the local and the remote one of an exchanging edge, each conv chunk size, training and
evaluation), the blocked code's workspaces, what it keeps until its gradient is made (its mapped
rows, `activation_memory.edge_saved`; its halo; a gathering kernel's sources), its backward's
temporaries and its moment in an evaluation forward. The kernel's view of an edge is
`shapes.EdgeShape`'s: F features, `kcols` columns per sample, conv chunks. A token input's edge
(an embedding) holds its CSR (stored topology) and sums its tables `[n_v, d_v, V]` forward and
backward; no kernel runs.

A vertex: the buffers of its vertex map's backward (`vertex_moments`) and the moments of its
no-grad forward (`vertex_eval_moments`: each in-edge's message and the running sum; a layer
norm's centred, normalised and scaled copies; attention's sums, per-head copies and output). The gradients alive at an edge's backward (`edge_grads`):
three activation-sized (the larger of target and source); into an attention vertex, the q, k and
v gradients and two of the source's; at a conv edge the target's and, when the source feeds
other edges too, the source's running sum (the input gradient is the fold's, a temporary).
"""

from __future__ import annotations

import dataclasses

from .. import activation_memory as am
from ..geometry import numel
from ..ops import kernels as _kernels
from ..ops import regen as _regen
from . import phases as ph
from . import terms as tm
from .runspec import Run
from .shapes import EdgeShape

_MAPPED = ("pool", "mean", "select", "flatten")


@dataclasses.dataclass
class EdgeTerms:
    idx: float  # index bytes: CSR structures, the plan's exchange arrays, or block offsets
    ws_train: tuple[float, float]  # (slot values, output values) of the blocked code's chunks
    ws_eval: tuple[float, float]
    saved: list[float]  # kept until the edge's gradient is made
    temporaries: list[float]  # its backward's buffers (`phases.edge_temporaries`)
    eval_moment: list[float]  # alive while it runs in an evaluation forward
    eval_extra: list[float]  # alive throughout an evaluation (a gathering kernel's buffers)
    kernel: str


def _calls(run: Run, e: EdgeShape, rows: float, batch: int) -> list[int]:
    """Kernel columns of each distinct call on `batch` samples (a conv edge: per chunk size), largest first."""
    return sorted({b * e.kcols for b in e.chunks(rows, batch, run.device) if b}, reverse=True) or [0]


def _runs(run: Run, e: EdgeShape, rows: float, src_grad: bool) -> list[tuple[str, int, str]]:
    """`(kernel, columns, grads)` of every call of one CSR: training (forward and backward) and evaluation."""
    grads = "both" if src_grad else "weight"
    out = [(run.kernel(e.d_v, e.features, b), b, grads) for b in _calls(run, e, rows, run.micro_batch)]
    for B in run.eval_batches:
        out += [(run.kernel(e.d_v, e.features, b), b, "none") for b in _calls(run, e, rows, B)]
    return out


def _blocked_code(kernel: str, d_u: int, cols: float, batch: int, grads: str) -> bool:
    """Whether a kernel run goes through the blocked kernels' code (and their workspaces)."""
    if kernel == "blocked":
        return True
    return kernel == "csr" and grads != "none" and _kernels.csr_fused_backward(d_u, cols, batch, grads == "both")


def _conv(run: Run, e: EdgeShape, m: float, rows: float, input_grad: bool) -> list[float]:
    """A conv edge's backward buffers for one call over `rows` source rows (`phases.conv_temporaries`)."""
    es, Bm = run.es, run.micro_batch
    chunks = e.chunks(rows, Bm, run.device)
    b = max(chunks)
    return ph.conv_temporaries(e.unfolded(rows, b) * es, e.padded_values(rows, b) * es, rows * e.src_values * b * es,
                               rows * e.src_values * Bm * es, m * e.s * es, len(chunks) > 1, any(e.geom.padding),
                               input_grad)


def edge_terms(run: Run, base, e: EdgeShape) -> EdgeTerms:
    es, Bm, cpu = run.es, run.micro_batch, run.cpu
    B_ev = max(run.eval_batches, default=0)
    edge = base.edge(e.key)
    copy_grad = run.accumulate or run.engine.deepspeed
    zero = (0.0, 0.0)
    if e.tokens:  # an embedding: tables [n_v, d_v, V] summed forward and backward, no kernel, no exchange
        idx = tm.regenerated_index_bytes(e.n_blocks) if run.regen else tm.structure_bytes(
            "csr", e.m, e.n_v, e.n_u, e.features)
        tables = float(e.n_v * e.d_v * e.features * es)
        saved = am.edge_saved(base, edge, e.own_u, Bm, es) + ([8.0 * e.m] if run.regen else [])
        temps = [tables] + ([e.m * e.s * es] if copy_grad else [])
        return EdgeTerms(idx, zero, zero, saved, temps, [tables], [], "embed")
    regen_rows = (e.own_u + e.received) if e.exchanging else e.n_u
    if run.regen:
        csrs: list[tuple[float, float, bool]] = []
        idx = tm.regenerated_index_bytes(e.n_blocks)
    elif e.exchanging:
        csrs = [(e.m_local, e.own_u, True), (e.m - e.m_local, e.received, True)]
        idx = tm.plan_exchange_bytes(e.m, e.m_local, e.mode, e.sent, e.halo)
    else:
        csrs = [(e.m, e.n_u, not e.src_input)]
        idx = 0.0
    calls = csrs or [(e.m, regen_rows, not e.src_input)]
    b_train = _calls(run, e, calls[0][1], Bm)[0]
    kernel = "regenerate" if run.regen else run.kernel(e.d_v, e.features, b_train)
    ws_train = ws_eval = zero
    fused = False
    for m, cols, src_grad in csrs:
        runs = _runs(run, e, cols, src_grad)
        idx += sum(tm.index_structures(m, e.n_v, cols, e.d_v, e.features, runs).values())
        for kern, b, grads in runs:
            if _blocked_code(kern, e.features, cols, b, grads):
                slots = e.m * max(e.features * b, e.d_v * b, e.s)
                out = max(e.n_v * e.d_v * b, e.n_u * e.features * b)
                if grads == "none":
                    ws_eval = (max(ws_eval[0], slots), max(ws_eval[1], out))
                else:
                    ws_train = (max(ws_train[0], slots), max(ws_train[1], out))
        fused |= kernel == "csr" and _kernels.csr_fused_backward(e.features, cols, b_train, src_grad)
    regen = None
    if run.regen:
        scalar = _regen.scalar_path(e.d_v, e.features, run.device, run.dtype)
        c = min(e.m, _regen.chunk_edges(e.d_v, e.features, b_train, scalar))
        regen = (regen_rows * e.features * b_train * es, c, scalar)
    halo = (e.send_rows * e.row * Bm * es, e.received * e.row * Bm * es) if e.exchanging else None
    conv: list[float] = []
    if e.geom is not None:
        conv = max((_conv(run, e, m, cols, g) for m, cols, g in calls), key=sum)
        if halo is not None and not run.regen:  # the remote call's input gradient is the halo's: the
            # exchange's backward (the gradient, gloo's copy, the send buffer) runs after the fold's
            conv = max(conv, [halo[1]] * (2 if cpu else 1) + [halo[0]], key=sum)
            halo = None
    temps = ph.edge_temporaries(
        kernel, es, b_train, e.m, e.d_v, e.features, e.n_v, copy_grad=copy_grad,
        split=(e.m_local, e.m - e.m_local) if e.exchanging and not run.regen else None,
        halo=halo, cpu=cpu, regen=regen, fused=fused, input_grad=not e.src_input, conv=conv)
    saved = am.edge_saved(base, edge, e.own_u, Bm, es)
    if e.exchanging:
        saved.append((e.received + (e.own_u if run.regen else 0)) * e.row * Bm * es)
    eval_extra: list[float] = []
    if kernel == "reference":  # autograd keeps the gathered sources for the weight gradient
        saved.append(e.m * e.features * b_train * es)
        eval_extra.append(e.m * (e.features + e.d_v) * B_ev * e.kcols * es)
    return EdgeTerms(idx, ws_train, ws_eval, saved, temps, _eval_moment(run, e, calls, B_ev), eval_extra, kernel)


def _eval_moment(run: Run, e: EdgeShape, calls, B: int) -> list[float]:
    """An edge's worst moment in a no-grad forward of B samples: its message `[n_v, d_v, B P_v]`
    with its mapped rows or the halo buffers (the send buffer, the received rows and on CPU
    gloo's flat copy of them); a conv edge's per chunk: the zero-padded copy and the unfold, then
    the unfold and the product (and, chunked, the whole message filled chunk by chunk)."""
    es = run.es
    msg = e.n_v * e.dst_values * B * es
    out = [msg]
    if e.kind in _MAPPED:
        out.append(e.own_u * e.row * B * es)
    if e.exchanging:
        out += [e.send_rows * e.row * B * es] + [e.received * e.row * B * es] * (2 if run.cpu else 1)
    if e.geom is not None:
        for _, rows, _ in calls:
            chunks = e.chunks(rows, B, run.device)
            b = max(chunks)
            unfolded = e.unfolded(rows, b) * es
            pad = [e.padded_values(rows, b) * es] if any(e.geom.padding) else []
            product = [unfolded, e.n_v * e.dst_values * b * es]
            now = ([msg] if len(chunks) > 1 else []) + max(pad + [unfolded], product, key=sum)
            out = max(out, now + out[1:], key=sum)
    return out


def edge_grads(base, e: EdgeShape, B: int, es: int) -> list[float]:
    """The activation-sized gradients alive while edge e's gradient is made (see the module doc)."""
    a_v = e.n_v * e.dst_values * B * es
    a_u = e.own_u * e.src_values * B * es
    if base.vertices[e.key[1]].kind == "attention":
        kv = a_v * numel(base.key_positions(e.key[1])) / numel(base.positions(e.key[1]))
        return [a_v, kv, kv, a_u, a_u]
    if e.geom is not None:  # the input gradient is the fold's (`conv_temporaries`); a sum if u feeds others
        return [a_v] + [a_u] * (sum(f.src == e.key[0] for f in base.edges) > 1)
    return [max(a_v, a_u)] * 3


def vertex_moments(base, v: str, n: int, B: int, es: int) -> list[float]:
    """A vertex map's backward buffers: its output's gradient and the map's own (see the module doc)."""
    vx = base.vertices[v]
    a = am.vertex_values(base, v, n, B) * es
    if vx.kind == "attention":
        kv = a * numel(base.key_positions(v)) / numel(base.positions(v))
        return [a, a, a, kv, kv, a]
    return [a] * 4 if vx.norm == "layer" else []


def vertex_eval_moments(base, v: str, n: int, B: int, es: int, edges: list[list[float]]) -> list[list[float]]:
    """The moments of computing vertex v in a no-grad forward (each a list of tensors alive then,
    v's output included; the outputs made before it are the caller's): each in-edge's (`edges`,
    in order: its worst moment, after the first also the running sum; adding the message makes a
    new sum), then the vertex map's. The last message stays referenced through the map
    (`LiftedNetwork._vertex`'s loop variable), and each step makes a new tensor while the
    previous one exists: the bias added, a layer norm's centred, normalised and scaled copies
    (three on top of its input), the activation's output. Attention: its q, k, v sums, their
    biased and per-head copies and its output (rearranged once the per-head copies are freed)."""
    vx = base.vertices[v]
    a = am.vertex_values(base, v, n, B) * es
    out = []
    for i, msg in enumerate(edges):  # after the first: the running sum, then the new sum with this message
        out.append(msg if i == 0 else [a] + max(msg, [a, a], key=sum))
    if vx.kind == "attention":
        kv = a * numel(base.key_positions(v)) / numel(base.positions(v))
        out.append([a, kv, kv] * (3 if vx.bias else 2) + [a])  # its output's copy comes once the heads are freed
        return out
    current_is_message = len(edges) == 1  # else the running sum is a tensor of its own
    for new, on in ((1, vx.bias), (3, vx.norm == "layer"), (1, vx.activation != "identity")):
        if on:
            out.append([a] * (1 + (not current_is_message) + new))
            current_is_message = False
    return out
