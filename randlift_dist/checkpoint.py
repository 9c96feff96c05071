"""Resharding checkpoints: weights and optimizer moments keyed by global lifted indices.

Layout on disk (`<run.dir>/checkpoints/`):

    step_000100/
      meta.json           step, resolved config, lift fingerprint, layout, engine, files
      shard_0000.pt ...   one per lift-parallel rank: {param name: {keys, value, moments}}
      ds/                 DeepSpeed's own files (engine deepspeed, checkpoint.deepspeed_files)
    latest                name of the newest complete checkpoint

Every row of every tensor is stored with its global key (edge rows: `dst * n_u + src`; vertex
rows: the index in the fibre), so a checkpoint loads on any lift-parallel or data-parallel size:
each rank reads only its rows, by key, from memory-mapped shards. Atomicity: everything is written into
`step_N.tmp/`, then renamed to `step_N/` and only then is `latest` replaced (write + rename), so a
crash while saving never leaves a half-written checkpoint as the latest. Resuming with another
lift (base, size, degree, law, seed, block size) or other initial weights is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .export import row_keys


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def _barrier(layout) -> None:
    if layout.world_size > 1 or dist.is_initialized():
        dist.barrier()


def save(root: Path, step: int, cfg, lift, engine, layout, keep: int) -> Path:
    """Collective: write checkpoint `step` atomically. Returns its directory."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(layout)
    net = engine.net
    keys = row_keys(net)
    entries = {}
    for name, p in net.named_parameters():  # moments may be collective (ZeRO): every rank computes
        value = engine.master_weight(p)
        entries[name] = {"keys": torch.from_numpy(keys[name]), "value": value.detach().float().cpu().clone(),
                         "moments": {k: v.detach().float().cpu().clone() for k, v in engine.moments(p).items()}}
    if layout.data_rank == 0:
        torch.save(entries, tmp / f"shard_{layout.lift_rank:04d}.pt")
    if cfg.checkpoint.deepspeed_files and engine.name == "deepspeed":
        engine.save_native(str(tmp / "ds"))
    _barrier(layout)
    if layout.rank == 0:
        meta = {"step": step, "config": cfg.to_dict(), "lift_fingerprint": lift.fingerprint(),
                "lift": lift.to_dict(), "weight_seed": cfg.model.weight_seed,
                "layout": {"lift_parallel": layout.lift_parallel, "data_parallel": layout.data_parallel},
                "engine": engine.name, "optimizer": cfg.train.optimizer,
                "shards": [f"shard_{r:04d}.pt" for r in range(layout.lift_parallel)]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        _prune(root, keep, final.name)
    _barrier(layout)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(d for d in root.glob("step_*") if d.is_dir() and not d.name.endswith(".tmp"))
    for d in done[:-keep]:
        if d.name != newest:
            shutil.rmtree(d, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (None if there is none)."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        d = root / latest.read_text().strip()
        if (d / "meta.json").is_file():
            return d
    done = sorted(d for d in root.glob("step_*") if (d / "meta.json").is_file() and not d.name.endswith(".tmp"))
    return done[-1] if done else None


def check_compatible(meta: dict, cfg, lift, path: Path) -> None:
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


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def _select_mine(path: Path, meta: dict, net) -> dict[str, dict[str, Any]]:
    """This rank's rows of every saved tensor: `{name: {value, moments}}` in parameter row order.

    Shard files are memory-mapped and only the rows this rank holds are read, so loading costs
    O(saved keys of one shard + own rows) at a time, whatever the number of saved shards.
    """
    mine = row_keys(net)
    out: dict[str, dict[str, Any]] = {name: {"value": None, "moments": {}} for name in mine}
    found = {name: np.zeros(keys.size, dtype=bool) for name, keys in mine.items()}
    for f in meta["shards"]:
        part = torch.load(Path(path) / f, map_location="cpu", weights_only=True, mmap=True)
        for name, keys in mine.items():
            if name not in part:
                raise CheckpointError(f"checkpoint {path} has no tensor {name!r}: it was written for another "
                                      "network; use a new run.dir or train.resume=none")
            saved = part[name]["keys"].numpy()
            order = np.argsort(saved, kind="stable")
            pos = np.minimum(np.searchsorted(saved[order], keys), max(saved.size - 1, 0))
            hit = saved[order][pos] == keys if saved.size else np.zeros(keys.size, dtype=bool)
            if not hit.any():
                continue
            src = torch.from_numpy(order[pos[hit]])
            dst = torch.from_numpy(np.flatnonzero(hit))
            entry = out[name]
            for key, tensor in [("value", part[name]["value"])] + list(part[name]["moments"].items()):
                holder = entry if key == "value" else entry["moments"]
                if holder.get(key) is None:
                    holder[key] = tensor.new_zeros((keys.size,) + tuple(tensor.shape[1:]))
                holder[key][dst] = tensor[src]
            found[name] |= hit
    for name, hit in found.items():
        if not hit.all():
            raise CheckpointError(f"checkpoint {path} lacks {int((~hit).sum())} rows of {name!r}: it was written "
                                  "for a different lift; use a new run.dir or train.resume=none")
    return out


def load_weights(path: Path, cfg, lift, net) -> tuple[int, dict]:
    """Put the checkpoint's weights into this rank's parameters (before the engine is built).

    Returns the step and this rank's saved rows (for `load_moments`).
    """
    meta = read_meta(path)
    check_compatible(meta, cfg, lift, path)
    state = _select_mine(path, meta, net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(state[name]["value"].to(p.dtype))
    return int(meta["step"]), state


def load_moments(state: dict, step: int, engine) -> None:
    """Put the checkpoint's optimizer moments into the engine (after it is built)."""
    for name, p in engine.net.named_parameters():
        engine.load_moments(p, state[name]["moments"], step)
