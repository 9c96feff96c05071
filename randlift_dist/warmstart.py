"""Warm start: lift a trained small network into a larger lift of the same base, same function at step 0.

The small network G' (the base network itself, or any lift of it with fibres `n'_v`, saved as a
checkpoint of this project) and the large one G (fibres `n_v >= n'_v`) are lifts of one base
network. Map each member `j` of fibre v in G to `phi(j) = j mod n'_v` in G' (world-size
invariant: a function of the index only). Pull the weights back and normalise by the in-degree:

    W_ij = W'_{phi(i) phi(j)} / c_j(phi(i))   if phi(i) -> phi(j) is an edge of G' (else 0),

with `c_j(i')` the number of in-edges of j (over the same base edge) whose source maps to i'.
Biases, attention biases and layer-norm gains and shifts are copied (`b_j = b'_{phi(j)}`); the
readout is `A_t = (c'/c) A'_{phi(t)} / |phi^-1(phi(t))|` (c, c' the readout scales). Then, by
induction along the base graph, `y_j = y'_{phi(j)}` for every vertex and the outputs are equal,
provided that every target j has, for every in-edge `i' -> phi(j)` of G', at least one in-edge
from `phi^-1(i')`: exact then (always for G' the base network and a lift in which every target has
an in-edge over every base edge: `fixed_degree`, `full`, or bernoulli where no in-degree is 0).
Where a target misses some pulled-back edge, its pre-activation misses that message: the warm
start is not exact there, and `warm_start` counts such targets per base edge (over all ranks).

`model.init_noise = a` adds `a` times the network's own fresh initial weights to the edge
weights (std `a / sqrt(fan-in)`), so that the members mapped to one member of G' (identical
copies) drift apart in training; the copied biases, norms and readout get no noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, find_intact, read_meta
from .config import ConfigError
from .graph import BaseGraph, GraphError
from .lift import LiftError, fully_connected_lift, random_sparse_lift
from .model import LiftedNetwork
from .rows import RowKeys, RowsError, read_rows, row_keys


class WarmStartError(ConfigError):
    """`model.init_from` cannot be used; the message names the path and the fix (exit 2)."""


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory (holding meta.json), or the newest intact checkpoint of a run directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found, problems = find_intact(root, verify=False)
    if found is None:
        why = f" ({problems[0]})" if problems else ""
        raise WarmStartError(f"model.init_from={str(path)!r}: no checkpoint there{why}; give a checkpoint directory "
                             "(runs/<name>/checkpoints/step_N) or a run directory that holds one")
    return found


def load_small(path: str | Path, base: BaseGraph, out_dim: int) -> tuple[LiftedNetwork, dict, Path]:
    """The saved network as a one-process `LiftedNetwork` with its trained weights, its meta, its path."""
    d = checkpoint_dir(path)
    try:
        meta = read_meta(d)
        saved = meta["lift"]
        small_base = BaseGraph.from_dict(saved["base"])
        if small_base.to_dict() != base.to_dict():
            raise WarmStartError(f"model.init_from={str(d)!r} holds a lift of another base network: warm starts "
                                 "lift a network of the same model.base")
        if saved["law"] == "full":
            lift = fully_connected_lift(small_base, saved["sizes"], saved["block_size"])
        else:
            lift = random_sparse_lift(small_base, saved["sizes"], saved["degrees"], saved["seed"], saved["law"],
                                      saved["block_size"])
        if lift.fingerprint() != meta["lift_fingerprint"]:
            raise WarmStartError(f"model.init_from={str(d)!r}: its lift does not rebuild to the saved fingerprint "
                                 "(written by another version?)")
        m = meta["config"]["model"]
        net = LiftedNetwork(small_base, lift, out_dim=m.get("out_dim"), readout_scale=m["readout_scale"])
        if net.out_dim != out_dim:
            raise WarmStartError(f"model.init_from={str(d)!r} has readout width {net.out_dim}, this model {out_dim}: "
                                 "use the same model.out_dim")
        state = read_rows(d, meta["shards"], dict(row_keys(net).items()))
    except (CheckpointError, GraphError, LiftError, RowsError, KeyError) as err:
        raise WarmStartError(f"model.init_from={str(d)!r}: cannot read the saved network ({err})") from None
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(state[name]["value"])
    return net, meta, d


def _pull_edge(keys: np.ndarray, n_u: int, small_keys: np.ndarray, small_w: torch.Tensor, m_u: int,
               m_v: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """For this rank's edges (keys `dst * n_u + src`, parameter order) and G' (sorted keys `dst' *
    m_u + src'`, weights in that order): the pulled-back weights, each edge's pair `(dst,
    phi(src))` as `dst * m_u + phi(src)`, and whether its image is an edge of G'."""
    src, dst = keys % n_u, keys // n_u
    pair = dst * m_u + src % m_u  # edges sharing a pair share one G' edge: each gets 1 / count of it
    want = (dst % m_v) * m_u + src % m_u  # the key of each edge's image in G'
    if small_keys.size == 0:
        return small_w.new_zeros((keys.size,) + tuple(small_w.shape[1:])), pair, np.zeros(keys.size, bool)
    pos = np.minimum(np.searchsorted(small_keys, want), small_keys.size - 1)
    hit = small_keys[pos] == want
    _, inv, counts = np.unique(pair, return_inverse=True, return_counts=True)
    scale = torch.from_numpy(np.where(hit, 1.0 / counts[inv.reshape(-1)], 0.0)).to(small_w.dtype)
    return small_w[torch.from_numpy(pos)] * scale.view(-1, *([1] * (small_w.dim() - 1))), pair, hit


def _inexact_targets(pair: np.ndarray, hit: np.ndarray, own: np.ndarray, m_u: int, m_v: int,
                     small_in: np.ndarray) -> int:
    """Own targets j with fewer distinct covered source images (pairs whose image is a G' edge)
    than the in-degree of phi(j) in G': a pulled-back message is missing there."""
    covered = np.unique(pair[hit]) // m_u  # one entry per (target, covered source image)
    per_target = np.bincount(np.searchsorted(own, covered), minlength=own.size)
    return int((per_target < small_in[own % m_v]).sum())


@torch.no_grad()
def warm_start(net: LiftedNetwork, init_from: str | Path, init_noise: float = 0.0) -> dict[str, Any]:
    """Overwrite `net`'s parameters (this rank's rows) with the pulled-back small network (see the
    module doc). Collective over the lift-parallel group when `net` is sharded (the report's
    counts are summed). Returns `{"path", "sizes", "inexact": {edge: targets}, "targets": {edge: n}}`."""
    small, meta, path = load_small(init_from, net.base, net.out_dim)
    base, lift, slift = net.base, net.lift, small.lift
    too_big = [v for v in base.vertices if slift.n(v) > lift.n(v)]
    if too_big:
        raise WarmStartError(f"model.init_from={str(path)!r} has larger fibres than this lift at {too_big} "
                             f"({[slift.n(v) for v in too_big]} > {[lift.n(v) for v in too_big]}): warm starts go "
                             "from a smaller lift to a larger one")
    keys, skeys = row_keys(net), RowKeys(small)
    report: dict[str, Any] = {"path": str(path), "sizes": dict(slift.sizes), "inexact": {}, "targets": {}}
    counts = []
    for i, e in enumerate(base.edges):
        name = f"edges.{i}.weight"
        n_u, m_u, m_v = lift.n(e.src), slift.n(e.src), slift.n(e.dst)
        sk = skeys[name]
        order = np.argsort(sk, kind="stable")
        sw = small.edge_weight(e.key).detach()[torch.from_numpy(order)]
        w, pair, hit = _pull_edge(keys[name], n_u, sk[order], sw, m_u, m_v)
        p = net.edge_weight(e.key)
        p.copy_(w.to(device=p.device, dtype=p.dtype) + init_noise * p)  # p holds the fresh initial weights
        own = np.asarray(net.own_rows(e.dst), np.int64)
        counts += [_inexact_targets(pair, hit, own, m_u, m_v, np.bincount(sk // m_u, minlength=m_v)), own.size]
    for group, src in (("biases", small.biases), ("norm_gains", small.norm_gains), ("norm_shifts", small.norm_shifts)):
        for key, p in getattr(net, group).items():
            v = net.vertex_of(key)
            p.copy_(src[key].detach()[torch.from_numpy(np.asarray(net.own_rows(v)) % slift.n(v))].to(p.dtype))
    for key, p in net.readouts.items():
        t = net.vertex_of(key)
        rows = np.asarray(net.own_rows(t)) % slift.n(t)
        copies = -(-(lift.n(t) - rows) // slift.n(t))  # |phi^-1(phi(t))| = ceil((n_t - t') / n'_t)
        A = small.readouts[key].detach()[torch.from_numpy(rows)] * (small.c / net.c)
        p.copy_((A / torch.from_numpy(copies).to(A.dtype).view(-1, 1, 1)).to(p.dtype))
    t = torch.tensor(counts, dtype=torch.float64)
    if net.comm.lift_group is not None and dist.is_initialized() and dist.get_world_size(net.comm.lift_group) > 1:
        dist.all_reduce(t, group=net.comm.lift_group)
    for i, e in enumerate(base.edges):
        report["inexact"][str(e)], report["targets"][str(e)] = int(t[2 * i]), int(t[2 * i + 1])
    return report
