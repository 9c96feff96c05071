"""Keyed rows: layout-independent views of a (possibly sharded) lifted network, and the row-file format of checkpoints.

Every tensor of a `LiftedNetwork` is a set of rows with global keys: edge rows are keyed by the
lifted edge `(src, dst)`, bias and readout rows by the vertex index in its fibre. The canonical
global order is the world-size-1 order: edges sorted by `(dst, src)`, vertices by index. These
helpers move per-rank rows to that order, so tests can compare a shard with one process; checkpoints
store the same keys (`checkpoint.py`) and so can be resharded.

Keyed row files (`write_rows` / `read_rows`, the checkpoint shard format): per tensor, rows sorted
by key and cut into blocks of about `block_bytes`; a block is one contiguous byte range
`keys int64 [r] | value f32 [r, *row] | moment f32 [r, *row] ...` whose `[kmin, kmax]`, first row,
offset and sha256 go into a JSON-able index. `read_rows` binary-searches each block's key range
in the reader's sorted own keys and reads (and hashes) only the overlapping blocks: O(own rows +
index), never a whole file or a whole saved key array.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _own_rows(net, key: str) -> np.ndarray:
    """Global fibre indices of the rows of the bias / readout parameter `v<i>` on this rank."""
    vertex_of = getattr(net, "vertex_of", None) or net._vname
    own = getattr(net, "own_rows", None) or net.vertices
    return np.asarray(own(vertex_of(key)), dtype=np.int64)


def _edge_keys(net, e) -> np.ndarray:
    """Keys `dst * n_u + src` of this rank's rows of edge parameter `e`. A regenerated edge's
    keys are filled block range by block range (no edge list of the whole parameter)."""
    n_u = net.lift.n(e.src)
    plan = getattr(net, "plan", None)
    ep = plan.edges[e.key] if plan is not None else None
    if ep is None or ep.blocks is None:
        src, dst = net.edge_index(e.key)
        return np.asarray(dst, np.int64) * n_u + np.asarray(src, np.int64)
    ptr, nb = ep.blocks.edge_ptr, ep.blocks.blocks.size
    out = np.empty(ep.n_edges, np.int64)
    for i0 in range(0, nb, 64):
        i1 = min(i0 + 64, nb)
        src, dst = plan.block_global_edges(e.key, i0, i1)
        np.multiply(dst, n_u, out=out[ptr[i0]:ptr[i1]])
        out[ptr[i0]:ptr[i1]] += src
    return out


class RowKeys(Mapping):
    """`{parameter name: int64 global key of each of its rows on this rank}`, computed when a
    name is looked up and not kept: a checkpoint holds one parameter's keys at a time.

    Edge weights `edges.<i>.weight` are keyed by lifted edge (`dst * n_u + src`); every per-vertex
    parameter (`<dict>.v<i>`: biases, readouts, layer-norm gains and shifts) by fibre member."""

    VERTEX_DICTS = ("biases", "readouts", "norm_gains", "norm_shifts")

    def __init__(self, net):
        self.net = net
        self._edges = {f"edges.{i}.weight": e for i, e in enumerate(net.base.edges)}
        self._names = list(self._edges) + [f"{d}.{n}" for d in self.VERTEX_DICTS for n in getattr(net, d, {})]

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._edges:
            return _edge_keys(self.net, self._edges[name])
        if name not in self._names:
            raise KeyError(name)
        return _own_rows(self.net, name.split(".", 1)[1])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def row_keys(net) -> RowKeys:
    """For every parameter name, the int64 global key of each of its rows on this rank (lazy)."""
    return RowKeys(net)


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
    parts = _all_gather_objects(mine, net.comm.lift_group)
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


# ---------------------------------------------------------------- keyed row files
class RowsError(ValueError):
    """A keyed row file cannot be read: `corrupt` (bytes damaged, truncated, missing) or not."""

    def __init__(self, message: str, corrupt: bool):
        super().__init__(message)
        self.corrupt = corrupt


def write_rows(path: Path, entries, block_bytes: int) -> dict[str, Any]:
    """Write `(name, (sorted keys [n], value [n, *row] f32, {moment: [n, *row] f32}))` pairs (an
    iterable, consumed one tensor at a time; or a dict of them) block by block.

    Returns the file's index: `{file, bytes, params: {name: {rows, row, moments, row_bytes, blocks:
    {start, kmin, kmax, offset, sha256}}}}`; the blocks tile the file, so their digests cover every
    byte (`verify_file`). The file is fsynced before returning.
    """
    params: dict[str, Any] = {}
    with open(path, "wb") as f:
        for name, (keys, value, moments) in (entries.items() if isinstance(entries, dict) else entries):
            n, row = keys.size, list(value.shape[1:])
            row_bytes = 8 + 4 * int(np.prod(row, dtype=np.int64)) * (1 + len(moments))
            per = max(1, block_bytes // row_bytes)
            blocks: dict[str, list] = {"start": [], "kmin": [], "kmax": [], "offset": [], "sha256": []}
            for a in range(0, n, per):
                b = min(n, a + per)
                h = hashlib.sha256()
                blocks["offset"].append(f.tell())
                for part in [keys[a:b], value[a:b].numpy()] + [m[a:b].numpy() for m in moments.values()]:
                    mv = memoryview(np.ascontiguousarray(part)).cast("B")
                    f.write(mv)
                    h.update(mv)
                blocks["start"].append(a)
                blocks["kmin"].append(int(keys[a]))
                blocks["kmax"].append(int(keys[b - 1]))
                blocks["sha256"].append(h.hexdigest())
            params[name] = {"rows": n, "row": row, "moments": list(moments), "row_bytes": row_bytes,
                            "blocks": blocks}
            # drop this entry (and the views into its last moment) before the next one is made:
            # the producer (`checkpoint._collect`) builds one parameter's copies at a time
            part = mv = None
            del keys, value, moments, part, mv
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    return {"file": Path(path).name, "bytes": size, "params": params}


def _spans(pm: dict):
    """`(block, first row, rows)` of every block of one tensor's index entry."""
    starts = pm["blocks"]["start"] + [pm["rows"]]
    return ((b, starts[b], starts[b + 1] - starts[b]) for b in range(len(starts) - 1))


def sha256_file(f: Path) -> str:
    """sha256 of a whole file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_problem(f: Path, size: int) -> str | None:
    """One line when file `f` is missing or not `size` bytes long (empty, truncated, too long)."""
    if not f.is_file():
        return f"{f}: missing"
    got = f.stat().st_size
    if got == size:
        return None
    return f"{f}: {'empty' if got == 0 else 'truncated' if got < size else 'too long'} ({got} bytes, expected {size})"


def verify_file(folder: Path, s: dict) -> str | None:
    """Hash every block of one indexed file (O(file), one pass): one line naming the damage, or None."""
    spans = sorted((pm["blocks"]["offset"][b], r * pm["row_bytes"], pm["blocks"]["sha256"][b], f"{name} rows {a}..{a + r}")
                   for name, pm in s["params"].items() for b, a, r in _spans(pm))
    reader, pos = _Reader(folder), 0
    try:
        for off, n, digest, what in spans:
            if off != pos:
                return f"{Path(folder) / s['file']}: damaged index (a gap or overlap at byte {pos})"
            reader.read(s, off, n, digest, what)
            pos += n
    except RowsError as e:
        return str(e)
    finally:
        reader.close()
    return None if pos == s["bytes"] else f"{Path(folder) / s['file']}: {s['bytes'] - pos} bytes not covered by the index"


class _Reader:
    """Verified reads of blocks; each file opened once, its size checked on opening."""

    def __init__(self, folder: Path):
        self.folder, self.files = Path(folder), {}

    def read(self, s: dict, offset: int, nbytes: int, digest: str, what: str) -> bytearray:
        f = self.folder / s["file"]
        if s["file"] not in self.files:
            bad = file_problem(f, s["bytes"])
            if bad:
                raise RowsError(bad, True)
            try:
                self.files[s["file"]] = open(f, "rb")
            except OSError as e:
                raise RowsError(f"{f}: unreadable ({e.strerror})", True) from None
        fh = self.files[s["file"]]
        buf = bytearray(nbytes)
        fh.seek(offset)
        if fh.readinto(buf) != nbytes:
            raise RowsError(f"{f}: truncated inside {what} (bytes {offset}..{offset + nbytes})", True)
        if hashlib.sha256(buf).hexdigest() != digest:
            raise RowsError(f"{f}: sha256 mismatch in {what} (bytes {offset}..{offset + nbytes} changed "
                            "since they were written)", True)
        return buf

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def read_rows(folder: Path, shards: list[dict], keys: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The rows with the given keys, from the files indexed by `shards` (`write_rows` indexes).

    `keys`: `{name: int64 [n_own]}` in the caller's row order. Returns `{name: {"value": [n_own,
    *row], "moments": {m: [n_own, *row]}}}` (float32, same order). Raises `RowsError` when a read
    block is damaged (`corrupt`) or a tensor or a key is absent (not `corrupt`).
    """
    out: dict[str, dict[str, Any]] = {}
    reader = _Reader(folder)
    try:
        for name, mine in keys.items():
            order = np.argsort(mine, kind="stable")
            sk = mine[order]  # [n_own] sorted own keys; order maps them back to the caller's rows
            per = [(s, s["params"].get(name)) for s in shards]
            if not per or any(pm is None for _, pm in per):
                raise RowsError(f"no tensor {name!r}", False)
            row = tuple(per[0][1]["row"])
            width = int(np.prod(row, dtype=np.int64))
            value = torch.zeros((mine.size,) + row)  # [n_own, *row]
            moments = {m: torch.zeros((mine.size,) + row) for _, pm in per for m in pm["moments"]}
            found = np.zeros(mine.size, dtype=bool)
            for s, pm in per:
                bl = pm["blocks"]
                lo = np.searchsorted(sk, np.asarray(bl["kmin"], np.int64), "left")
                hi = np.searchsorted(sk, np.asarray(bl["kmax"], np.int64), "right")
                wanted = set(np.flatnonzero(hi > lo).tolist())
                for b, a, r in (span for span in _spans(pm) if span[0] in wanted):
                    buf = reader.read(s, bl["offset"][b], r * pm["row_bytes"], bl["sha256"][b],
                                      f"{name} rows {a}..{a + r}")
                    bkeys = np.frombuffer(buf, np.int64, r)  # [r] sorted saved keys of the block
                    want = sk[lo[b]:hi[b]]
                    pos = np.minimum(np.searchsorted(bkeys, want), r - 1)
                    hit = bkeys[pos] == want
                    rows = order[lo[b]:hi[b]][hit]
                    whole = rows.size == r  # every row of the block is wanted, in order: no gather
                    for j, m in enumerate(["value"] + pm["moments"]):
                        arr = np.frombuffer(buf, np.float32, r * width, 8 * r + 4 * j * r * width).reshape((r,) + row)
                        (value if m == "value" else moments[m]).numpy()[rows] = arr if whole else arr[pos[hit]]
                    found[rows] = True
            if not found.all():
                raise RowsError(f"{int((~found).sum())} rows of {name!r} are not in it", False)
            out[name] = {"value": value, "moments": moments}
    finally:
        reader.close()
    return out
