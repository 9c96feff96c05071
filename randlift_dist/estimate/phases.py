"""The phases of a run: the tensors alive on top of the persistent terms (`terms.py`), and what
the allocator makes of them. Pure arithmetic on lists of tensor sizes (bytes), one function per
phase; `rank.py` feeds them the shapes of one rank.

- backward: saved for it are, per non-input vertex and edge, what `activation_memory.py` names
  (vertex outputs, norms, attention, mapped rows of pool / mean / select / flatten edges, the
  inputs, the readout's copy); the halo each exchanging edge received (all-to-all: halo rows x
  its row values x B; all-gather: L x max_own rows); what the reference kernel gathers. The
  torch engine's backward is walked in reverse vertex order (`backward_torch`): a vertex's saved
  tensors go when its gradient reaches it, an edge's mapped rows and halo once the edge's
  gradient is made, and each weight gradient stays (as `.grad`: the kernel's tensor is handed
  over, no copy, except in later micro-batches, which start with every gradient made and add
  each edge's into it); the peak is the largest moment, the tensors alive then plus the
  gradients made so far. At a vertex map (norm, attention): its gradients and buffers while its
  saved tensors still exist. At each edge: three activation-sized gradients (the larger of the
  target's and the source's activation; into an attention vertex, the q, k and v gradients and
  two of the source's) and the edge's temporaries (`edge_temporaries`: a conv edge's unfolded
  chunk, its gradient and the fold, `conv_temporaries`). DeepSpeed (`backward_deepspeed`):
  everything saved plus the largest moment, with every gradient held. The loss's moment
  (`terms.logit_bytes`) and the step's batch are candidates too.
- optimizer: torch engine: the gradient norm's float64 buffer of one chunk (`limits.NORM_CHUNK`;
  fused Adam needs no temporaries); with D > 1 the flat all-reduce buffer (4 B / param).
  DeepSpeed: the step's fp32 gradient partition and torch's foreach sqrt of the moments (4 B each
  / param / D; none with offload).
- eval: the no-grad forwards of the test rows and of up to `train.eval_train_max` training rows
  in chunks (`limits.eval_chunk`: the training micro-batch, at most 1024 rows): every vertex's output (kept until the
  readout) and the largest moment of one vertex or edge (two partial sums; a norm's four
  activation-sized buffers; attention's sums, per-head copies and output; a mapped edge's rows,
  a conv chunk's unfolded sources and output; the received, sent and (CPU) gloo-copied halo),
  the logits. Torch engine: no gradients then (credited).
- checkpoint: int64 row keys of the largest parameter (and the edge index of the largest edge
  while its keys are derived: 3 x 8 B / edge, stored topology); rows not in key order
  (exchanging edges hold local rows first) are gathered in key order one parameter at a time:
  its fp32 value and moments, the order and the sorted keys (`checkpoint._collect`). On GPUs
  that is host memory, except one tensor's fp32 copies.
- setup (no gradients or moments yet): the edges built so far plus, for the edge being built,
  its per-block arrays and their concatenation (2 x (16 + 4 s) B / edge) or, at L > 1, the
  weight permutation and `split_edges` arrays (4 s + 48 B / edge), and the partition's draws.

Allocator (`allocator`). CPU: the training CLI fixes glibc's mmap threshold
(`limits.MMAP_THRESHOLD`, 4 MiB); tensors that big or bigger are mapped and unmapped
(`transient`: the largest phase's, less what it is credited), smaller ones come from the heap,
which keeps freed blocks and reuses them in the next phase only in part (`allocator_kept`:
midway between full reuse, the largest phase's small tensors, and none, their sum). The model is
of the CLI: a process that builds a `Trainer` itself keeps glibc's default threshold. GPU: the
caching allocator reuses freed blocks: the largest phase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..limits import MMAP_THRESHOLD, NORM_CHUNK
from ..ops.workspace import DRAW_AHEAD

# Index bytes per edge of a regenerated chunk in flight: row, col, sort key, permutation (int64),
# int32 copies, the sampler's arrays.
REGEN_IDX_BYTES = 64
PHASES = ("setup", "backward", "optimizer", "eval", "checkpoint")


def edge_temporaries(kernel: str, es: int, B: int, m: float, d_v: int, d_u: int, rows: int, *,
                     copy_grad: bool = False, split: tuple[float, float] | None = None,
                     halo: tuple[float, float] | None = None, cpu: bool = True,
                     regen: tuple[float, int, bool] | None = None, fused: bool = False,
                     input_grad: bool = True, conv: Sequence[float] = ()) -> list[float]:
    """The temporaries of one edge's backward (bytes), besides its gradient. `B` is the columns
    of the kernel's call (samples x positions, a conv chunk's), `d_u` the weight's features F:

    - `copy_grad`: the weight gradient is added to `.grad` (DeepSpeed's hooks, later micro-batches):
      one more gradient-sized tensor;
    - `split = (m_local, m_remote)`: a weight used as a local and a remote slice: the slices'
      backward gives a full-size zero-filled gradient each (one becomes `.grad`, the other is added
      to it) from the kernel's slice gradient;
    - `halo = (send_buffer_bytes, received_bytes)`: the halo's gradient buffers: the received
      rows' gradient, the send buffer's (all-gather: this rank's padded shard), and on CPU gloo's
      flat copy of the first;
    - `regen = (source_bytes, chunk_edges, scalar_path)`: the regenerated kernel's source-sized input
      gradient, the chunks in flight (the one computed and `DRAW_AHEAD` drawn ahead), and the
      scalar path's sampled values (8 B / edge) or three gathered `[chunk, d, B]` buffers;
    - the kernel's own: `csr` unfused, the transposed weight values (with the `input_grad`), the
      sampled product's zero pattern and its index arrays (the sampled values are the gradient);
      `reference`, the gradients of the messages and (with the `input_grad`) of the gathered
      sources; `blocked` and the fused `csr` backward use the workspaces
      (`terms.workspace_bytes`); `triton` nothing;
    - `conv`: a conv edge's unfold and fold buffers (`conv_temporaries`)."""
    s = d_v * d_u
    out = [m * s * es] if copy_grad else []
    if split is not None:
        out += [m * s * es, max(split) * s * es]
    if halo is not None:
        sent, received = halo
        out += [sent] + [received] * (2 if cpu else 1)
    if regen is not None:
        src_bytes, c, scalar = regen
        out += [src_bytes] + [c * REGEN_IDX_BYTES] * (1 + DRAW_AHEAD)
        out += [8.0 * c] if scalar else [c * max(d_u, d_v) * B * es] * 3
    elif kernel == "csr" and not fused:
        out += [m * d_u * es] * (2 if input_grad else 1) + [4.0 * m * d_u + 4.0 * (rows + 1)]
    elif kernel == "reference":
        out += [m * d_v * B * es] + ([m * d_u * B * es] if input_grad else [])
    return [float(x) for x in out + list(conv)]


def conv_temporaries(unfolded: float, padded: float, source: float, whole_source: float, weight: float,
                     chunked: bool, padding: bool, input_grad: bool) -> list[float]:
    """The buffers of a conv edge's backward (`ops/window.py`), bytes: per chunk the unfolded
    sources (`unfolded`) and the kernel's gradient of them, then the fold of that gradient into a
    zero-padded buffer (`padded`) and, with padding, its unpadded copy (`source`); the larger of
    the two moments. Chunked, also the whole input gradient (`whole_source`) and the chunk's
    weight gradient added into the zero-filled one (`weight`). Without the input gradient, only
    the unfolded chunk."""
    if not input_grad:
        return [unfolded] + ([weight] if chunked else [])
    kernel_moment = [unfolded, unfolded]
    fold_moment = [unfolded, padded] + ([source] if padding else [])
    out = max(kernel_moment, fold_moment, key=sum)
    return out + ([whole_source, weight] if chunked else [])


def backward_deepspeed(saved: Sequence[float], moments: Mapping[object, Sequence[float]],
                       extra: Sequence[float]) -> list[float]:
    """DeepSpeed holds every gradient throughout: everything saved, the largest moment of an edge
    or vertex map (its gradients and temporaries) and `extra` (workspaces on a GPU, the batch, ...)."""
    largest = max(moments.values(), key=sum, default=[])
    return list(saved) + list(largest) + list(extra)


def backward_torch(order: Sequence[str], saved: Mapping[str, Sequence[float]],
                   in_edges: Mapping[str, Sequence[object]], edge_saved: Mapping[object, Sequence[float]],
                   moments: Mapping[object, Sequence[float]], grad_of: Mapping[object, float],
                   extra: Sequence[float], loss: Sequence[float], accumulate: bool) -> tuple[list[float], float]:
    """The torch engine's backward, vertex by vertex in reverse `order` (see the module doc):
    `(tensors alive at the peak, weight gradients made by then)`. `saved[v]`: vertex v's saved
    tensors; `edge_saved[e]`: what edge e keeps until its gradient is made (its mapped rows, its
    halo, the reference kernel's gathers); `moments[v]` (a vertex map's backward, while v's saved
    tensors still exist) and `moments[e]` (an edge's backward: the activation-sized gradients and
    the edge's temporaries); `extra`: alive throughout (the batch, the inputs, GPU workspaces);
    `loss`: the loss's tensors, alive at the first moment (the end of the forward)."""
    live_v = {v: list(x) for v, x in saved.items()}
    live_e = {e: list(x) for e, x in edge_saved.items()}
    done = sum(grad_of.values()) if accumulate else 0.0

    def alive() -> list[float]:
        return [x for a in live_v.values() for x in a] + [x for a in live_e.values() for x in a] + list(extra)

    best, best_done = alive() + list(loss), done
    for v in reversed(order):
        if v not in live_v:
            continue
        now = alive() + list(moments.get(v, ()))
        if sum(now) + done > sum(best) + best_done:
            best, best_done = now, done
        del live_v[v]
        for e in in_edges[v]:  # while its gradient is made (counted with the gradients)
            done += 0.0 if accumulate else grad_of[e]
            now = alive() + list(moments[e])
            if sum(now) + done > sum(best) + best_done:
                best, best_done = now, done
            live_e.pop(e, None)
    return best, best_done


def optimizer_deepspeed(n_params: float, shards: int, has_master: bool, offload: bool) -> list[float]:
    """The step's fp32 gradient partition and torch's foreach sqrt of the second moments."""
    if offload:
        return []
    return [4.0 * n_params / shards] * (2 if has_master else 1)


def optimizer_torch(param_sizes: Sequence[float], data_parallel: int) -> list[float]:
    """The gradient norm's float64 buffer (one chunk, or the largest parameter if smaller) and,
    with data parallelism, the flat all-reduce buffer; the fused Adam step has no temporaries."""
    n_params = sum(param_sizes)
    out = [8.0 * min(max(param_sizes, default=0.0), NORM_CHUNK)]
    return out + ([4.0 * n_params] if data_parallel > 1 else [])


def eval_phase(order: Sequence[str], outputs: Mapping[str, float], moments: Mapping[str, Sequence[Sequence[float]]],
               readout: Sequence[float], extra: Sequence[float]) -> list[float]:
    """A no-grad forward walked in vertex `order`: at vertex v, the outputs of the vertices before
    it (all kept until the readout) and the largest of v's `moments` (v's output included; an
    input's: its copies); at the end every output and the `readout`'s copies; `extra` throughout
    (the logits, GPU workspaces, a gathering kernel's buffers)."""
    best: list[float] = []
    before: list[float] = []
    for v in order:
        now = before + list(max(moments.get(v, ()), key=sum, default=[outputs[v]]))
        best = max(best, now, key=sum)
        before.append(outputs[v])
    return max(best, before + list(readout), key=sum) + list(extra)


def checkpoint_phase(params: Sequence[tuple[float, float, bool]], edge_rows: Sequence[float], moments: int,
                     regen: bool, cpu: bool) -> list[float]:
    """`params`: `(values, rows, rows in key order)` of every parameter. Row keys of the largest
    parameter, the largest edge's stored index while its keys are derived, and the key-ordered
    copies of the largest parameter whose rows are not in key order (fp32 value and moments, the
    order, the sorted keys). On a GPU only one tensor's fp32 copies are on the device."""
    if not cpu:
        return [4.0 * max((x for x, _, _ in params), default=0.0)] * (1 + moments)
    out = [8.0 * max((n for _, n, _ in params), default=0.0)]
    if not regen:
        out += [8.0 * max(edge_rows, default=0.0)] * 3
    copies: list[float] = []
    for x, n, in_order in params:
        if not in_order:
            copies = max(copies, [4.0 * x] * (1 + moments) + [8.0 * n] * 2, key=sum)
    return out + copies


def setup_phase(edges: Sequence[tuple[float, int, int, int, bool, bool]]) -> tuple[float, list[float]]:
    """`edges`: `(m, s, n_rows, n_blocks, exchanging, regenerated)` in build order. Returns the
    peak of the edges built so far plus the one being built (per-block arrays and their
    concatenation, or the permutation and split arrays of an exchanging edge), and the largest
    edge's per-block arrays (the small tensors the heap keeps)."""
    held = peak = 0.0
    per_block: list[list[float]] = []
    for m, s, n_rows, n_blocks, exch, regen in edges:
        per_edge = (0 if regen else 16) + 4 * s
        split_tmp = m * (4 * s + 48) if exch and not regen else 0.0
        peak = max(peak, held + max((1 if regen else 2) * m * per_edge, split_tmp))
        n_blocks = max(1, n_blocks)
        per_block.append([m * per_edge / n_blocks] * n_blocks)
        held += m * s * 4 + (0 if regen else 16 * m + 8 * n_rows)
    return peak, max(per_block, key=lambda x: _split(x)[0], default=[])


def _split(sizes: Sequence[float]) -> tuple[float, float]:
    """`(small, big)`: bytes of tensors below / at least the mmap threshold."""
    small = sum(x for x in sizes if x < MMAP_THRESHOLD)
    return small, sum(sizes) - small


def allocator(phases: Mapping[str, Sequence[float]], credit: Mapping[str, float],
              cpu: bool) -> tuple[float, float, str]:
    """`(allocator_kept, transient, phase)`: see the module doc. `credit[phase]`: bytes of the
    persistent terms not held in that phase (the torch engine's gradients)."""
    split = {k: _split(x) for k, x in phases.items()}
    if cpu:
        smalls = [small for small, _ in split.values()]
        kept = (max(smalls, default=0.0) + sum(smalls)) / 2
        phase = max(split, key=lambda k: split[k][1] - credit[k])
        transient = max(0.0, split[phase][1] - credit[phase])
        return kept, transient, (phase if transient else "none")
    phase = max(split, key=lambda k: sum(split[k]) - credit[k])
    return 0.0, max(0.0, sum(split[phase]) - credit[phase]), phase
