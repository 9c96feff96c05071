"""The price of randomness, pure part: the P(s) estimate, its crossings, bootstrap intervals, and
the two adaptive searches, as functions of finished outcomes (no files, no processes, no torch).

Definitions (for one task, one target and one lift kind):
- `P(s)`: the fraction of the P seeds whose run of lift size s reaches the target within the
  normal budget. The estimate used for crossings is the isotonic (non-decreasing in s) least-squares
  fit of the observed fractions, weighted by seed counts (`isotonic`, pool-adjacent-violators):
  the raw fractions of 8 seeds are noisy and need not be monotone.
- `s_q` (q = 0.5, 0.9): where the fitted P crosses q, interpolated linearly in log s between the
  last size below q and the first at or above it (`crossing`). If P is already >= q at the
  smallest size, `s_q` is that size, censored `below`; if it never reaches q, `s_q = inf`,
  censored `above`.
- Bootstrap interval of `s_q` (`bootstrap`): the seeds of each size are resampled with
  replacement (the number of successes at a size is then Binomial(n_s, k_s / n_s), drawn so),
  the fit and the crossing recomputed; the interval is the lower / upper empirical quantile at
  (1 - confidence) / 2 and (1 + confidence) / 2 of the replicates (no interpolation, so a
  censored replicate gives a finite lower bound or an infinite upper one, never NaN).
- `s_min`: an empirical witness size: the smallest size at which any run (P seeds, or the
  search's seeds x learning rates at the longer budget) reaches the target (`search_phase`).

The searches replay from scratch on every call, in a fixed order, so the next cells to run are a
deterministic function of the finished ones: `p_phase` (grid, then bisection rounds on log s
around each level's crossing) and `search_phase` (walk down the grid from the smallest grid size
where a P seed succeeded, then bisection between the last failing and first succeeding size). A
probe of the search runs its runs in chunks and stops at the first success.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

PENDING, SUCCESS, FAILURE = "pending", "success", "failure"


# ---------------------------------------------------------------- sizes
def geometric_sizes(lo: int, hi: int, factor: float) -> list[int]:
    """`lo, lo f, lo f^2, ...` rounded to integers, up to `hi` (distinct, increasing)."""
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi and factor > 1):
        raise ValueError(f"geometric_sizes({lo!r}, {hi!r}, {factor!r}): need integers 1 <= lo <= hi and factor > 1")
    out, k = [], 0
    while True:
        v = int(round(lo * factor ** k))
        if v > hi:
            return out
        if not out or v > out[-1]:
            out.append(v)
        k += 1


def geometric_mid(lo: int, hi: int) -> int | None:
    """The integer nearest to `sqrt(lo hi)` strictly between lo and hi (None when hi - lo < 2)."""
    if hi - lo < 2:
        return None
    return min(max(int(round(math.sqrt(lo * hi))), lo + 1), hi - 1)


def refinable(lo: int, hi: int, resolution: float) -> int | None:
    """The bisection size of the bracket `(lo, hi)`, or None once `hi / lo <= resolution`."""
    return geometric_mid(lo, hi) if hi / lo > resolution else None


# ---------------------------------------------------------------- the P(s) estimate
def isotonic(y: Sequence[float], w: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit of `y` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2, wt, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out += [m] * int(c)
    return out


def crossing(sizes: Sequence[int], p: Sequence[float], q: float) -> dict:
    """Where the non-decreasing curve `p` over `sizes` first reaches `q` (see the module doc):
    `{s, censored (None|'below'|'above'), lo, hi}` with `(lo, hi)` the bracketing sizes."""
    j = next((i for i, v in enumerate(p) if v >= q - 1e-12), None)
    if j is None:
        return {"s": math.inf, "censored": "above", "lo": sizes[-1], "hi": None}
    if j == 0:
        return {"s": float(sizes[0]), "censored": "below", "lo": None, "hi": sizes[0]}
    a, b, pa, pb = sizes[j - 1], sizes[j], p[j - 1], p[j]
    t = (q - pa) / (pb - pa)
    return {"s": math.exp(math.log(a) + t * (math.log(b) - math.log(a))), "censored": None, "lo": a, "hi": b}


def estimate(sizes: Sequence[int], k: Sequence[int], n: Sequence[int], levels: Sequence[float]) -> dict:
    """`{fit: [...], q: crossing(q)}` of the successes `k` out of `n` at each size."""
    fit = isotonic([ki / ni for ki, ni in zip(k, n)], n)
    return {"fit": fit, **{q: crossing(sizes, fit, q) for q in levels}}


def bootstrap(sizes: Sequence[int], k: Sequence[int], n: Sequence[int], levels: Sequence[float], samples: int,
              seed: int, confidence: float) -> dict[float, tuple[float, float]]:
    """`{q: (lo, hi)}`: percentile intervals of `s_q` over `samples` seed resamplings per size."""
    rng = np.random.default_rng(seed)
    n_arr, p_arr = np.asarray(n, dtype=np.int64), np.asarray(k, dtype=np.float64) / np.asarray(n, dtype=np.float64)
    draws = rng.binomial(n_arr[None, :], p_arr[None, :], size=(samples, len(sizes)))  # [B, sizes]
    values = {q: np.empty(samples) for q in levels}
    cache: dict[bytes, list[float]] = {}
    for b in range(samples):
        key = draws[b].tobytes()
        if key not in cache:
            fit = isotonic(draws[b] / n_arr, n_arr)
            cache[key] = [crossing(sizes, fit, q)["s"] for q in levels]
        for q, v in zip(levels, cache[key]):
            values[q][b] = v
    a = (1 - confidence) / 2
    return {q: (float(np.quantile(v, a, method="lower")), float(np.quantile(v, 1 - a, method="higher")))
            for q, v in values.items()}


# ---------------------------------------------------------------- the adaptive searches
def p_phase(grid: Sequence[int], outcomes: Callable[[int], list], levels: Sequence[float], rounds: int,
            resolution: float) -> tuple[list[int], list[int]]:
    """Replay the P(s) refinement: `(sizes so far, sizes whose runs are still needed)`.

    `outcomes(s)`: the P seeds' outcomes at size s (True / False, None while not finished). Round 0
    is the grid; each later round adds, for each level, the geometric midpoint of the bracket of its
    crossing (while the bracket is wider than `resolution`), at most `rounds` times."""
    sizes = sorted(set(grid))
    for r in range(rounds + 1):
        missing = [s for s in sizes if any(o is None for o in outcomes(s))]
        if missing:
            return sizes, missing
        if r == rounds:
            break
        k = [sum(bool(o) for o in outcomes(s)) for s in sizes]
        n = [len(outcomes(s)) for s in sizes]
        est = estimate(sizes, k, n, levels)
        new = set()
        for q in levels:
            c = est[q]
            if c["censored"] is None:
                m = refinable(c["lo"], c["hi"], resolution)
                if m is not None and m not in sizes:
                    new.add(m)
        if not new:
            break
        sizes = sorted(set(sizes) | new)
    return sizes, []


def probe(runs: list, witnesses: list, chunk: int) -> tuple[str, list[int]]:
    """One size of the search: `runs` are the search runs' outcomes (True / False / None) in order,
    `witnesses` other finished runs at that size (the P seeds). Success as soon as any finished run
    succeeded; otherwise the runs go in chunks of `chunk`: `(PENDING, indices of the first chunk
    with unfinished runs)`, or FAILURE when every run finished without success."""
    if any(o is True for o in runs) or any(o is True for o in witnesses):
        return SUCCESS, []
    for a in range(0, len(runs), chunk):
        missing = [i for i in range(a, min(a + chunk, len(runs))) if runs[i] is None]
        if missing:
            return PENDING, missing
    return FAILURE, []


def search_phase(grid: Sequence[int], grid_any: Callable[[int], bool | None],
                 probe_at: Callable[[int], tuple[str, list]], resolution: float) -> dict:
    """Replay the s_min search. `grid_any(s)`: whether a P seed succeeded at grid size s (None while
    its P runs are unfinished); `probe_at(s)`: `probe` at size s. Returns `{status, lo, hi, probes,
    need}`: `need` the size whose probe is pending (status PENDING), else s_min lies in `(lo, hi]`
    (`lo` None: at or below the smallest grid size; `hi` None: above the largest)."""
    grid = sorted(set(grid))
    probes: list[tuple[int, str]] = []
    seen = [grid_any(s) for s in grid]
    if any(v is None for v in seen):
        return {"status": PENDING, "lo": None, "hi": None, "probes": probes, "need": None}
    top = next((i for i, v in enumerate(seen) if v), None)

    def run(s):
        status, _ = probe_at(s)
        if status != PENDING:
            probes.append((s, status))
        return status

    if top is None:  # no P seed succeeded anywhere: try the largest size with the search's runs
        status = run(grid[-1])
        if status == PENDING:
            return {"status": PENDING, "lo": None, "hi": None, "probes": probes, "need": grid[-1]}
        if status == FAILURE:
            return {"status": "done", "lo": grid[-1], "hi": None, "probes": probes, "need": None}
        top = len(grid) - 1
    hi, lo = grid[top], None
    for s in reversed(grid[:top]):  # walk down the grid
        status = run(s)
        if status == PENDING:
            return {"status": PENDING, "lo": lo, "hi": hi, "probes": probes, "need": s}
        if status == SUCCESS:
            hi = s
        else:
            lo = s
            break
    while lo is not None:  # bisection on log s between the last failing and the first succeeding size
        m = refinable(lo, hi, resolution)
        if m is None:
            break
        status = run(m)
        if status == PENDING:
            return {"status": PENDING, "lo": lo, "hi": hi, "probes": probes, "need": m}
        lo, hi = (lo, m) if status == SUCCESS else (m, hi)
    return {"status": "done", "lo": lo, "hi": hi, "probes": probes, "need": None}
