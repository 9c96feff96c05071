"""Worker code for `test_sharded.py`: what each rank of a spawned gloo world checks.

A world costs seconds to start, so one world checks many things: for every base graph, partition
strategy and exchange mode it builds the sharded network, compares it with the world-size-1
network of the same seed (built in the same process: no plan owns everything and skips every
exchange), checks the plan against a halo lower bound computed here from the gathered edge lists,
the bytes the exchanges counted against that independent count, and trains a few SGD steps.

Workers never raise on a failed comparison: every rank must reach the same collectives, so a
check only appends a record `(label, ok, detail)` under a category; the parent asserts on them.
An exception (a real error in the library) still ends the world and is reported by `run_world`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from randlift_dist import (BaseGraph, Communicator, Layout, LayoutError, PartitionError, build_plan,
                           random_sparse_lift)
from randlift_dist.rows import gather_network
from randlift_dist.model import LiftedNetwork

_TRACE = bool(os.environ.get("RANDLIFT_TEST_TRACE"))  # print every check as it is made
RTOL = 1e-5
TINY = 1e-12
STRATEGIES = ("block", "graph", "random")
MODES = ("alltoall", "allgather", "auto")
BATCH = 5
SGD_STEPS = 20
SGD_LR = {"skip": 0.005, "mixed": 3.0, "resid": 0.01, "conv": 0.01, "attn": 0.05}  # per case: decreasing, finite curves

# ---------------------------------------------------------------- base graphs and lifts
SKIP = {  # skip edges from the input and from h1 to the output, a bias, relu and tanh
    "vertices": [
        {"name": "x", "dim": 3, "role": "input"},
        {"name": "h1", "dim": 4, "activation": "tanh"},
        {"name": "h2", "dim": 2, "activation": "relu", "bias": True},
        {"name": "y", "dim": 2, "role": "output"},
    ],
    "edges": [["x", "h1"], ["h1", "h2"], ["x", "h2"], ["h2", "y"], ["h1", "y"]],
}
MIXED = {  # two inputs, scalar (d=1) vertices, two outputs of different dims, output -> output
    "vertices": [
        {"name": "a", "dim": 2, "role": "input"},
        {"name": "b", "dim": 1, "role": "input"},
        {"name": "s", "dim": 1, "activation": "tanh", "bias": True},
        {"name": "h", "dim": 3, "activation": "gelu", "bias": True},
        {"name": "o1", "dim": 1, "role": "output", "bias": True},
        {"name": "o2", "dim": 3, "role": "output", "activation": "sigmoid", "bias": True},
    ],
    "edges": [["a", "s"], ["b", "s"], ["a", "h"], ["s", "h"], ["h", "o1"], ["s", "o1"],
              ["h", "o2"], ["o1", "o2"], ["s", "o2"]],
}


CONV = {  # positions: conv between sharded fibres (raw rows exchanged, unfolded after receipt),
    # max and average pooling (mapped before the exchange), select, mean and flatten heads
    "vertices": [
        {"name": "x", "dim": 2, "role": "input", "positions": [9]},
        {"name": "c", "dim": 2, "activation": "relu", "bias": True},
        {"name": "p", "dim": 3, "activation": "tanh"},
        {"name": "q", "dim": 2, "activation": "gelu", "bias": True},
        {"name": "y", "dim": 2, "role": "output"},
    ],
    "edges": [{"src": "x", "dst": "c", "kind": "conv", "kernel": 3, "padding": 1},
              {"src": "c", "dst": "p", "kind": "pool", "pool": "max", "kernel": 2},
              {"src": "x", "dst": "p", "kind": "pool", "pool": "avg", "kernel": 3, "stride": 2},
              {"src": "c", "dst": "q", "kind": "conv", "kernel": 3, "stride": 2, "padding": 1, "dilation": 1},
              {"src": "p", "dst": "y", "kind": "flatten"}, {"src": "q", "dst": "y", "kind": "mean"},
              {"src": "c", "dst": "y", "kind": "select", "index": 3}],
}


def make_case(name: str):
    """`(base, lift, network kwargs)` of a named test case; fibre sizes not divisible by 2, 3, 4."""
    if name == "skip":
        base = BaseGraph.from_dict(SKIP)
        lift = random_sparse_lift(base, 37, 3, seed=5)
        kw = dict(readout_init="normal", readout_scale="sum", seed=11)
    elif name == "mixed":
        base = BaseGraph.from_dict(MIXED)
        sizes = {"a": 3, "b": 2, "s": 50, "h": 37, "o1": 23, "o2": 41}
        # block_size 2: many sampling blocks per fibre, and block-snapped `block` partitions
        lift = random_sparse_lift(base, sizes, {"a->s": 2, "b->s": 1.5, "a->h": 2, "s->h": 4,
                                                "h->o1": 3, "s->o1": 2.5, "h->o2": 3, "o1->o2": 2,
                                                "s->o2": 2}, seed=7, block_size=2)
        kw = dict(readout_init="normal", readout_scale="mean", seed=3, out_dim=2)
    elif name == "resid":
        base = BaseGraph.residual_mlp(2, 2, 3, 1, activation="tanh", bias=True)
        sizes = {"h1": 50, "h2": 37, "h3": 29, "y": 3}  # y: fewer vertices than ranks at P = 4
        lift = random_sparse_lift(base, sizes, 3, seed=9, law="fixed_degree", block_size=8)
        kw = dict(readout_init="normal", readout_scale="sqrt", seed=21, weight_scale=0.7)
    elif name == "conv":
        base = BaseGraph.from_dict(CONV)
        sizes = {"x": 1, "c": 23, "p": 17, "q": 19, "y": 7}
        lift = random_sparse_lift(base, sizes, 3, seed=4, block_size=4)
        kw = dict(readout_init="normal", readout_scale="sqrt", seed=8)
    elif name == "attn":  # token ids, a conv mixer, causal attention (heads sharded), layer norms, residuals
        base = BaseGraph.transformer(5, 4, 2, 2, tokens=6, causal=True, mixer_kernel=3, mlp_dim=3)
        lift = random_sparse_lift(base, 13, 2.5, seed=6, block_size=4)
        kw = dict(readout_init="normal", readout_scale="sqrt", seed=2)
    else:
        raise KeyError(name)
    return base, lift, kw


CASES = ("skip", "mixed", "resid", "conv", "attn")


def row_values(base, e) -> int:
    """Values of one member row the exchange of edge e moves per sample: d_u times the positions of
    the source after its per-member map (pooling: the target's positions; mean, select: one)."""
    P = {"pool": base.positions(e.dst), "mean": (), "select": ()}.get(e.kind, base.positions(e.src))
    return base.dim(e.src) * int(np.prod(P, dtype=np.int64))


def batch(base, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs (token inputs: ids), Gaussian targets."""
    g = torch.Generator().manual_seed(seed)
    if all(base.vertices[v].tokens is None for v in base.inputs):
        return torch.randn(n, base.in_dim, generator=g), torch.randn(n, 1, generator=g)
    cols = []
    for v in base.inputs:
        V, w = base.vertices[v].tokens, base.input_width(v)
        cols.append(torch.randn(n, w, generator=g) if V is None else torch.randint(0, V, (n, w), generator=g).float())
    return torch.cat(cols, 1), torch.randn(n, 1, generator=g)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - target).pow(2).mean()  # target broadcasts over the readout width


def sharded(base, lift, layout, strategy: str, mode: str, topology: str = "stored", **kw):
    """`(plan, net)`: the plan (collective), its communicator (collective), the network (local)."""
    plan = build_plan(lift, layout, strategy, mode, topology=topology)
    comm = Communicator.create(plan, layout)
    return plan, LiftedNetwork(base, lift, plan, comm, **kw)


# ---------------------------------------------------------------- recording checks
class Checks:
    def __init__(self, rank: int):
        self.rank = rank
        self.records: dict[str, list[tuple[str, bool, str]]] = defaultdict(list)

    def add(self, category: str, label: str, ok: bool, detail: str = "") -> None:
        if _TRACE:
            print(f"[{self.rank}] {category} {label} {ok}", file=sys.stderr, flush=True)
        self.records[category].append((f"rank {self.rank} {label}", bool(ok), detail))

    def close(self, category: str, label: str, a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
        """`||a - b|| <= rtol ||b|| + tiny` (b is the world-size-1 value)."""
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            self.add(category, label, False, f"shape {tuple(a.shape)} != {tuple(b.shape)}")
            return
        diff, ref = (a - b).norm().item(), b.norm().item()
        self.add(category, label, diff <= rtol * ref + TINY, f"||a-b|| = {diff:.3g}, ||b|| = {ref:.3g}")

    def equal(self, category: str, label: str, a, b) -> None:
        self.add(category, label, a == b, f"{a!r} != {b!r}")

    def raises(self, category: str, label: str, exc_type, fn, *needles: str) -> None:
        try:
            fn()
        except exc_type as err:
            msg = str(err)
            missing = [n for n in needles if n not in msg]
            self.add(category, label, not missing, f"message {msg!r} does not name {missing}")
        except Exception as err:  # noqa: BLE001 - recorded, the parent fails the test
            self.add(category, label, False, f"raised {type(err).__name__}: {err}")
        else:
            self.add(category, label, False, f"no {exc_type.__name__} raised")

    def result(self) -> dict[str, list[tuple[str, bool, str]]]:
        return dict(self.records)


# ---------------------------------------------------------------- independent plan checks
def check_ownership(ck: Checks, label: str, plan, lift, group) -> None:
    """Same owners on every rank; each non-input vertex owned by exactly one rank."""
    owners = {v: o.owner_array().copy() for v, o in plan.owners.items()}
    parts: list = [None] * plan.world_size
    dist.all_gather_object(parts, owners, group=group)
    for v in owners:
        ck.add("plan", f"{label} owners[{v}] identical on all ranks",
               all(np.array_equal(p[v], owners[v]) for p in parts))
        o = owners[v]
        ck.add("plan", f"{label} owners[{v}] valid", o.shape == (lift.n(v),) and o.min() >= 0
               and o.max() < plan.world_size, f"shape {o.shape}, range [{o.min()}, {o.max()}]")
        ck.add("plan", f"{label} own({v}) = owners == rank",
               np.array_equal(plan.own(v), np.flatnonzero(o == plan.rank)))


def check_plans(ck: Checks, label: str, net, plan, lift, base, group) -> dict[str, tuple[int, int]]:
    """Gather every rank's edge list; rebuild the halos and compare them with the plans.

    Returns, per exchanging base edge, the rows this rank must send in the forward and in the
    backward, counted here from the gathered edge lists and the owners (not from the plan)."""
    P, r = plan.world_size, plan.rank
    mine = {e.key: tuple(t.numpy().copy() for t in net.edge_index(e)) for e in base.edges}
    parts: list = [None] * P
    dist.all_gather_object(parts, mine, group=group)
    rows = {}
    for e in base.edges:
        # the union of the shards' edges is the lift's (global, world-size-1) edge list
        src = np.concatenate([p[e.key][0] for p in parts])
        dst = np.concatenate([p[e.key][1] for p in parts])
        order = np.lexsort((src, dst))
        g_src, g_dst = lift.edges(e)
        ck.add("plan", f"{label} {e}: union of shard edges = lift edges",
               np.array_equal(src[order], g_src) and np.array_equal(dst[order], g_dst))
        # owner computes: every rank holds exactly the edges ending at its vertices
        owner_v = plan.owners[e.dst].owner_array()
        ck.add("plan", f"{label} {e}: edges end at own vertices",
               all((owner_v[p[e.key][1]] == q).all() for q, p in enumerate(parts)))
        ex = plan.edges[e.key].exchange
        if base.vertices[e.src].role == "input":
            ck.add("plan", f"{label} {e}: input edge has no exchange", ex is None)
            continue
        if ex is None:
            ck.add("plan", f"{label} {e}: exchange exists", False, "no exchange")
            continue
        owner_u = plan.owners[e.src].owner_array()
        halos = []  # distinct remote sources of rank q's edges
        for q, p in enumerate(parts):
            s_ = p[e.key][0]
            halos.append(np.unique(s_[owner_u[s_] != q]))
        recv = halos[r].size
        send = sum(int((owner_u[h] == r).sum()) for h in halos)
        ck.equal("plan", f"{label} {e}: halo rows received (lower bound)", ex.n_halo, recv)
        ck.equal("plan", f"{label} {e}: alltoall rows sent = lower bound", ex.rows_sent("alltoall"), send)
        ck.equal("plan", f"{label} {e}: halo rows by peer", list(ex.recv_splits),
                 [int((owner_u[halos[r]] == q).sum()) for q in range(P)])
        max_own = int(np.bincount(owner_u, minlength=P).max())
        ck.equal("plan", f"{label} {e}: allgather rows sent", ex.rows_sent("allgather"), max_own * (P - 1))
        modes: list = [None] * P
        dist.all_gather_object(modes, ex.mode, group=group)
        ck.add("plan", f"{label} {e}: same mode on all ranks", len(set(modes)) == 1, str(modes))
        if plan.exchange != "auto":
            ck.equal("plan", f"{label} {e}: requested mode", ex.mode, plan.exchange)
        else:  # auto: all-gather iff the halo rows reach the threshold of the all-gather volume
            total = sum(h.size for h in halos)
            want = "allgather" if total >= plan.allgather_threshold * P * (P - 1) * max_own else "alltoall"
            ck.equal("plan", f"{label} {e}: auto mode", ex.mode, want)
        # independent counts: all-to-all sends the rows peers need and gets its halo's gradients
        # back; all-gather sends its padded shard to P - 1 peers both ways (reduce-scatter back)
        d = row_values(base, e)
        rows[str(e)] = (send * d, recv * d) if ex.mode == "alltoall" else (max_own * (P - 1) * d,) * 2
    return rows


# ---------------------------------------------------------------- the checks of one world
def equivalence(ck: Checks, layout, case: str, modes=MODES, strategies=STRATEGIES, topology: str = "stored") -> None:
    """Sharded vs world-size-1: init, forward, input grads, parameter grads, bytes, plans."""
    base, lift, kw = make_case(case)
    group = layout.lift_group
    x, t = batch(base, BATCH, seed=100 + CASES.index(case))
    ref = LiftedNetwork(base, lift, **kw)
    ref_init = {k: p.detach().clone() for k, p in ref.named_parameters()}
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    loss_fn(out_ref, t).backward()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ck.add("param_grad", f"{case}: reference gradients are not trivial",
           all(g.norm() > 0 for k, g in ref_grads.items() if k.startswith("edges")))
    for strategy in strategies:
        for mode in modes:
            label = f"{case}/{strategy}/{mode}" + ("" if topology == "stored" else f"/{topology}")
            plan, net = sharded(base, lift, layout, strategy, mode, topology, **kw)
            ck.add("init", f"{label}: parameters flagged model_parallel",
                   all(getattr(p, "model_parallel", False) for p in net.parameters()))
            init = gather_network(net)
            ck.equal("init", f"{label}: parameter names", sorted(init), sorted(ref_init))
            for k in ref_init:
                ck.add("init", f"{label}: initial {k} equal exactly",
                       k in init and init[k].shape == ref_init[k].shape and torch.equal(init[k], ref_init[k]))
            check_ownership(ck, label, plan, lift, group)
            values = check_plans(ck, label, net, plan, lift, base, group)

            stats = net.comm.stats
            stats.reset()
            xs = x.clone().requires_grad_()
            out = net(xs)
            fwd = stats.bytes_forward
            loss_fn(out, t).backward()
            ck.close("forward", f"{label}: output", out, out_ref)
            if xr.grad is None:  # token ids take no gradient
                ck.add("input_grad", f"{label}: no x.grad for token ids", xs.grad is None)
            else:
                ck.close("input_grad", f"{label}: x.grad", xs.grad, xr.grad)
            grads = gather_network(net, grads=True)
            for k in ref_grads:
                ck.close("param_grad", f"{label}: grad {k}", grads[k], ref_grads[k])
            want_fwd = sum(f for f, _ in values.values()) * 4 * BATCH  # float32 values
            want_bwd = sum(b for _, b in values.values()) * 4 * BATCH
            ck.equal("bytes", f"{label}: forward bytes = independent count", fwd, want_fwd)
            ck.equal("bytes", f"{label}: backward bytes = independent count", stats.bytes_backward, want_bwd)
            ck.equal("bytes", f"{label}: forward bytes unchanged by backward", stats.bytes_forward, want_fwd)


def sgd_curve(net, case: str, seed: int, data_rank: int = 0, data_parallel: int = 1,
              data_group=None) -> list[float]:
    """Loss curve of plain SGD over two alternating global batches of `BATCH * data_parallel`
    samples; replica `data_rank` takes its slice of each, gradients are averaged over replicas."""
    opt = torch.optim.SGD(net.parameters(), lr=SGD_LR[case])
    curve = []
    for step in range(SGD_STEPS):
        x, t = batch(net.base, BATCH * data_parallel, seed=seed * 1000 + step % 2)
        sl = slice(data_rank * BATCH, (data_rank + 1) * BATCH)
        opt.zero_grad()
        loss = loss_fn(net(x[sl]), t[sl])
        loss.backward()
        loss = loss.detach().clone()
        if data_parallel > 1:
            for p in net.parameters():
                dist.all_reduce(p.grad, group=data_group)
                p.grad /= data_parallel
            dist.all_reduce(loss, group=data_group)
            loss /= data_parallel
        opt.step()
        curve.append(loss.item())
    return curve


def training(ck: Checks, layout, case: str, modes=("alltoall", "allgather"), strategies=STRATEGIES,
             topology: str = "stored") -> None:
    """SGD_STEPS steps of SGD: same loss curve (and final weights) as world size 1."""
    base, lift, kw = make_case(case)
    ref = LiftedNetwork(base, lift, **kw)
    ref_curve = sgd_curve(ref, case, seed=1)
    ref_final = {k: p.detach().clone() for k, p in ref.named_parameters()}
    ck.add("sgd", f"{case}: reference loss finite and decreasing",
           np.isfinite(ref_curve).all() and ref_curve[-1] < 0.5 * ref_curve[0], str(ref_curve))
    for strategy in strategies:
        for mode in modes:
            label = f"{case}/{strategy}/{mode}" + ("" if topology == "stored" else f"/{topology}")
            _, net = sharded(base, lift, layout, strategy, mode, topology, **kw)
            curve = sgd_curve(net, case, seed=1)
            ck.close("sgd", f"{label}: loss curve", torch.tensor(curve), torch.tensor(ref_curve))
            final = gather_network(net)
            for k in ref_final:
                ck.close("sgd", f"{label}: final {k}", final[k], ref_final[k])


def data_parallel(ck: Checks, case: str = "skip") -> None:
    """world 4 = lift_parallel 2 x data_parallel 2, a different batch on each replica."""
    layout = Layout.from_initialized(2)
    L, D, rank = 2, 2, layout.rank
    ck.equal("dp", "degrees", (layout.lift_parallel, layout.data_parallel), (L, D))
    ck.equal("dp", "lift rank / data rank", (layout.lift_rank, layout.data_rank), (rank % L, rank // L))
    ck.equal("dp", "lift group ranks", dist.get_process_group_ranks(layout.lift_group),
             [layout.data_rank * L + i for i in range(L)])
    ck.equal("dp", "data group ranks", dist.get_process_group_ranks(layout.data_group),
             [layout.lift_rank + L * j for j in range(D)])
    base, lift, kw = make_case(case)
    x, t = batch(base, BATCH * D, seed=123)
    ref = LiftedNetwork(base, lift, **kw)
    out_ref = ref(x)
    loss_fn(out_ref, t).backward()  # the mean over the concatenated batch
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    sl = slice(layout.data_rank * BATCH, (layout.data_rank + 1) * BATCH)
    for strategy in STRATEGIES:
        for mode in ("alltoall", "allgather"):
            label = f"{case}/{strategy}/{mode}"
            plan, net = sharded(base, lift, layout, strategy, mode, **kw)
            ck.equal("dp", f"{label}: shard coordinates", (plan.rank, plan.world_size), (layout.lift_rank, L))
            # replicas hold identical shards: compare this rank's rows with its data-parallel peers
            mine = [p.detach().clone() for p in net.parameters()]
            peers: list = [None] * D
            dist.all_gather_object(peers, mine, group=layout.data_group)
            ck.add("dp", f"{label}: replicas hold identical shards",
                   all(all(torch.equal(a, b) for a, b in zip(mine, p)) for p in peers))
            out = net(x[sl])
            ck.close("dp", f"{label}: output of this replica's batch", out, out_ref[sl])
            loss_fn(out, t[sl]).backward()
            for p in net.parameters():
                dist.all_reduce(p.grad, group=layout.data_group)
                p.grad /= D
            grads = gather_network(net, grads=True)
            for k in ref_grads:
                ck.close("dp", f"{label}: averaged grad {k}", grads[k], ref_grads[k])
    # training: SGD with averaged gradients = SGD on the concatenated batch
    ref = LiftedNetwork(base, lift, **kw)
    ref_curve = _sgd_concat(ref, case, D, seed=2)
    for strategy in ("block", "graph"):
        _, net = sharded(base, lift, layout, strategy, "alltoall", **kw)
        curve = sgd_curve(net, case, seed=2, data_rank=layout.data_rank, data_parallel=D,
                          data_group=layout.data_group)
        ck.close("dp", f"{case}/{strategy}: data-parallel loss curve", torch.tensor(curve), torch.tensor(ref_curve))


def _sgd_concat(ref, case: str, D: int, seed: int) -> list[float]:
    """World-size-1 SGD on the concatenated global batches of D replicas."""
    opt = torch.optim.SGD(ref.parameters(), lr=SGD_LR[case])
    curve = []
    for step in range(SGD_STEPS):
        x, t = batch(ref.base, BATCH * D, seed=seed * 1000 + step % 2)
        opt.zero_grad()
        loss = loss_fn(ref(x), t)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def bad_layouts(ck: Checks, world_size: int, bad: list[int]) -> None:
    """Layouts that do not fit the world, and unknown strategy / exchange names, fail clearly."""
    for L in bad:
        ck.raises("layout", f"from_initialized({L}) in a world of {world_size}", LayoutError,
                  lambda: Layout.from_initialized(L), str(L), str(world_size))
        ck.raises("layout", f"create({L}) in a world of {world_size}", LayoutError,
                  lambda: Layout.create(lift_parallel=L), str(L), str(world_size))
    ck.raises("layout", "lift_parallel=0", LayoutError, lambda: Layout.from_initialized(0), "0")
    layout = Layout.from_initialized(world_size)
    base, lift, _ = make_case("skip")
    ck.raises("layout", "unknown strategy", PartitionError,
              lambda: build_plan(lift, layout, "metis"), "metis", "block", "graph", "random")
    ck.raises("layout", "unknown exchange mode", PartitionError,
              lambda: build_plan(lift, layout, "block", "ring"), "ring", "alltoall", "allgather")
    # the world still works after the refused requests
    _, net = sharded(base, lift, layout, "block", "auto", readout_init="normal")
    x, _ = batch(base, 3, seed=0)
    ck.close("layout", "network after refused layouts", net(x), LiftedNetwork(base, lift, readout_init="normal")(x))


_INHERITED = object()
# methods of a process group that only describe it (everything else it has communicates)
_GROUP_QUERIES = {"BackendType", "name", "rank", "size", "get_group_store", "boxed", "unbox", "set_timeout",
                  "abort", "shutdown"}


def collective_targets() -> list[tuple[object, str]]:
    """`(owner, name)` of everything through which a collective can be issued: every public function
    of torch.distributed that takes a group (its queries `get_*` / `is_*` excepted) or makes one,
    `all_gather_single` / `reduce_scatter_single` (torch >= 2.13), every communicating method of
    `ProcessGroup`, and every name a module of this package bound at import to one of those
    functions (`comm._all_gather_single`, `comm._reduce_scatter_single`, `plan._all_gather_single`)."""
    import inspect

    names = set()
    with warnings.catch_warnings():  # deprecated aliases (reduce_op) warn when read
        warnings.simplefilter("ignore")
        public = {n: getattr(dist, n) for n in dir(dist) if not n.startswith("_")}
        public = {n: f for n, f in public.items() if inspect.isfunction(f)}
    for n, f in public.items():
        if n.startswith(("get_", "is_")):
            continue
        params = inspect.signature(f).parameters
        if "group" in params or "pg" in params:
            names.add(n)
    names |= {"all_gather_single", "reduce_scatter_single", "new_group", "new_subgroups", "new_subgroups_by_enumeration",
              "batch_isend_irecv", "split_group", "init_process_group"} & set(dir(dist))
    targets: list[tuple[object, str]] = [(dist, n) for n in sorted(names)]
    targets += [(dist.ProcessGroup, n) for n in dir(dist.ProcessGroup)
                if not n.startswith("_") and n not in _GROUP_QUERIES and callable(getattr(dist.ProcessGroup, n))]
    originals = {id(getattr(dist, n)) for n in names}
    for mod_name, mod in sorted(sys.modules.items()):
        if mod_name.startswith("randlift_dist") and mod is not None:
            targets += [(mod, k) for k, v in vars(mod).items() if id(v) in originals and mod is not dist]
    return targets


def construction_is_local(ck: Checks, layout) -> None:
    """Building a network from a precomputed plan and communicator issues no collective: every
    target of `collective_targets` is replaced by one that fails while the network is built."""
    from randlift_dist import comm as comm_mod
    from randlift_dist import plan as plan_mod

    base, lift, kw = make_case("skip")
    plan = build_plan(lift, layout, "block", "alltoall")
    comm = Communicator.create(plan, layout)
    targets = collective_targets()
    bound = {(getattr(o, "__name__", ""), n) for o, n in targets}
    ck.add("local", "the import-time names of comm and plan are patched",
           {("randlift_dist.comm", "_all_gather_single"), ("randlift_dist.comm", "_reduce_scatter_single"),
            ("randlift_dist.plan", "_all_gather_single")} <= bound and len(targets) > 40, str(sorted(bound)))
    # a class's own attribute as stored (a pybind method read through the class no longer binds)
    saved = [(o, n, vars(o).get(n, _INHERITED) if isinstance(o, type) else getattr(o, n)) for o, n in targets]
    called: list[str] = []

    def failing(name):
        def f(*args, **kwargs):
            called.append(name)
            raise RuntimeError(f"collective {name} during network construction")
        return f

    try:
        for o, n, _ in saved:
            setattr(o, n, failing(f"{getattr(o, '__name__', o)}.{n}"))
        probes = []  # the patch itself works: each of these raises now
        for probe in (lambda: plan_mod._all_gather_single(None, None), lambda: comm_mod._reduce_scatter_single(None, None),
                      lambda: dist.all_reduce(torch.zeros(1)), lambda: layout.lift_group.allreduce([torch.zeros(1)])):
            try:
                probe()
                probes.append(False)
            except RuntimeError:
                probes.append(True)
        called.clear()
        net = LiftedNetwork(base, lift, plan, comm, **kw)
    except RuntimeError as err:
        net = None
        called.append(str(err))
    finally:
        for o, n, f in saved:
            if f is _INHERITED:
                delattr(o, n)
            else:
                setattr(o, n, f)
    ck.add("local", "every patched collective raised when called", all(probes), str(probes))
    ck.add("local", "LiftedNetwork(base, lift, plan, comm) issues no collective", net is not None and not called,
           str(called))
    if net is not None:  # and the network it built is the right one
        x, _ = batch(base, 3, seed=7)
        ck.close("local", "network built without collectives computes the lift", net(x),
                 LiftedNetwork(base, lift, **kw)(x))


# ---------------------------------------------------------------- entry points (run_world targets)
def world_main(rank: int, world_size: int, sgd_case: str, bad: list[int]):
    """Everything one world checks at lift_parallel = world_size (data_parallel 1)."""
    ck = Checks(rank)
    layout = Layout.from_initialized(world_size)
    ck.equal("layout", "coordinates (lift rank, data rank, data_parallel)",
             (layout.lift_rank, layout.data_rank, layout.data_parallel), (rank, 0, 1))
    construction_is_local(ck, layout)
    for case in CASES:
        equivalence(ck, layout, case)
    training(ck, layout, sgd_case)
    training(ck, layout, "conv", ("alltoall",), ("block", "random"))
    # regenerated topology (no stored edges): the same invariants, contiguous and per-vertex owners
    for case in CASES:
        equivalence(ck, layout, case, ("alltoall", "allgather"), ("block", "random"), "regenerate")
    training(ck, layout, sgd_case, ("alltoall",), ("block",), "regenerate")
    if bad:
        bad_layouts(ck, world_size, bad)
    return ck.result()


def data_parallel_main(rank: int, world_size: int):
    """world 4 = lift_parallel 2 x data_parallel 2."""
    ck = Checks(rank)
    data_parallel(ck)
    data_parallel(ck, "conv")
    return ck.result()
