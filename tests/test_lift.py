"""Lifts: edge sets (p = 1 gives the full lift, edge statistics, world-size invariance), block-wise sampling, validation.

Statistical tests. Every test below uses fixed seeds, so it is deterministic; the thresholds are
chosen so that, for a correct sampler, a fresh seed would fail a given test with probability about
`ALPHA = 1e-5` (two-sided z-tests: `|z| < Z_MAX = 4.42`; chi-square tests: p-value > ALPHA, with
bins pooled until every expected count is >= 5, and the upper tail computed exactly as the
regularized incomplete gamma function `Q(dof/2, x/2)` by `torch.special.gammaincc` in float64).
"""

import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch

from randlift_dist import BaseGraph, Lift, LiftError, fully_connected_lift, random_sparse_lift

ALPHA = 1e-5
Z_MAX = 4.42  # P(|N(0,1)| > 4.42) = 1e-5


# ---------------------------------------------------------------- statistics helpers
def chi2_sf(x: float, dof: int) -> float:
    """P(chi2_dof > x)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def binom_pmf(n: int, p: float, kmax: int) -> np.ndarray:
    """P(Binomial(n, p) = k) for k = 0..kmax (float64, via log-gamma)."""
    k = torch.arange(kmax + 1, dtype=torch.float64)
    logp = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1)
            - torch.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * (math.log1p(-p) if p < 1 else 0.0))
    return torch.exp(logp).numpy()


def pooled_chi2(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0):
    """Chi-square statistic and dof of a histogram, adjacent bins pooled to expected >= 5.

    `observed` and `expected` are counts over the same ordered cells (they sum to the same
    total). Returns `(stat, dof)` with dof = pooled cells - 1.
    """
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed.tolist(), expected.tolist()):
        o_acc += o
        e_acc += e
        if e_acc >= min_expected:
            obs.append(o_acc), exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 or o_acc > 0:  # leftover tail joins the last pooled cell
        obs[-1] += o_acc
        exp[-1] += e_acc
    obs, exp = np.array(obs), np.array(exp)
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def assert_binomial_histogram(values: np.ndarray, n: int, p: float, what: str):
    """Chi-square goodness of fit of i.i.d. `values` to Binomial(n, p)."""
    kmax = min(n, int(values.max()) + 1)
    pmf = binom_pmf(n, p, kmax)
    pmf[-1] += max(0.0, 1.0 - pmf.sum())  # upper tail folded into the last cell
    obs = np.bincount(values, minlength=kmax + 1)[: kmax + 1].astype(float)
    stat, dof = pooled_chi2(obs, pmf * values.size)
    pval = chi2_sf(stat, dof)
    assert dof >= 2, f"{what}: too few cells for a test"
    assert pval > ALPHA, f"{what}: chi2 = {stat:.1f} on {dof} dof, p = {pval:.2e}"


def assert_z(observed: float, mean: float, var: float, what: str):
    z = (observed - mean) / math.sqrt(var)
    assert abs(z) < Z_MAX, f"{what}: observed {observed}, expected {mean:.1f}, z = {z:.2f}"


def assert_chi2(stat: float, dof: int, what: str):
    pval = chi2_sf(stat, dof)
    assert pval > ALPHA, f"{what}: chi2 = {stat:.1f} on {dof} dof, p = {pval:.2e}"


def test_chi2_helpers():
    # dof 2: the tail is exp(-x/2); dof 1: erfc(sqrt(x/2))
    for x in (0.1, 1.0, 7.5, 30.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-8)
    assert chi2_sf(124.342, 100) == pytest.approx(0.05, rel=1e-3)  # table value
    pmf = binom_pmf(10, 0.3, 10)
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert pmf[3] == pytest.approx(math.comb(10, 3) * 0.3 ** 3 * 0.7 ** 7, rel=1e-10)
    stat, dof = pooled_chi2(np.array([1, 2, 30, 40, 2, 1.0]), np.array([2, 2, 31, 39, 1, 1.0]))
    assert dof == 1  # cells {0,1,2} and {3}; the short tail {4,5} joins the last: {3,4,5}
    assert stat == pytest.approx(4 / 35 + 4 / 41)


# ---------------------------------------------------------------- shared lifts
def chain(n_hidden_vertices=2):
    return BaseGraph.mlp(1, [1] * n_hidden_vertices, 1)


def check_edge_list(lift: Lift, e, src: np.ndarray, dst: np.ndarray):
    """Maps onto the base edge, sorted by (dst, src), no duplicates, int64."""
    e = lift.base.edge(e)
    assert src.dtype == np.int64 and dst.dtype == np.int64 and src.shape == dst.shape
    if src.size:
        assert src.min() >= 0 and src.max() < lift.n(e.src)
        assert dst.min() >= 0 and dst.max() < lift.n(e.dst)
    key = dst * lift.n(e.src) + src
    assert np.all(np.diff(key) > 0), "edges not strictly sorted by (dst, src): unsorted or duplicated"


def lifted_graph_is_acyclic(lift: Lift) -> bool:
    """Kahn's algorithm on the whole lifted graph (vertices (v, i))."""
    indeg = {(v, i): 0 for v in lift.base.vertices for i in range(lift.n(v))}
    succ = {k: [] for k in indeg}
    for e in lift.base.edges:
        src, dst = lift.edges(e)
        for s, d in zip(src.tolist(), dst.tolist()):
            succ[(e.src, s)].append((e.dst, d))
            indeg[(e.dst, d)] += 1
    ready = [k for k, d in indeg.items() if d == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for m in succ[k]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    return seen == len(indeg)


# ---------------------------------------------------------------- structure (properties 3, 4)
def test_sizes_and_laws():
    base = BaseGraph.residual_mlp(3, 4, 2, 2)
    lift = random_sparse_lift(base, 100, 3, seed=0)
    assert lift.n("x") == 1 and lift.n("h1") == lift.n("y") == 100
    assert lift.prob(base.edge("x->h1")) == 1.0  # min(1, 3/1)
    assert lift.prob(base.edge("h1->h2")) == pytest.approx(0.03)
    assert lift.expected_edges(base.edge("h1->h2")) == pytest.approx(300)
    sized = random_sparse_lift(base, {"x": 5, "h1": 10, "h2": 20, "y": 7}, {"h1->h2": 2.5, "x->h1": 1,
                                                                            "x->h2": 1, "h1->y": 1,
                                                                            "h2->y": 4}, seed=0)
    assert [sized.n(v) for v in base.order] == [5, 10, 20, 7]
    assert sized.prob(base.edge("h1->h2")) == pytest.approx(0.25)
    assert sized.prob(base.edge("h2->y")) == pytest.approx(0.2)
    fixed = random_sparse_lift(base, 50, 3, seed=0, law="fixed_degree")
    assert fixed.in_degree_of(base.edge("h1->h2")) == 3 and fixed.in_degree_of(base.edge("x->h1")) == 1
    full = fully_connected_lift(base, {"h1": 3, "h2": 4, "y": 2})
    assert full.in_degree_of(base.edge("h1->h2")) == 3 and full.prob(base.edge("h2->y")) == 1.0


def test_edge_degree_from_base_graph_overrides_number():
    base = BaseGraph.from_dict({
        "vertices": [{"name": "x", "dim": 1, "role": "input"}, {"name": "h", "dim": 1},
                     {"name": "g", "dim": 1}, {"name": "y", "dim": 1, "role": "output"}],
        "edges": [["x", "h"], {"src": "h", "dst": "g", "degree": 2}, ["g", "y"]]})
    lift = random_sparse_lift(base, 40, 6, seed=0)
    assert lift.degrees[("h", "g")] == 2 and lift.degrees[("g", "y")] == 6
    lift = random_sparse_lift(base, 40, {"h->g": 3, "x->h": 1, "g->y": 1}, seed=0)
    assert lift.degrees[("h", "g")] == 3


@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
def test_p_one_gives_the_fully_connected_edge_set(law):
    base = BaseGraph.residual_mlp(2, 3, 3, 1)
    sizes = {"x": 3, "h1": 7, "h2": 5, "h3": 9, "y": 4}
    sparse = random_sparse_lift(base, sizes, 9, seed=3, law=law, block_size=4)  # 9 >= every n_u
    full = fully_connected_lift(base, sizes)
    for e in base.edges:
        assert sparse.prob(e) == 1.0
        src, dst = sparse.edges(e)
        fsrc, fdst = full.edges(e)
        check_edge_list(sparse, e, src, dst)
        n_u, n_v = sizes[e.src], sizes[e.dst]
        assert src.size == n_u * n_v
        np.testing.assert_array_equal(src, fsrc)
        np.testing.assert_array_equal(dst, fdst)
        np.testing.assert_array_equal(dst, np.repeat(np.arange(n_v), n_u))
        np.testing.assert_array_equal(src, np.tile(np.arange(n_u), n_v))
        np.testing.assert_array_equal(sparse.in_degrees(e), np.full(n_v, n_u))


@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
def test_sparse_edges_map_onto_base_edges_and_graph_is_acyclic(law):
    base = BaseGraph.residual_mlp(2, 3, 3, 2)
    lift = random_sparse_lift(base, {"x": 2, "h1": 40, "h2": 13, "h3": 60, "y": 9}, 3, seed=5, law=law,
                              block_size=8)
    total = 0
    for e in base.edges:
        src, dst = lift.edges(e)
        check_edge_list(lift, e, src, dst)
        np.testing.assert_array_equal(np.bincount(dst, minlength=lift.n(e.dst)), lift.in_degrees(e))
        total += src.size
    assert total > 0
    assert lifted_graph_is_acyclic(lift)


def test_identity_lift_is_the_base_graph():
    base = BaseGraph.residual_mlp(2, 3, 2, 1)
    lift = fully_connected_lift(base, 1)
    for e in base.edges:
        src, dst = lift.edges(e)
        assert src.tolist() == [0] and dst.tolist() == [0]


# ---------------------------------------------------------------- statistics (property 4)
def test_bernoulli_sparse_branch_statistics():
    n, lam = 20000, 5.0
    base = chain()
    lift = random_sparse_lift(base, n, lam, seed=11)
    e = base.edge("h1->h2")
    p = lam / n
    src, dst = lift.edges(e)
    check_edge_list(lift, e, src, dst)
    # total edges: Binomial(n_u n_v, p)
    assert_z(src.size, n * n * p, n * n * p * (1 - p), "total edges")
    # in-degrees: i.i.d. Binomial(n_u, p); in_degrees() agrees with the sampled sources
    deg = np.bincount(dst, minlength=n)
    np.testing.assert_array_equal(deg, lift.in_degrees(e))
    assert 4 * deg.max() < n  # every block took the sparse (redraw duplicates) branch
    assert_binomial_histogram(deg, n, p, "in-degree histogram")
    # out-degrees (edges are independent, so these are i.i.d. Binomial(n_v, p) too)
    out = np.bincount(src, minlength=n)
    assert_binomial_histogram(out, n, p, "out-degree histogram")
    # uniformity of sources: 100 bins of 200 consecutive sources, and the 100 residues mod 100;
    # each bin count is Binomial(200 n_v, p), independent across bins: chi2 with 100 dof
    for bins, what in ((src // 200, "source blocks"), (src % 100, "source residues")):
        c = np.bincount(bins, minlength=100)
        var = 200 * n * p * (1 - p)
        assert_chi2(float(((c - 200 * n * p) ** 2).sum() / var), 100, what)
    # the same in-degree law on the other side of the blocks: per-target degree does not depend on
    # the position inside a block (block edges, where a sampler would most likely go wrong)
    pos = np.arange(n) % lift.block_size
    first, last = deg[pos < 16], deg[pos >= lift.block_size - 16]
    for d, what in ((first, "in-degrees of block heads"), (last, "in-degrees of block tails")):
        assert_z(d.sum(), d.size * lam, d.size * lam * (1 - p), what)


def subset_uniformity_chi2(src: np.ndarray, dst: np.ndarray, n_u: int, n_v: int):
    """Chi-square of 'given its size, each target's source set is uniform among the subsets'.

    Returns (stat, dof) summed over the sizes whose C(n_u, k) cells all expect >= 5 sets.
    """
    mask = np.zeros(n_v, dtype=np.int64)
    np.bitwise_or.at(mask, dst, np.left_shift(1, src))
    sizes = np.bincount(dst, minlength=n_v)
    stat, dof = 0.0, 0
    for k in range(n_u + 1):
        sel = mask[sizes == k]
        cells = math.comb(n_u, k)
        if sel.size < 5 * cells or cells == 1:
            continue
        index = {sum(1 << i for i in c): j for j, c in enumerate(itertools.combinations(range(n_u), k))}
        counts = np.bincount(np.array([index[m] for m in sel.tolist()]), minlength=cells)
        expected = sel.size / cells
        stat += float(((counts - expected) ** 2).sum() / expected)
        dof += cells - 1
    return stat, dof


def test_bernoulli_dense_branch_statistics():
    # n_u = 12, degree 7: p = 7/12, so 4 * max degree >= n_u: the dense (random keys) branch
    n_u, n_v, lam = 12, 20000, 7
    base = chain()
    lift = random_sparse_lift(base, {"h1": n_u, "h2": n_v, "y": 3}, lam, seed=4)
    e = base.edge("h1->h2")
    p = lam / n_u
    src, dst = lift.edges(e)
    check_edge_list(lift, e, src, dst)
    assert_z(src.size, n_u * n_v * p, n_u * n_v * p * (1 - p), "total edges")
    deg = np.bincount(dst, minlength=n_v)
    np.testing.assert_array_equal(deg, lift.in_degrees(e))
    block_max = np.maximum.reduceat(deg, np.arange(0, n_v, lift.block_size))
    assert np.all(4 * block_max >= n_u)  # every block took the dense (random keys) branch
    assert_binomial_histogram(deg, n_u, p, "in-degree histogram")
    # each source is kept independently with probability p: 12 independent Binomial(n_v, p)
    c = np.bincount(src, minlength=n_u)
    assert_chi2(float(((c - n_v * p) ** 2).sum() / (n_v * p * (1 - p))), n_u, "source counts")
    # given the in-degree, the set of sources is uniform (so the edges are independent Bernoulli)
    stat, dof = subset_uniformity_chi2(src, dst, n_u, n_v)
    assert dof > 500
    assert_chi2(stat, dof, "source sets given their size")


@pytest.mark.parametrize("n_u,k,n_v", [(12, 5, 20000), (20, 4, 50000)], ids=["dense", "sparse"])
def test_fixed_degree_sets_are_uniform(n_u, k, n_v):
    # (12, 5): 4k >= n_u, dense branch; (20, 4): 4k < n_u, sparse (redraw duplicates) branch
    assert (4 * k >= n_u) == (n_u == 12)
    base = chain()
    lift = random_sparse_lift(base, {"h1": n_u, "h2": n_v, "y": 3}, k, seed=8, law="fixed_degree")
    e = base.edge("h1->h2")
    src, dst = lift.edges(e)
    check_edge_list(lift, e, src, dst)
    np.testing.assert_array_equal(np.bincount(dst, minlength=n_v), np.full(n_v, k))
    stat, dof = subset_uniformity_chi2(src, dst, n_u, n_v)
    assert dof == math.comb(n_u, k) - 1
    assert_chi2(stat, dof, "fixed-degree source sets")


def test_fixed_degree_large_lift():
    n, k = 20000, 3
    base = chain()
    lift = random_sparse_lift(base, n, k, seed=21, law="fixed_degree")
    e = base.edge("h1->h2")
    src, dst = lift.edges(e)
    check_edge_list(lift, e, src, dst)
    # exactly k distinct sources per target (distinctness: check_edge_list found no duplicate)
    np.testing.assert_array_equal(np.bincount(dst, minlength=n), np.full(n, k))
    np.testing.assert_array_equal(lift.in_degrees(e), np.full(n, k))
    # source marginals uniform. With q = k/n_u, a source's count is Binomial(n_v, q); bins of g
    # sources have covariance a (I - J/nb), a = n_v q (1-q) g n_u / (n_u - 1): chi2 with nb - 1 dof
    q, g, nb = k / n, 200, 100
    a = n * q * (1 - q) * g * n / (n - 1)
    for bins, what in ((src // g, "source blocks"), (src % nb, "source residues")):
        c = np.bincount(bins, minlength=nb)
        assert_chi2(float(((c - n * k / nb) ** 2).sum() / a), nb - 1, what)
    # each source's count: Binomial(n_v, q) (approximately independent across sources)
    assert_binomial_histogram(np.bincount(src, minlength=n), n, q, "source count histogram")


def test_fixed_degree_caps_at_fibre_size():
    base = chain()
    lift = random_sparse_lift(base, {"h1": 5, "h2": 30, "y": 2}, 8, seed=0, law="fixed_degree")
    e = base.edge("h1->h2")
    src, dst = lift.edges(e)
    assert lift.in_degree_of(e) == 5
    np.testing.assert_array_equal(np.bincount(dst), np.full(30, 5))
    np.testing.assert_array_equal(src, np.tile(np.arange(5), 30))


# ---------------------------------------------------------------- blocks and seeds (property 8)
@pytest.mark.parametrize("law", ["bernoulli", "fixed_degree"])
def test_blockwise_generation_equals_whole(law):
    base = BaseGraph.residual_mlp(2, 3, 2, 1)
    lift = random_sparse_lift(base, {"x": 3, "h1": 203, "h2": 150, "y": 77}, 4, seed=9, law=law,
                              block_size=16)
    rng = np.random.default_rng(0)
    for e in base.edges:
        src, dst = lift.edges(e)
        n_v = lift.n(e.dst)
        cases = [range(0, n_v), range(0, 1), range(5, 40), range(16, 32), range(n_v - 3, n_v),
                 range(3, n_v, 7), range(10, 10)]
        for _ in range(5):
            k = int(rng.integers(1, n_v))
            cases.append(np.sort(rng.choice(n_v, size=k, replace=False)))
        cases.append(np.array([], dtype=np.int64))
        for t in cases:
            want = np.isin(dst, np.asarray(list(t), dtype=np.int64))
            s, d = lift.edges(e, t)
            np.testing.assert_array_equal(s, src[want])
            np.testing.assert_array_equal(d, dst[want])
        # blocks stitched in any order give the whole list
        parts = [lift.edges(e, range(lo, min(lo + 16, n_v))) for lo in reversed(range(0, n_v, 16))]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in reversed(parts)]), src)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in reversed(parts)]), dst)


