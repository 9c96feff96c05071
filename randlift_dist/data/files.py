"""Arrays from a file (`data.kind: npz`, alias `file`): a `.npz` (or a `.pt` of tensors) holding

- `x`: inputs `[N, in_dim]` (or `[N, ...]` with `in_dim` values per row, flattened row by row);
- `y`: regression targets `[N, out_dim]` (or `[N]` when out_dim is 1) of floats, or, for
  `train.loss: cross_entropy`, integer class labels `[N]` in `[0, classes)`;
- optionally `x_test`, `y_test` (the test split; otherwise `data.n_test` rows are held out by a
  permutation seeded with `data.seed`: `holdout_split`), and `classes` (a scalar: the class count,
  checked against the readout).

Every check runs when the file is read, before any process group starts (the trainer's preflight
loads the data set and keeps it for the run): a damaged or foreign file, non-numeric or non-finite
inputs, labels that do not fit the task, a width that does not fit the model: one line naming the
file and the array, exit 2. The file's sha256 is part of the run's data identity (checkpoints).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task, check_labels
from .shards import DataError

KEYS = ("x", "y", "x_test", "y_test", "classes")


def read_arrays(path: Path, key: str = "data.path") -> dict[str, np.ndarray]:
    """The arrays of a `.npz` / `.pt` file as numpy, or a `DataError` in one line."""
    where = f"{key}={str(path)!r}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        elif path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise DataError(f"{where}: the file must hold a dict of arrays with keys x and y")
            arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in loaded.items()}
        else:
            raise DataError(f"{where}: use a .npz or .pt file holding arrays x and y")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: one line, not a traceback
        raise DataError(f"{where}: cannot read it as {path.suffix} arrays "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{where}: the file must hold arrays named 'x' and 'y' (it has {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{where}: give both x_test and y_test, or neither")
    return arrays


def numeric(where: str, name: str, a: np.ndarray) -> np.ndarray:
    """A float32 array of `a`, or one line: not numbers, or not finite."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: array {name!r} holds {arr.dtype} values, not numbers: store float arrays")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            at = np.argwhere(bad)[0].tolist()
            raise DataError(f"{where}: array {name!r} has {int(bad.sum())} non-finite values (NaN or inf; the first "
                            f"at index {at}): clean the data before training")
    return arr.astype(np.float32, copy=False)


def inputs(where: str, name: str, a: np.ndarray, in_dim: int) -> np.ndarray:
    """Inputs as float32 `[N, in_dim]` (rows flattened), or one line saying what does not fit."""
    x = numeric(where, name, a)
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != in_dim:
        raise DataError(f"{where}: array {name!r} has shape {tuple(x.shape)}: the model takes {in_dim} input values "
                        f"per sample (x [N, {in_dim}])")
    return x.reshape(x.shape[0], in_dim)


def labels(where: str, name: str, a: np.ndarray, task: Task, classes: int | None) -> np.ndarray:
    y = np.asarray(a)
    if y.dtype.kind == "f":
        numeric(where, name, y)
    return check_labels(task, y, f"{where}: array {name!r}", classes)


def holdout_split(x, y, n_test: int, seed: int):
    """`((x_train, y_train), (x_test, y_test))`: a permutation seeded with `seed`, the last
    `min(n_test, N // 2)` rows held out (the split this kind always used)."""
    n = x.shape[0]
    n_test = min(n_test, n // 2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    x, y = x[perm], y[perm]
    return (x[: n - n_test], y[: n - n_test]), (x[n - n_test:], y[n - n_test:])


def labelled_arrays(where: str, arrays: dict, task: Task, in_dim: int):
    """`(x, y, classes)` of a file's arrays, checked against the model and the task (`classes`: the
    file's class count, or None); `where` names the file in messages."""
    classes = None
    if "classes" in arrays:
        c = np.asarray(arrays["classes"])
        if c.size != 1 or c.dtype.kind not in "iu":
            raise DataError(f"{where}: array 'classes' must be one integer (the class count)")
        classes = int(c.reshape(()))
    x = inputs(where, "x", arrays["x"], in_dim)
    y = labels(where, "y", arrays["y"], task, classes)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: x has {x.shape[0]} rows and y {y.shape[0]}: give one label per sample")
    return x, y, classes


def npz_arrays(path: Path, task: Task, in_dim: int, n_test: int, seed: int):
    """`(x_train, y_train, x_test, y_test)` of a file, checked (see the module doc)."""
    where = f"data.path={str(path)!r}"
    arrays = read_arrays(path)
    x, y, classes = labelled_arrays(where, arrays, task, in_dim)
    if "x_test" in arrays:
        xt = inputs(where, "x_test", arrays["x_test"], in_dim)
        yt = labels(where, "y_test", arrays["y_test"], task, classes)
        if xt.shape[0] != yt.shape[0]:
            raise DataError(f"{where}: x_test has {xt.shape[0]} rows and y_test {yt.shape[0]}")
        return x, y, xt, yt
    (x, y), (xt, yt) = holdout_split(x, y, n_test, seed)
    return x, y, xt, yt


def _npz_rows(path: Path) -> dict[str, int]:
    """Rows of each array of a `.npz`, from the members' `.npy` headers (nothing loaded)."""
    rows = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            rows[name.removesuffix(".npy")] = int(shape[0]) if shape else 1
    return rows


def split_rows(path: Path, n_test: int) -> tuple[int, int]:
    """`(train rows, test rows)` of a file as `npz_arrays` would split it, reading headers only
    (a `.pt` file is loaded); `(0, 0)` when the file cannot be read (its load says why)."""
    try:
        rows = _npz_rows(path) if path.suffix == ".npz" else {k: len(v) for k, v in read_arrays(path).items()
                                                              if k != "classes"}
    except Exception:  # noqa: BLE001 - an estimate of a run whose data is missing or damaged
        return 0, 0
    if "x_test" in rows:
        return rows.get("x", 0), rows["x_test"]
    n = rows.get("x", 0)
    held = min(n_test, n // 2)
    return n - held, held
