"""Data: the kinds a run can train on, their checks, and the batches every replica reads.

`data.kind` picks a loader; each returns a `Dataset` of two row sources (train, test) and the
run's `Task` (loss and metrics, `tasks.py`):

| kind      | where the rows come from                                   | held in memory     |
|-----------|------------------------------------------------------------|--------------------|
| teacher   | generated: a teacher lift of the same base (`teacher.py`)  | yes                |
| npz, file | a `.npz` / `.pt` file (`files.py`)                         | yes                |
| mnist1d   | MNIST-1D, generated offline and cached (`packaged.py`)     | yes                |
| digits    | scikit-learn's 8x8 digits (`packaged.py`)                  | yes                |
| shards    | a directory of `.npy` shards read row by row (`shards.py`) | one batch per rank |
| recall    | associative recall token sequences, generated (`recall.py`) | yes                |

`build_dataset` loads and checks everything it can before any process group starts (the trainer's
preflight calls it; the result is kept for the run in this process, so the data is read once):
labels against the task (`tasks.check_labels`), widths against the model, finite inputs. For
shards, preflight reads only the index and the `.npy` headers; `verify_shards` (collective: the
files are split over the ranks, every rank learns every problem) hashes every file and checks every
label when the trainer starts (`data.shards.verify`). `data_identity` is what a checkpoint records
about the data (a resume on other data is refused unless allowed).
Batches and evaluation subsets: `sources.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..graph import BaseGraph
from ..tasks import Task, check_labels
from .files import npz_arrays, split_rows
from .packaged import DIGITS_CLASSES, DIGITS_SAMPLES, MNIST1D_CLASSES, digits_arrays, mnist1d_arrays
from .recall import recall_arrays
from .shards import DataError, ShardSource, finite, read_index, verify_part, write_shards
from .sources import Batches, FeistelOrder, TensorSource, eval_rows, replica_part
from .teacher import teacher_arrays

__all__ = ["Dataset", "Batches", "TensorSource", "ShardSource", "FeistelOrder", "DataError", "build_dataset",
           "verify_shards", "data_identity", "split_sizes", "write_shards", "read_index", "eval_rows", "replica_part"]


@dataclasses.dataclass
class Dataset:
    train: Any  # a row source: TensorSource or ShardSource
    test: Any
    task: Task
    description: str = ""

    # the in-memory arrays (TensorSource kinds), for tools that work on whole splits
    @property
    def x_train(self) -> torch.Tensor:
        return self.train.x

    @property
    def y_train(self) -> torch.Tensor:
        return self.train.y

    @property
    def x_test(self) -> torch.Tensor:
        return self.test.x

    @property
    def y_test(self) -> torch.Tensor:
        return self.test.y

    @property
    def resident_bytes(self) -> int:
        """Bytes of data this process holds (0 for sources read from disk)."""
        return sum(s.nbytes() for s in (self.train, self.test) if not getattr(s, "lazy", False))


def _in_memory(task: Task, xtr, ytr, xte, yte, what: str, where: str, classes: int | None) -> Dataset:
    ytr = check_labels(task, ytr, f"{where} training labels", classes)
    yte = check_labels(task, yte, f"{where} test labels", classes)
    return Dataset(TensorSource(torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr)),
                   TensorSource(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte)), task, what)


def _packaged_width(kind: str, x: np.ndarray, in_dim: int) -> None:
    if x.shape[1] != in_dim:
        raise DataError(f"data.kind={kind} has {x.shape[1]} input values per sample but the model takes {in_dim}: "
                        f"set the base network's input width to {x.shape[1]} (e.g. model.base.in_dim={x.shape[1]})")


def _shards(cfg: Config, task: Task, in_dim: int) -> Dataset:
    folder = Path(cfg.data.path)
    index = read_index(folder)
    where = f"data.path={str(folder)!r}"
    width = int(np.prod(index["x"]["shape"], dtype=np.int64))
    if width != in_dim:
        raise DataError(f"{where}: the shards hold {width} input values per sample but the model takes {in_dim}")
    if np.dtype(index["x"]["dtype"]).kind not in "biuf":
        raise DataError(f"{where}: inputs of dtype {index['x']['dtype']}, not numbers: rewrite the shards")
    # the label layout and declared class count, checked on an empty array of the labels' dtype
    check_labels(task, np.zeros((0, *index["y"]["shape"]), np.dtype(index["y"]["dtype"])), f"{where} labels",
                 index.get("classes"))
    train, test = ShardSource(folder, "train", index), ShardSource(folder, "test", index)
    what = (f"shards {folder.name}: {len(train)} train / {len(test)} test samples read from "
            f"{len(train.xs) + len(test.xs)} shard pairs")
    return Dataset(train, test, task, what)


def _load(cfg: Config, base: BaseGraph, task: Task) -> Dataset:
    d = cfg.data
    if d.kind == "teacher":
        xtr, ytr, xte, yte, what = teacher_arrays(d, base, task)
        return _in_memory(task, xtr, ytr, xte, yte, what, "teacher", None)
    if d.kind in ("npz", "file"):
        xtr, ytr, xte, yte = npz_arrays(Path(d.path), task, base.in_dim, d.n_test, d.seed)
        what = f"file {Path(d.path).name}: {xtr.shape[0]} train / {xte.shape[0]} test samples"
        return _in_memory(task, xtr, ytr, xte, yte, what, f"data.path={d.path!r}", None)
    if d.kind == "mnist1d":
        xtr, ytr, xte, yte, what = mnist1d_arrays(d.mnist1d)
        _packaged_width("mnist1d", xtr, base.in_dim)
        return _in_memory(task, xtr, ytr, xte, yte, what, "data.kind=mnist1d", MNIST1D_CLASSES)
    if d.kind == "digits":
        xtr, ytr, xte, yte, what = digits_arrays(d.digits)
        _packaged_width("digits", xtr, base.in_dim)
        return _in_memory(task, xtr, ytr, xte, yte, what, "data.kind=digits", DIGITS_CLASSES)
    if d.kind == "recall":
        xtr, ytr, xte, yte, what = recall_arrays(d.recall)
        _packaged_width("recall", xtr, base.in_dim)
        return _in_memory(task, xtr, ytr, xte, yte, what, "data.kind=recall", d.recall.values)
    return _shards(cfg, task, base.in_dim)


def split_sizes(cfg: Config) -> tuple[int, int]:
    """`(training rows, test rows)` of the configured data, without loading it (the estimator's
    data term): the settings for teacher, mnist1d and digits, the headers of a file, the index of
    shards ((0, 0) when a file or index cannot be read)."""
    d = cfg.data
    if d.kind == "teacher":
        return d.n_train, d.n_test
    if d.kind == "recall":
        return d.recall.n_train, d.recall.n_test
    if d.kind == "mnist1d":  # the generator: num_samples // 10 per class, then its train_split cut
        total = d.mnist1d.num_samples // MNIST1D_CLASSES * MNIST1D_CLASSES
        return int(total * d.mnist1d.train_split), total - int(total * d.mnist1d.train_split)
    if d.kind == "digits":  # scikit-learn's split: ceil(fraction x 1797) held out
        held = int(np.ceil(d.digits.test_fraction * DIGITS_SAMPLES))
        return DIGITS_SAMPLES - held, held
    if d.kind in ("npz", "file"):
        return split_rows(Path(d.path), d.n_test)
    try:
        splits = read_index(Path(d.path))["splits"]
    except DataError:
        return 0, 0
    return splits["train"]["rows"], splits.get("test", {"rows": 0})["rows"]


_MEMO: dict[str, Dataset] = {}


def build_dataset(cfg: Config, base: BaseGraph, out_dim: int) -> Dataset:
    """The run's data set, checked (see the module doc). Kept for the process: a second call with the
    same data, model widths and loss returns the same object (preflight, then the trainer)."""
    task = Task(cfg.train.loss, out_dim)
    key = json.dumps([data_identity(cfg, hash_files=False), cfg.data.path, base.in_dim, out_dim, cfg.train.loss],
                     sort_keys=True)
    if key not in _MEMO:
        ds = _load(cfg, base, task)
        if cfg.train.batch_size > len(ds.train):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                              f"({len(ds.train)} samples): lower it or add data")
        _MEMO.clear()
        _MEMO[key] = ds
    return _MEMO[key]


def verify_shards(ds: Dataset, rank: int = 0, world: int = 1, group=None) -> None:
    """Hash every shard file and check every label (shards only; a no-op otherwise). Collective when
    `world > 1`: file i is checked by rank `i % world`, and every rank raises the first problem."""
    files = [(s, p) for s in (ds.train, ds.test) if isinstance(s, ShardSource) for p in s.files()]
    problems = []
    for i, (src, part) in enumerate(files):
        if i % world != rank:
            continue
        where = str(part.path)
        checks = [finite(where)]
        if part in src.ys:
            checks.append(lambda y, w=where, c=src.index.get("classes"): check_labels(ds.task, y, w, c))
        bad = verify_part(part, lambda a: [c(a) for c in checks])
        if bad:
            problems.append(bad)
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, problems, group=group)
        problems = [p for part in parts for p in part]
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


TEACHER_KEYS = ("kind", "path", "n_train", "n_test", "input_dist", "label_noise", "teacher_size", "teacher_degree",
                "teacher_seed", "seed")


def data_identity(cfg: Config, hash_files: bool = True) -> dict[str, Any]:
    """What determines the rows trained on: the kind's own settings (and a file's sha256, a shard
    index's sha256). Recorded in checkpoints; a resume with another identity is refused."""
    d = cfg.data
    if d.kind == "teacher":
        out = {k: getattr(d, k) for k in TEACHER_KEYS}
        if cfg.train.loss == "cross_entropy":
            out["labels"] = "argmax"
        return out
    out: dict[str, Any] = {"kind": d.kind, "seed": d.seed}
    if d.kind in ("npz", "file"):
        out.update(path=d.path, n_test=d.n_test)
        if hash_files and Path(d.path).is_file():
            out["file_sha256"] = _sha256(Path(d.path))
    elif d.kind == "mnist1d":
        out["mnist1d"] = {k: v for k, v in dataclasses.asdict(d.mnist1d).items() if k != "cache_dir"}
    elif d.kind == "digits":
        out["digits"] = dataclasses.asdict(d.digits)
    elif d.kind == "recall":
        out["recall"] = dataclasses.asdict(d.recall)
    else:  # shards: the index (and so every file's sha256), wherever the directory is
        index = Path(d.path) / "index.json"
        if hash_files and index.is_file():
            out["index_sha256"] = _sha256(index)
    return out