def test_targets_validation():
    base = chain()
    lift = random_sparse_lift(base, 50, 3, seed=0, block_size=8)
    with pytest.raises(LiftError, match=r"out of range \[0, 50\)"):
        lift.edges("h1->h2", np.array([3, 50]))
    with pytest.raises(LiftError, match=r"out of range \[0, 50\)"):
        lift.edges("h1->h2", np.array([-1, 3]))
    with pytest.raises(LiftError, match="strictly increasing"):
        lift.edges("h1->h2", np.array([5, 3]))
    with pytest.raises(LiftError, match="strictly increasing"):
        lift.edges("h1->h2", np.array([3, 3, 9]))


def test_same_seed_same_edges_different_seed_different():
    base = BaseGraph.mlp(2, [3, 3], 1)
    a = random_sparse_lift(base, 300, 4, seed=1)
    b = random_sparse_lift(base, 300, 4, seed=1)
    c = random_sparse_lift(base, 300, 4, seed=2)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    for e in base.edges[1:]:  # x->h1 has p = 1 whatever the seed
        sa, da = a.edges(e)
        sb, db = b.edges(e)
        sc, dc = c.edges(e)
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(da, db)
        assert sa.size != sc.size or not np.array_equal(sa, sc) or not np.array_equal(da, dc)
    # the edges of different base edges come from different streams
    s1, d1 = a.edges("h1->h2")
    s2, d2 = a.edges("h2->y")
    assert not (np.array_equal(s1, s2) and np.array_equal(d1, d2))


