"""Sharded data sets: a directory of `.npy` shards read row by row, for data larger than memory.

    DIR/index.json                      written last: the directory is complete once it exists
    DIR/train-00000.x.npy  train-00000.y.npy  ...   inputs [r, *x_shape], labels [r, *y_shape]
    DIR/test-00000.x.npy   test-00000.y.npy   ...

`index.json`: `{"format": "randlift_dist.shards", "version": 1, "x": {dtype, shape}, "y": {dtype,
shape}, "classes": C or null, "splits": {"train": {"rows": N, "shards": [{"rows": r, "x": {file,
bytes, sha256}, "y": {...}}]}, "test": {...}}}`: the per-row shapes and dtypes, each file's size and
sha256. Written by `write_shards` (arrays, or an iterable of chunks so that the data never has to
fit in memory: one shard is buffered at a time) or `python -m randlift_dist.data write --npz FILE
--out DIR` (`__main__.py`).

Reading (`ShardSource`): the index and each shard's `.npy` header are read when the source opens
(shape, dtype, size checked against the index: a mismatch is one `DataError` line); rows are then
read on demand with `os.preadv`, one read per run of consecutive rows, into the batch's own
buffer. Nothing is memory-mapped, so a rank's resident memory is its batch, not the pages it
touched. `verify_split` hashes files (sha256) and checks every label against the task; the
trainer splits the files over the ranks (`data.shards.verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config_parse import ConfigError

FORMAT, VERSION = "randlift_dist.shards", 1
SHARD_BYTES = 256 << 20  # target bytes of one x shard file


class DataError(ConfigError):
    """Data that cannot be used; the message names the file, what is wrong and the fix (exit 2)."""


# ---------------------------------------------------------------- writing
def _chunks(x, y) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    if isinstance(x, np.ndarray) or isinstance(x, torch.Tensor):
        yield np.asarray(x), np.asarray(y)
        return
    yield from x  # an iterable of (x, y) chunks; y must be None then


def _write_npy(path: Path, arr: np.ndarray) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    with open(path, "rb") as f:  # hash what is on disk, header included
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _write_split(out: Path, split: str, chunks, shard_bytes: int, spec: dict) -> dict[str, Any]:
    shards, buf_x, buf_y, held, n = [], [], [], 0, 0

    def flush():
        nonlocal buf_x, buf_y, held
        if not held:
            return
        x, y = np.concatenate(buf_x), np.concatenate(buf_y)
        k = len(shards)
        shards.append({"rows": int(x.shape[0]), "x": _write_npy(out / f"{split}-{k:05d}.x.npy", x),
                       "y": _write_npy(out / f"{split}-{k:05d}.y.npy", y)})
        buf_x, buf_y, held = [], [], 0

    for x, y in chunks:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{split} chunk: x has {x.shape[0]} rows and y {y.shape[0]}: give as many labels as rows")
        for key, a in (("x", x), ("y", y)):
            if spec.setdefault(key, {"dtype": a.dtype.str, "shape": list(a.shape[1:])}) != \
                    {"dtype": a.dtype.str, "shape": list(a.shape[1:])}:
                raise DataError(f"{split} chunk: {key} of dtype {a.dtype} and row shape {list(a.shape[1:])} differs "
                                f"from the first chunk's {spec[key]}: every chunk must have the same layout")
        row_bytes = max(1, x[:1].nbytes)
        per_shard = max(1, shard_bytes // row_bytes)
        at = 0
        while at < x.shape[0]:
            take = min(per_shard - held, x.shape[0] - at)
            buf_x.append(x[at:at + take])
            buf_y.append(y[at:at + take])
            held, at, n = held + take, at + take, n + take
            if held >= per_shard:
                flush()
    flush()
    return {"rows": n, "shards": shards}


def write_shards(out_dir, x, y=None, x_test=None, y_test=None, classes: int | None = None,
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a shard directory: `x`, `y` arrays (or `x` an iterable of `(x, y)` chunks and `y`
    None), and optionally a test split the same way. `classes`: the class count, recorded in the
    index (checked against the readout at load). Refuses a directory that already holds an index."""
    out = Path(out_dir)
    if (out / "index.json").exists():
        raise DataError(f"{out}: already holds a shard index: write to a new directory (or delete it first)")
    out.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {}
    splits = {"train": _write_split(out, "train", _chunks(x, y), shard_bytes, spec)}
    if x_test is not None:
        splits["test"] = _write_split(out, "test", _chunks(x_test, y_test), shard_bytes, spec)
    index = {"format": FORMAT, "version": VERSION, "x": spec.get("x"), "y": spec.get("y"),
             "classes": None if classes is None else int(classes), "splits": splits}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return out


