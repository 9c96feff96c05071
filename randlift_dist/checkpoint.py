"""Resharding checkpoints that are verified on load and read only the rows a rank holds.

    <run.dir>/checkpoints/step_00000100/
      shard_0000.bin ...  one per lift-parallel rank: keyed row blocks (`rows.write_rows`)
      ds/                 DeepSpeed's own files (engine deepspeed, checkpoint.deepspeed_files)
      meta.json           written last: step, config, lift and data fingerprints; per shard its
                          size and block index (key range, offset, sha256 per block)
    <run.dir>/checkpoints/latest   the newest checkpoint written (a hint: the newest intact wins)

Rows carry global keys (edge rows `dst * n_u + src`, vertex rows the fibre index), sorted per
tensor and cut into blocks of about `BLOCK_BYTES`, so a checkpoint loads on any layout and a rank
reads and hashes only the blocks whose key range holds one of its keys: O(own rows + index).
Integrity: sha256 per block (blocks tile the file), computed while writing (hashlib: 1.9 GB/s on
one core here, 0.5 s per GB; crc32 was 6.5 GB/s but 32 bits). `find_intact` checks structure (meta
parses, files present, sizes match) and, with `verify`, every block of every file (split over the
ranks given a layout); `load_weights` checks every block it reads. Each problem is one line
naming the file; resuming (`load_latest`: O(own rows), or `find_latest`: hashes everything) falls
back to the newest intact checkpoint and says which.
Writing: `step_N.tmp/`, fsync, meta.json last, rename, then `latest`. `clean_partial` removes
`.tmp` leftovers (every save and start). A failed write (disk full included) removes the partial
directory and raises `CheckpointWriteError` on every rank; earlier checkpoints are untouched, and
rotation (`keep`) deletes one only when `keep` newer structurally intact ones exist.
Resuming with another lift, initial weights, optimizer or data (`cfg.data`, a data file's sha256)
is refused; data only unless `train.resume_allow_data_change` is true.

Measured on the 2-core CPU machine shared with other jobs (1-min load 11-16: times +-50%), warm
page cache, one process per loading rank, memory = peak RSS growth during `load_weights`; a
synthetic lift (two base edges, [16, 16] rows, Adam moments) saved from 2 ranks, block ownership:
  102M parameters (1.23 GB)  load at 1: before 5.0 s +1868 MB, after 6.6 s +1380 MB (own 1229 MB)
                             load at 4, per rank: before 1.1-1.4 s +660 MB, after 1.8-2.3 s +352 MB
                             (own 307 MB); save: before 12.1 s, after 9.5 s; find_intact: 3.3 s
  10M scalar rows (200 MB)   load at 1: before 3.8 s +428 MB, after 1.9 s +250 MB
                             load at 4, per rank: before 0.9-1.5 s +178-247 MB, after 0.7-0.8 s +70 MB
Before (torch.save, mmap) kept every page it gathered resident and argsorted every saved key array
on every rank; after reads own rows plus one 4 MiB block at a time and pays the sha256 of them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .data import data_identity
from .rows import RowsError, file_problem, read_rows, row_keys, verify_file, write_rows

FORMAT = 2
BLOCK_BYTES = 4 << 20  # target bytes per block: a 4 MiB read and hash per overlapping block


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files are damaged, truncated or missing (fall back to an older one)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoints are intact."""


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree(err: tuple[str, str] | None) -> tuple[str, str] | None:
    """Collective over the world when one is initialised: the first rank's error, on every rank."""
    if _world() == 1:
        return err
    errs: list[Any] = [None] * _world()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e is not None), None)


def _raise(err: tuple[str, str] | None) -> None:
    if err is not None:
        cls = {"write": CheckpointWriteError, "corrupt": CheckpointCorruptError}.get(err[0], CheckpointError)
        raise cls(err[1])