# ---------------------------------------------------------------- validation
def test_lift_validation_errors():
    base = BaseGraph.mlp(2, [3], 1)
    with pytest.raises(LiftError, match="lift size 0 for vertex 'h1'"):
        random_sparse_lift(base, 0, 2)
    with pytest.raises(LiftError, match="lift size -3 for vertex"):
        fully_connected_lift(base, -3)
    with pytest.raises(LiftError, match="lift size 2.5 for vertex"):
        random_sparse_lift(base, 2.5, 2)
    with pytest.raises(LiftError, match="lift size 0 for vertex 'x'"):
        random_sparse_lift(base, {"x": 0, "h1": 4, "y": 4}, 2)
    with pytest.raises(LiftError, match=r"unknown vertices \['z'\]"):
        random_sparse_lift(base, {"h1": 4, "y": 4, "z": 1}, 2)
    with pytest.raises(LiftError, match="no entry for vertex 'y'"):
        random_sparse_lift(base, {"h1": 4}, 2)
    with pytest.raises(LiftError, match="degree 0 for edge"):
        random_sparse_lift(base, 10, 0)
    with pytest.raises(LiftError, match="degree -1 for edge"):
        random_sparse_lift(base, 10, -1, law="fixed_degree")
    with pytest.raises(LiftError, match="degree nan for edge"):
        random_sparse_lift(base, 10, float("nan"))
    with pytest.raises(LiftError, match="degree 2.5 for edge x->h1.*fixed_degree law needs an integer"):
        random_sparse_lift(base, 10, 2.5, law="fixed_degree")
    with pytest.raises(LiftError, match="degree 0 for edge h1->y"):
        random_sparse_lift(base, 10, {"x->h1": 1, "h1->y": 0})
    with pytest.raises(LiftError, match="no degree for edge h1->y"):
        random_sparse_lift(base, 10, {"x->h1": 1})
    with pytest.raises(LiftError, match="unknown edge y->h1"):
        random_sparse_lift(base, 10, {"y->h1": 1, "x->h1": 1, "h1->y": 1})
    with pytest.raises(LiftError, match="law 'poisson'"):
        random_sparse_lift(base, 10, 2, law="poisson")
    with pytest.raises(LiftError, match="law 'full'"):
        random_sparse_lift(base, 10, 2, law="full")
    with pytest.raises(LiftError, match="block_size 0"):
        random_sparse_lift(base, 10, 2, block_size=0)
    with pytest.raises(LiftError, match="seed -1"):
        random_sparse_lift(base, 10, 2, seed=-1)
    # fixed_degree accepts integral floats
    assert random_sparse_lift(base, 10, 2.0, law="fixed_degree").degrees[("h1", "y")] == 2


# ---------------------------------------------------------------- scale
def test_million_vertex_lift_memory_is_linear_in_edges():
    """size 10**6, degree 8: about 17 M edges; peak traced memory < 64 bytes per edge.

    Holding the result costs 16 bytes per edge (two int64 arrays); the rest is per-block
    scratch and one concatenation. No n_u x n_v array may appear (that would be 8 TB).
    """
    base = BaseGraph.mlp(3, [8, 8], 2)
    lift = random_sparse_lift(base, 10 ** 6, 8, seed=0)
    tracemalloc.start()
    try:
        edges = [lift.edges(e) for e in base.edges]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    m = sum(s.size for s, _ in edges)
    assert abs(m - 17 * 10 ** 6) < 20000  # 1e6 input edges + 2 x 8e6 expected (sd ~ 2.8e3 each)
    assert peak < 64 * m, f"peak {peak / m:.1f} bytes per edge"
    s, d = edges[1]
    assert s.max() < 10 ** 6 and d[-1] == 10 ** 6 - 1 and np.all(np.diff(d) >= 0)
