"""Associative recall: a synthetic sequence task generated in-process (`data.kind=recall`).

A sample is `pairs` key-value pairs followed by a query key, as token ids: `k_1 v_1 k_2 v_2 ...
k_P v_P q` (length `2 * pairs + 1`); the keys of a sample are distinct, drawn from `[0, keys)`,
the values independently from `[keys, keys + values)`, and the query is one of the sample's keys,
uniformly. The label is the value paired with the query, as a class in `[0, values)`. Chance level
is `1 / values`; a model must find the query among the keys and read the token after it, which
attention over the positions does once each position also sees its neighbour (e.g. a conv edge
before the attention, `transformer(..., mixer_kernel=3)`).

Inputs are float32 `[N, 2 * pairs + 1]` holding integer token ids (a token input vertex of
`tokens = keys + values` ids reads them; exact: ids are far below 2**24); labels int64 `[N]`.
Train and test sets come from independent streams of one seeded generator (`seed`, then `seed`
with a test offset), so the same settings always give the same arrays.
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError


def recall_arrays_from(n: int, pairs: int, keys: int, values: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(x float32 [n, 2 pairs + 1], y int64 [n])` of `n` samples (see the module doc)."""
    if pairs < 1 or keys < pairs or values < 2 or n < 1:
        raise ConfigError(f"data.recall: pairs={pairs}, keys={keys}, values={values}, {n} samples: need pairs >= 1, "
                          "keys >= pairs (the keys of a sample are distinct), values >= 2 and samples >= 1")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x5EC0])))
    k = np.argsort(rng.random((n, keys)), axis=1)[:, :pairs]  # distinct keys per sample
    v = rng.integers(0, values, size=(n, pairs))
    q = rng.integers(0, pairs, size=n)
    x = np.empty((n, 2 * pairs + 1), np.float32)
    x[:, 0:2 * pairs:2] = k
    x[:, 1:2 * pairs:2] = v + keys
    x[:, -1] = k[np.arange(n), q]
    return x, v[np.arange(n), q].astype(np.int64)


def recall_arrays(rc) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """`(x_train, y_train, x_test, y_test, description)` for a `data.recall` section."""
    xtr, ytr = recall_arrays_from(rc.n_train, rc.pairs, rc.keys, rc.values, rc.seed)
    xte, yte = recall_arrays_from(rc.n_test, rc.pairs, rc.keys, rc.values, rc.seed + 1_000_003)
    what = (f"associative recall: {rc.pairs} pairs (keys of {rc.keys} ids, values of {rc.values}), sequences of "
            f"{2 * rc.pairs + 1} tokens; {rc.n_train} train / {rc.n_test} test samples")
    return xtr, ytr, xte, yte, what