# ---------------------------------------------------------------- writing
def clean_partial(root: Path) -> list[str]:
    """Remove `step_*.tmp` directories and `latest.tmp` left by a crash; returns their names."""
    gone = sorted(Path(root).glob("step_*.tmp")) + sorted(Path(root).glob("latest.tmp"))
    for d in gone:
        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    return [d.name for d in gone]


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _write_problem(e: BaseException, where: Path, root: Path) -> tuple[str, str]:
    """One line for a failed write: disk full (ENOSPC, quota, torch's stream writer) or an I/O error."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
        s in text for s in ("PytorchStreamWriter failed", "basic_ios::clear", "iostream error"))
    free = shutil.disk_usage(root).free if root.is_dir() else -1
    latest = root / "latest"
    prev = latest.read_text().strip() if latest.is_file() else "none"
    what = "disk full while writing" if full else f"cannot write ({e.__class__.__name__}: {text.splitlines()[0] if text else ''})"
    return ("write", f"{what} checkpoint {where} ({free} bytes free): partial directory removed, previous "
                     f"checkpoint {prev} intact; free space on {root} or lower checkpoint.keep")


def _collect(engine):
    """This rank's rows sorted by key, one parameter at a time (a generator, so only one
    parameter's key-ordered copies exist at once): `(name, (keys [n], value [n, *row],
    {moment: [n, *row]}))`. Collective (ZeRO moments): every rank drains it. Rows already in key
    order are not copied. The consumer still holds the previous entry while the next one is made:
    its moments dict is emptied first (the copies go), so the consumer must be done with an
    entry when it asks for the next (`rows.write_rows` is)."""
    keys = row_keys(engine.net)
    for name, p in engine.net.named_parameters():
        k = keys[name]
        pick = (lambda t: t) if bool((k[1:] > k[:-1]).all()) else (
            lambda t, idx=torch.from_numpy(np.argsort(k, kind="stable")): t[idx])  # timsort: O(n) on sorted runs
        moments = {m: pick(v.detach().float().cpu()) for m, v in sorted(engine.moments(p).items())}
        yield name, (pick(torch.from_numpy(k)).numpy(), pick(engine.master_weight(p).detach().float().cpu()), moments)
        moments.clear()


def save(root: Path, step: int, cfg, lift, engine, layout, keep: int, block_bytes: int = BLOCK_BYTES) -> Path:
    """Collective: write checkpoint `step` atomically and rotate old ones. Returns its directory.

    Raises `CheckpointWriteError` on every rank when any rank's write fails; the partial
    directory is then removed and earlier checkpoints are untouched.
    """
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    err = None
    if layout.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_partial(root)
            tmp.mkdir()
        except OSError as e:
            err = _write_problem(e, tmp, root)
    _raise(_agree(err))
    entries = _collect(engine)
    shard, where = None, tmp / f"shard_{layout.lift_rank:04d}.bin"
    try:
        if layout.data_rank == 0:
            shard = write_rows(where, entries, block_bytes)
    except (OSError, RuntimeError) as e:
        err = _write_problem(e, where, root)
    for _ in entries:  # the rest (a failed write, or a rank that does not write): moments may be collective
        pass
    if _world() > 1:
        parts: list[Any] = [None] * _world()
        dist.all_gather_object(parts, (err, shard))
        err = next((e for e, _ in parts if e is not None), None)
        shards = sorted((s for _, s in parts if s is not None), key=lambda s: s["file"])
    else:
        shards = [shard]
    if err is None and cfg.checkpoint.deepspeed_files and getattr(engine, "save_native", None):
        try:
            engine.save_native(str(tmp / "ds"))  # collective inside DeepSpeed
        except (OSError, RuntimeError) as e:
            err = _write_problem(e, tmp / "ds", root)
        err = _agree(err)
    old = root / f"{final.name}.replaced.tmp"
    if err is None and layout.rank == 0:
        try:
            meta = {"format": FORMAT, "step": step, "config": cfg.to_dict(), "lift_fingerprint": lift.fingerprint(),
                    "lift": lift.to_dict(), "weight_seed": cfg.model.weight_seed, "data": data_identity(cfg),
                    "layout": {"lift_parallel": layout.lift_parallel, "data_parallel": layout.data_parallel},
                    "engine": engine.name, "optimizer": cfg.train.optimizer, "shards": shards}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # the same step written again: swap, then drop the old copy
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            (root / "latest.tmp").write_text(final.name)
            os.replace(root / "latest.tmp", root / "latest")
            _fsync_dir(root)
        except OSError as e:
            err = _write_problem(e, tmp / "meta.json", root)
            if old.exists() and not final.exists():
                os.replace(old, final)
    if err is not None and layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / "latest.tmp").unlink(missing_ok=True)
    _raise(_agree(err))
    if layout.rank == 0:
        _prune(root, keep)
    _agree(None)  # nobody returns before the rotation is done
    return final


def step_dirs(root: Path) -> list[Path]:
    """Finished checkpoint directories, newest step first."""
    done = [d for d in Path(root).glob("step_*") if d.name[5:].isdigit() and d.is_dir()]
    return sorted(done, key=lambda d: int(d.name[5:]), reverse=True)


def _prune(root: Path, keep: int) -> None:
    """Delete checkpoints older than the `keep` newest structurally intact ones."""
    intact = [d for d in step_dirs(root) if not structure_problems(d)]
    for d in step_dirs(root) if len(intact) >= keep else []:
        if int(d.name[5:]) < int(intact[keep - 1].name[5:]):
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- checking
def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, or a `CheckpointCorruptError` in one line."""
    f = Path(path) / "meta.json"
    if not Path(path).is_dir():
        raise CheckpointCorruptError(f"{path}: no such checkpoint directory")
    if not f.is_file():
        raise CheckpointCorruptError(f"{f}: missing (incomplete checkpoint)")
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"{f}: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{f}: format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                                     f"expected {FORMAT} (written by an older version without checksums)")
    missing = [k for k in ("step", "lift_fingerprint", "lift", "weight_seed", "optimizer", "data", "shards")
               if k not in meta] or [f"shards[{i}]" for i, sh in enumerate(meta["shards"]) if not isinstance(sh, dict)
                                     or {"file", "bytes", "params"} - set(sh)]
    if missing:
        raise CheckpointCorruptError(f"{f}: damaged (no {', '.join(missing)})")
    return meta


def structure_problems(path: Path, meta: dict | None = None) -> list[str]:
    """Cheap checks (no hashing): meta.json readable, every shard present with its recorded size."""
    try:
        meta = meta or read_meta(path)
    except CheckpointCorruptError as e:
        return [str(e)]
    return [p for s in meta["shards"] if (p := file_problem(Path(path) / s["file"], s["bytes"]))]


def find_intact(root: Path, verify: bool = True, layout=None) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root` and one line per problem met on the way.

    `verify`: also hash every shard file (else only the structure). With a `layout` of world size
    > 1 this is collective (every rank calls it) and the files are hashed round-robin over ranks.
    """
    root = Path(root)
    problems = []
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not (root / name).is_dir():
            problems.append(f"{latest}: names {name!r}, which does not exist")
    for d in step_dirs(root):
        bad = structure_problems(d) or (verify_checksums(d, layout) if verify else [])
        if not bad:
            return d, problems
        problems += bad
    return None, problems


def verify_checksums(path: Path, layout=None) -> list[str]:
    """Every block of every shard hashed: one line per damaged file (collective given a layout: files round-robin)."""
    world, rank = (layout.world_size, layout.rank) if layout is not None else (1, 0)
    bad = [p for i, s in enumerate(read_meta(path)["shards"]) if i % world == rank and (p := verify_file(path, s))]
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, bad)
        bad = [p for part in parts for p in part]
    return bad


def _stderr(line: str) -> None:
    print(f"randlift-train: checkpoint: {line}", file=sys.stderr, flush=True)


def _tell(report, layout, problems: list[str], path: Path | None, why: str = "") -> None:
    """Each problem in one line, then which checkpoint is used (rank 0 of `layout` only)."""
    if report is None or not problems or (layout is not None and layout.rank != 0):
        return
    for p in problems:
        report(p)
    report(f"resuming from {path}{why}" if path is not None else "no intact checkpoint: starting from step 0")


def find_latest(root: Path, verify: bool = True, layout=None, report: Callable[[str], None] | None = _stderr
                ) -> Path | None:
    """The newest intact checkpoint (None if none); reports problems and the fallback in one line each.

    Cleans partial `.tmp` directories first (rank 0 of `layout`, or every caller without one).
    """
    if layout is None or layout.rank == 0:
        clean_partial(root)
    path, problems = find_intact(root, verify, layout)
    _tell(report, layout, problems, path)
    return path


# ---------------------------------------------------------------- loading
def check_compatible(meta: dict, cfg, lift, path: Path) -> None:
    """Refuse another lift, other initial weights, another optimizer, or (unless allowed) other data."""
    if meta["lift_fingerprint"] != lift.fingerprint():
        old, new = meta["lift"], lift.to_dict()
        diffs = [k for k in ("base", "sizes", "degrees", "law", "seed", "block_size") if old.get(k) != new.get(k)]
        raise CheckpointError(
            f"checkpoint {path} was written for a different lift (differs in: {', '.join(diffs) or 'fingerprint'}); "
            f"resume with the same model.base and model.lift, or start a new run.dir (or train.resume=none)")
    if meta["weight_seed"] != cfg.model.weight_seed:
        raise CheckpointError(f"checkpoint {path} has model.weight_seed={meta['weight_seed']}, this run "
                              f"{cfg.model.weight_seed}: use the same seed or a new run.dir")
    if meta["optimizer"] != cfg.train.optimizer:
        raise CheckpointError(f"checkpoint {path} was trained with train.optimizer={meta['optimizer']}: "
                              f"resume with the same optimizer (this run: {cfg.train.optimizer})")
    saved_loss = meta.get("config", {}).get("train", {}).get("loss", "mse")
    if saved_loss != cfg.train.loss:
        raise CheckpointError(f"checkpoint {path} was trained with train.loss={saved_loss}: resume with the same loss "
                              f"(this run: {cfg.train.loss}) or start a new run.dir")
    if getattr(cfg.train, "resume_allow_data_change", False):
        return
    old, new = meta.get("data", {}), data_identity(cfg)  # the kind's settings, a file's sha256
    changed = [f"data.{k} {old.get(k)!r} -> {new.get(k)!r}" if not k.endswith("sha256") else
               "contents of data.path"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise CheckpointError(f"checkpoint {path} was trained on other data (changed: {', '.join(changed)}); "
                              "resume with the same data settings, pass train.resume_allow_data_change=true to "
                              "continue on the new data, or start a new run.dir")


def load_weights(path: Path, cfg, lift, net) -> tuple[int, dict]:
    """Put the checkpoint's weights into this rank's parameters (before the engine is built).

    Returns the step and this rank's saved rows (their moments go to `Engine.restore`). Reads and verifies only the
    blocks holding this rank's rows. Collective when a process group is initialised (every rank
    calls it): a problem on any rank raises the same error on every rank, before any weight changes.
    """
    err, state, step = None, None, 0
    try:
        meta = read_meta(path)
        check_compatible(meta, cfg, lift, path)
        state, step = read_rows(path, meta["shards"], row_keys(net)), int(meta["step"])
        bad = [f"{n!r} {tuple(state[n]['value'].shape)} vs {tuple(p.shape)} here" for n, p in net.named_parameters()
               if state[n]["value"].shape != p.shape]
        if bad:
            raise CheckpointError(f"checkpoint {path} holds other tensor shapes ({bad[0]}): it was written for another "
                                  "network (model.out_dim?); use a new run.dir or train.resume=none")
    except CheckpointError as e:
        err = ("corrupt" if isinstance(e, CheckpointCorruptError) else "config", str(e))
    except RowsError as e:
        err = ("corrupt", str(e)) if e.corrupt else ("config", f"checkpoint {path}: {e}: it was written for "
                                                               "another network; use a new run.dir or train.resume=none")
    _raise(_agree(err))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(state[name]["value"].to(p.dtype))
    return step, state


def load_latest(root: Path, cfg, lift, net, report: Callable[[str], None] | None = _stderr, layout=None,
                damaged: dict[Path, list[str]] | None = None) -> tuple[Path | None, int, dict | None]:
    """Resume from the newest checkpoint whose own rows verify: `(path or None, step, state)`.

    Collective when a process group is initialised. Damaged checkpoints (structure, a block this
    layout reads, or in `damaged`: path -> its problems) are skipped with one line each; other
    refusals (another lift, other data) raise. O(own rows) per rank, unlike `find_latest`.
    """
    if layout is None or layout.rank == 0:
        clean_partial(root)
    _agree(None)
    problems: list[str] = []
    for d in step_dirs(root):
        bad = (damaged or {}).get(d) or structure_problems(d)
        if not bad:
            try:
                step, state = load_weights(d, cfg, lift, net)
            except CheckpointCorruptError as e:
                bad = [str(e)]
            else:
                _tell(report, layout, problems, d, " (newest intact checkpoint)")
                return d, step, state
        problems += bad
    _tell(report, layout, problems, None)
    return None, 0, None

