"""Multi-process tests of the sharded lifted network: real gloo worlds on CPU.

The core invariant: a network sharded over a lift-parallel group
of 2, 3 or 4 ranks has the same initial weights (exactly), outputs, input gradients, parameter
gradients and SGD loss curve (to 1e-5 relative, float32) as the world-size-1 network of the same
seed, for every partition strategy (block, graph, random) and exchange mode (alltoall, allgather,
auto); the bytes it counts are the plan's, and the all-to-all plan sends exactly the halo lower
bound. Fibre sizes (37, 50, 23, 41, 29, 3) are not multiples of the world sizes; the base graphs
have skip edges, several outputs, scalar (d=1) vertices and biases (see `sharded_workers.py`).

A world costs seconds to start, so each world (module-scoped fixture) runs every check once and
the tests below only read its records, one category per test. The worker code is in
`sharded_workers.py` (importable by the spawned processes).
"""

from __future__ import annotations

import pytest

import sharded_workers as sw
from distributed import run_world
from randlift_dist import BaseGraph, Layout, LayoutError, PartitionError, build_plan, random_sparse_lift
from randlift_dist.layout import check_degrees

WORLD_TIMEOUT = 180  # seconds for one world; a world of 4 takes about 30 s on 2 cores
TEST_TIMEOUT = 240
# world size -> (case trained with SGD, lift_parallel values that do not divide the world size)
WORLDS = {2: ("skip", []), 3: ("mixed", [2, 4]), 4: ("resid", [3])}


def merge(results: list[dict]) -> dict[str, list[tuple[str, bool, str]]]:
    out: dict[str, list] = {}
    for per_rank in results:
        for cat, recs in per_rank.items():
            out.setdefault(cat, []).extend(recs)
    return out


def assert_records(records: dict, category: str, min_count: int) -> None:
    recs = records.get(category, [])
    assert len(recs) >= min_count, f"only {len(recs)} '{category}' checks ran (expected >= {min_count})"
    failed = [r for r in recs if not r[1]]
    if failed:
        lines = [f"  {label}: {detail}" for label, _, detail in failed[:25]]
        more = f"\n  ... and {len(failed) - 25} more" if len(failed) > 25 else ""
        pytest.fail(f"{len(failed)} of {len(recs)} '{category}' checks failed:\n" + "\n".join(lines) + more,
                    pytrace=False)


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda p: f"lift_parallel={p}")
def world(request):
    """`(world size, merged check records)` of one spawned world (started once per module)."""
    P = request.param
    sgd_case, bad = WORLDS[P]
    return P, merge(run_world(sw.world_main, P, sgd_case, bad, timeout=WORLD_TIMEOUT))


def n_configs(P: int) -> int:
    """(case, strategy, mode) configurations times ranks."""
    return len(sw.CASES) * len(sw.STRATEGIES) * len(sw.MODES) * P


# ---------------------------------------------------------------- the sharded network vs world size 1
@pytest.mark.timeout(TEST_TIMEOUT)
def test_initial_weights_equal_world_size_1_exactly(world):
    P, records = world
    assert_records(records, "init", n_configs(P) * 5)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_ownership_and_plans_match_independent_halo_count(world):
    """Same owners on every rank; shards' edges partition the lift's; alltoall rows = halo bound."""
    P, records = world
    assert_records(records, "plan", n_configs(P) * 10)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_forward_equal_world_size_1(world):
    P, records = world
    assert_records(records, "forward", n_configs(P))


@pytest.mark.timeout(TEST_TIMEOUT)
def test_input_gradients_equal_world_size_1(world):
    """`x.grad` on every rank equals the world-size-1 input gradient (the input is replicated)."""
    P, records = world
    assert_records(records, "input_grad", n_configs(P))


@pytest.mark.timeout(TEST_TIMEOUT)
def test_parameter_gradients_equal_world_size_1(world):
    P, records = world
    assert_records(records, "param_grad", n_configs(P) * 5)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_bytes_counted_equal_independent_halo_count(world):
    """Bytes handed to the collectives in a real step = rows counted from the gathered edge lists and
    owners (all-to-all: rows peers need forward, own halo backward; all-gather: padded shard to
    P - 1 peers both ways) x d_u x 4 bytes x batch; not the plan's own formula."""
    P, records = world
    assert_records(records, "bytes", n_configs(P) * 3)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_sgd_loss_curve_equals_world_size_1(world):
    P, records = world
    assert_records(records, "sgd", len(sw.STRATEGIES) * 2 * P * 2)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_regenerated_topology_equals_world_size_1(world):
    """`topology="regenerate"` (no stored edge indices): initial weights, plans, forward, input and
    parameter gradients, bytes and the SGD curve checked like the stored topology, for block and
    random owners and both exchange modes; every one of those records must be there and pass."""
    P, records = world
    regen = {cat: [r for r in recs if "/regenerate" in r[0]] for cat, recs in records.items()}
    n = len(sw.CASES) * 2 * 2 * P
    for cat, per in (("init", 5), ("plan", 10), ("forward", 1), ("input_grad", 1), ("param_grad", 5), ("bytes", 3)):
        assert_records(regen, cat, n * per)
    assert_records(regen, "sgd", 2 * P)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_layout_errors_inside_a_world(world):
    """lift_parallel not dividing the world size -> LayoutError naming both; bad names refused."""
    P, records = world
    assert_records(records, "layout", P * (1 + (2 * len(WORLDS[P][1]) + 4 if WORLDS[P][1] else 0)))


@pytest.mark.timeout(TEST_TIMEOUT)
def test_network_construction_issues_no_collective(world):
    """`LiftedNetwork(base, lift, plan, comm)` with every torch.distributed collective replaced by
    one that fails: it builds, and computes the lift."""
    P, records = world
    assert_records(records, "local", 4 * P)


# ---------------------------------------------------------------- lift_parallel x data_parallel
@pytest.mark.timeout(TEST_TIMEOUT)
def test_lift_parallel_2_x_data_parallel_2():
    """world 4 = 2 x 2, a different batch per replica: the groups are the layout's, outputs are each
    replica's, and gradients averaged over the data group (and the SGD loss curve) equal world size 1
    on the concatenated batch."""
    records = merge(run_world(sw.data_parallel_main, 4, timeout=WORLD_TIMEOUT))
    assert_records(records, "dp", 4 * (4 + len(sw.STRATEGIES) * 2 * 8 + 2))


# ---------------------------------------------------------------- without processes
def test_check_degrees_names_the_values():
    with pytest.raises(LayoutError, match=r"lift_parallel=4 does not divide the world size 6"):
        check_degrees(6, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(LayoutError, match=r"lift_parallel=" + repr(bad).replace(".", r"\.")):
            check_degrees(4, bad)
    assert check_degrees(6, 3) == 2 and check_degrees(4, 4) == 1


def test_unknown_strategy_and_exchange_mode():
    base = BaseGraph.mlp(2, [3], 1)
    lift = random_sparse_lift(base, 7, 2, seed=0)
    layout = Layout()  # world size 1, no process group
    with pytest.raises(PartitionError, match=r"strategy 'metis'.*block.*graph.*random"):
        build_plan(lift, layout, "metis")
    with pytest.raises(PartitionError, match=r"exchange mode 'ring'.*auto.*alltoall.*allgather"):
        build_plan(lift, layout, "block", "ring")