# ---------------------------------------------------------------- reading
def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "index.json"
    if not Path(folder).is_dir():
        raise DataError(f"data.path={str(folder)!r}: no such directory")
    if not path.is_file():
        raise DataError(f"{path}: missing: not a shard directory (write one with randlift_dist.data.write_shards "
                        "or python -m randlift_dist.data.shards write --npz FILE --out DIR)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}): rewrite the shards") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path}: not a version-{VERSION} randlift_dist shard index")
    if "train" not in index.get("splits", {}) or not index["splits"]["train"]["rows"]:
        raise DataError(f"{path}: no training rows")
    return index


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """`(shape, dtype, data offset)` of an `.npy` file, from its header only."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy file ({' '.join(str(e).split())[:120]}): rewrite the shards") \
                from None
        if fortran:
            raise DataError(f"{path}: stored in Fortran order: rewrite the shards (write_shards stores C order)")
        return tuple(shape), dtype, f.tell()


class _Part:
    """One shard file of a split, opened for reading rows."""

    def __init__(self, folder: Path, meta: dict, rows: int, spec: dict, what: str):
        self.path = Path(folder) / meta["file"]
        if not self.path.is_file():
            raise DataError(f"{self.path}: missing ({what} of {rows} rows): restore it or rewrite the shards")
        size = self.path.stat().st_size
        if size != meta["bytes"]:
            raise DataError(f"{self.path}: {size} bytes, the index says {meta['bytes']} (truncated or replaced): "
                            "restore it or rewrite the shards")
        shape, dtype, self.offset = _header(self.path)
        want = (rows, *spec["shape"])
        if shape != want or dtype.str != spec["dtype"]:
            raise DataError(f"{self.path}: holds {dtype} {list(shape)}, the index says {np.dtype(spec['dtype'])} "
                            f"{list(want)}: the shards do not match their index; rewrite them")
        self.rows, self.dtype, self.row_shape = rows, dtype, tuple(spec["shape"])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.meta, self.fd = meta, None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted, unique) of this file, one `preadv` per run of consecutive rows."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((rows.size, *self.row_shape), dtype=self.dtype)
        flat = out.reshape(rows.size, -1).view(np.uint8).reshape(rows.size, self.row_bytes)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, rows.size]):
            want = (b - a) * self.row_bytes
            got = os.preadv(self.fd, [memoryview(flat[a:b]).cast("B")], self.offset + int(rows[a]) * self.row_bytes)
            if got != want:
                raise DataError(f"{self.path}: short read at row {int(rows[a])} (file changed while training?)")
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardSource:
    """One split of a shard directory as a lazy row source (see `sources.TensorSource`)."""

    lazy = True

    def __init__(self, folder, split: str, index: dict | None = None):
        self.folder = Path(folder)
        self.index = index or read_index(self.folder)
        sp = self.index["splits"].get(split, {"rows": 0, "shards": []})
        self.split, self.n = split, int(sp["rows"])
        self.xs = [_Part(self.folder, s["x"], s["rows"], self.index["x"], f"{split} inputs") for s in sp["shards"]]
        self.ys = [_Part(self.folder, s["y"], s["rows"], self.index["y"], f"{split} labels") for s in sp["shards"]]
        self.starts = np.cumsum([0] + [s["rows"] for s in sp["shards"]]).astype(np.int64)
        if self.starts[-1] != self.n:
            raise DataError(f"{self.folder / 'index.json'}: the {split} shards hold {self.starts[-1]} rows, the index "
                            f"says {self.n}: rewrite the shards")

    def __len__(self) -> int:
        return self.n

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.index["x"]["shape"], dtype=np.int64))

    def take(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        x = np.empty((idx.size, self.in_dim), np.float32)
        y = np.empty((idx.size, *self.index["y"]["shape"]), np.dtype(self.index["y"]["dtype"]))
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard).tolist():
            where = np.flatnonzero(shard == s)
            local = idx[where] - self.starts[s]
            rows, inverse = np.unique(local, return_inverse=True)
            x[where] = self.xs[s].read(rows).reshape(rows.size, -1)[inverse]
            y[where] = self.ys[s].read(rows)[inverse]
        return torch.from_numpy(x), torch.from_numpy(y)

    def span(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(np.arange(lo, hi, dtype=np.int64))

    def files(self) -> list[_Part]:
        return [p for pair in zip(self.xs, self.ys) for p in pair]

    def close(self) -> None:
        for p in self.files():
            p.close()


def verify_part(part: _Part, check=None) -> str | None:
    """Hash one file against the index, reading it once in chunks of about 16 MiB, and pass each
    chunk of rows (a numpy array) to `check` (raises `ConfigError` on bad values), if given.
    Returns one line naming the damage (a changed file first: its values mean nothing), or None."""
    h = hashlib.sha256()
    per = max(1, (16 << 20) // max(part.row_bytes, 1))
    bad_values = None
    with open(part.path, "rb") as f:
        h.update(f.read(part.offset))
        for a in range(0, part.rows, per):
            r = min(per, part.rows - a)
            raw = f.read(r * part.row_bytes)
            h.update(raw)
            if check is not None and bad_values is None and len(raw) == r * part.row_bytes:
                try:
                    check(np.frombuffer(raw, dtype=part.dtype).reshape((r, *part.row_shape)))
                except ConfigError as e:
                    bad_values = str(e)
        h.update(f.read())
    if h.hexdigest() != part.meta["sha256"]:
        return (f"{part.path}: sha256 mismatch (its bytes changed since the shards were written): restore it or "
                "rewrite the shards")
    return bad_values


def finite(where: str):
    """A chunk check: every float value finite."""
    def check(a: np.ndarray) -> None:
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"{where}: non-finite values (NaN or inf): clean the data and rewrite the shards")
    return check
