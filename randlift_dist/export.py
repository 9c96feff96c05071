"""Layout-independent views of a (possibly sharded) lifted network.

Every tensor of a `LiftedNetwork` is a set of rows with global keys: edge rows are keyed by the
lifted edge `(src, dst)`, bias and readout rows by the vertex index in its fibre. The canonical
global order is the world-size-1 order: edges sorted by `(dst, src)`, vertices by index. These
helpers move per-rank rows to that order, so tests can compare a shard with one process; checkpoints
store the same keys (`checkpoint.py`) and so can be resharded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def row_keys(net) -> dict[str, np.ndarray]:
    """For every parameter name, the int64 global key of each of its rows on this rank."""
    keys = {}
    for i, e in enumerate(net.base.edges):
        src, dst = net.edge_index(e.key)
        keys[f"edges.{i}.weight"] = dst.numpy() * net.lift.n(e.src) + src.numpy()
    for name in net.biases:
        keys[f"biases.{name}"] = net.vertices(net._vname(name)).numpy()
    for name in net.readouts:
        keys[f"readouts.{name}"] = net.vertices(net._vname(name)).numpy()
    return keys


def _all_gather_objects(obj: Any, group) -> list[Any]:
    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_rows(net, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Collective over the lift-parallel group: `{name: (global keys sorted, rows in that order)}`.

    `tensors` maps parameter names to per-rank tensors with the parameter's rows (the values, the
    gradients or optimizer moments). Every rank of the group gets the whole result.
    """
    keys = row_keys(net)
    mine = {k: (keys[k], t.detach().cpu()) for k, t in tensors.items()}
    parts = _all_gather_objects(mine, net.shard.group)
    out = {}
    for k in tensors:
        ks = np.concatenate([p[k][0] for p in parts])
        ts = torch.cat([p[k][1] for p in parts])
        order = np.argsort(ks, kind="stable")
        out[k] = (ks[order], ts[torch.from_numpy(order)])
    return out


def gather_network(net, grads: bool = False) -> dict[str, torch.Tensor]:
    """The whole network's parameters (or gradients) in the canonical order, on every rank."""
    named = dict(net.named_parameters())
    tensors = {k: (p.grad if grads else p) for k, p in named.items()}
    missing = [k for k, t in tensors.items() if t is None]
    if missing:
        raise ValueError(f"no gradient yet for {missing}: run a backward pass first")
    return {k: v for k, (_, v) in gather_rows(net, tensors).items()}
