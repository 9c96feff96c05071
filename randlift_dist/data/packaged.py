"""Data sets that ship with packages (no download at run time), installed with the `data` extra
(`pip install -e '.[data]'`).

- `mnist1d`: MNIST-1D (Greydanus, "Scaling down deep learning"): 1-D signals of the ten digits'
  templates under random padding, translation, shear, scaling and noise. Generated offline with
  the `mnist1d` package's own generator (`mnist1d.data.make_dataset` with its default arguments
  except the four of `data.mnist1d`): by default 5000 samples, the generator's 4000 / 1000 split,
  length 40, 10 classes, seed 42. The package's `get_dataset` (which downloads) is never called.
  The generator reseeds Python's and numpy's global generators: their states are restored after
  it. The arrays are cached as `.npz` under `data.mnist1d.cache_dir` (default `$RANDLIFT_CACHE` or
  `~/.cache/randlift_dist`) in a file named by the package version and the generator's arguments
  (and a hash of all of them), written atomically, so concurrent ranks and later runs reuse it.
- `digits`: scikit-learn's bundled 8x8 digits (1797 images, 10 classes); pixels (0..16) scaled to
  [0, 1], 64 inputs; a stratified split (`data.digits.test_fraction` of each class held out,
  `sklearn.model_selection.train_test_split` seeded by `data.digits.split_seed`).
Both are classification sets: `train.loss: cross_entropy` and a readout of 10 outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np

from .shards import DataError

MNIST1D_CLASSES = DIGITS_CLASSES = 10


def _need(module: str, kind: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise DataError(f"data.kind={kind} needs the {module.split('.')[0]} package ({err}): "
                        "pip install -e '.[data]' (or pip install mnist1d scikit-learn)") from None


def cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("RANDLIFT_CACHE") or Path.home() / ".cache" / "randlift_dist")


def mnist1d_args(m) -> dict:
    """The generator's arguments: its defaults with `data.mnist1d`'s four values."""
    data = _need("mnist1d.data", "mnist1d")
    args = data.get_dataset_args(as_dict=True)
    args.update(num_samples=m.num_samples, train_split=m.train_split, final_seq_length=m.length, seed=m.seed)
    args.pop("url", None)  # the download address: never used
    return args


def mnist1d_cache_path(m) -> Path:
    from importlib.metadata import version

    args = mnist1d_args(m)
    tag = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    name = (f"mnist1d-{version('mnist1d')}-n{m.num_samples}-split{m.train_split:g}-len{m.length}-seed{m.seed}"
            f"-{tag}.npz")
    return cache_dir(m.cache_dir) / name


def mnist1d_arrays(m):
    """`(x_train, y_train, x_test, y_test, description)`, from the cache or generated once."""
    path = mnist1d_cache_path(m)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001 - a damaged cache file is regenerated, not trusted
            arrays = None
    else:
        arrays = None
    if arrays is None:
        data = _need("mnist1d.data", "mnist1d")
        from mnist1d.utils import ObjectView

        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            made = data.make_dataset(ObjectView(mnist1d_args(m)))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        arrays = {"x": made["x"].astype(np.float32), "y": made["y"].astype(np.int64),
                  "x_test": made["x_test"].astype(np.float32), "y_test": made["y_test"].astype(np.int64)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    n, nt = arrays["x"].shape[0], arrays["x_test"].shape[0]
    what = (f"MNIST-1D (mnist1d generator, seed {m.seed}, length {m.length}): {n} train / {nt} test samples, "
            f"{MNIST1D_CLASSES} classes; cached at {path}")
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], what


def digits_arrays(dg):
    """`(x_train, y_train, x_test, y_test, description)` of scikit-learn's digits."""
    datasets = _need("sklearn.datasets", "digits")
    selection = _need("sklearn.model_selection", "digits")
    bunch = datasets.load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = selection.train_test_split(x, y, test_size=dg.test_fraction, stratify=y,
                                                    random_state=dg.split_seed)
    what = (f"scikit-learn digits (8x8): {xtr.shape[0]} train / {xte.shape[0]} test samples, {DIGITS_CLASSES} "
            f"classes, stratified split seed {dg.split_seed}")
    return xtr, ytr, xte, yte, what
