"""Export a trained lift to one self-contained `.safetensors` file, and load it back for inference.

    python -m randlift_dist.export --run runs/tiny --out tiny.safetensors [--step N]
    net = randlift_dist.export.load("tiny.safetensors")   # a torch.nn.Module: [B, in_dim] -> [B, out_dim]

The file (safetensors: a JSON header and raw little-endian tensors, no pickle, nothing executed
on load) holds
- tensors: every parameter of the world-size-1 `LiftedNetwork`, under its parameter name, with
  its rows in the canonical order of `rows.py` (edge rows by key `dst * n_u + src`, i.e. sorted by
  `(dst, src)`; bias and readout rows by fibre index), whatever layout it was trained or saved on;
- metadata (strings): `format`, `format_version`, `lift` (`Lift.to_dict()`: the base graph, fibre
  sizes, law, degrees, seed, block size) and its fingerprint, `network` (the `LiftedNetwork`
  arguments: out_dim, readout, initial-weight settings, topology, dtype), `tensors` (per tensor
  its row count and the sha256 of its sorted int64 row keys), `edges` (per base edge its tensor,
  edge count and that sha256: the hash of the lifted edge list), and, when known, `config` (the
  run's resolved config), `task` and `step`.

The lifted edges are not stored: `load` draws them again from the lift's seed (the sampling is
counter-based per block, the same property every layout and every checkpoint already relies on)
and checks each base edge's sha256 before any weight is used, so a sampler that draws another
graph is refused in one line instead of giving other predictions. Why not store them: at d = 1
the indices (two int64 per edge, 16 B) would be four times the weights (4 B per fp32 parameter);
with one int32 source per edge plus in-degrees they would still double the file. Drawing them
costs the time of building the network once; topology `regenerate` keeps no index at all in
memory, as in training.

`load` needs neither DeepSpeed nor a process group: it builds a world-size-1 `LiftedNetwork`
(`randlift_dist.model` imports nothing heavy) and copies the weights in. `save` takes a
`LiftedNetwork` (a shard inside a process group: collective, rows gathered over the lift-parallel
group, global rank 0 writes) or a `runs.LoadedRun`. The command exports a run in one process,
reading every row from the checkpoint (no gather): use it for large lifts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import Config, ConfigError
from .graph import BaseGraph, GraphError
from .launch_env import discover_env
from .lift import Lift
from .model import LiftedNetwork
from .plan import build_plan
from .rows import gather_rows, row_keys
from .runs import EXIT_OK, LoadedRun, load_run, run_command

FORMAT = "randlift_dist.export"
FORMAT_VERSION = 1
PROG = "randlift-export"


class ExportError(ConfigError):
    """An export cannot be written or read; one line naming the file and the fix (exit 2)."""


def _sha256(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()


def _network_args(net: LiftedNetwork) -> dict[str, Any]:
    dtype = next(net.parameters()).dtype
    return {"out_dim": net.out_dim, "readout_scale": net.readout_scale, "weight_scale": net.weight_scale,
            "seed": net.seed, "readout_init": net.readout_init, "topology": net.plan.topology,
            "dtype": str(dtype).replace("torch.", "")}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save(net_or_run: LiftedNetwork | LoadedRun, path: str | Path, config: Config | None = None,
         step: int | None = None) -> Path:
    """Write the network to `path` (a `.safetensors` file, atomically). Collective when the network
    is a shard of a process group; every rank returns the path once it is written."""
    run = net_or_run if isinstance(net_or_run, LoadedRun) else None
    net = run.net if run is not None else net_or_run
    config = config if config is not None else (run.config if run is not None else None)
    step = step if step is not None else (run.step if run is not None else None)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"export path {str(path)!r}: use a .safetensors file name")
    names = {id(p): n for n, p in net.named_parameters()}
    rows = gather_rows(net, dict(net.named_parameters()))  # {name: (sorted keys, rows)}: collective
    err = None
    if _rank() == 0:
        tensors = {n: t.contiguous() for n, (_, t) in rows.items()}
        table = {n: {"rows": int(k.size), "keys_sha256": _sha256(k)} for n, (k, _) in rows.items()}
        edges = {}
        for e in net.base.edges:
            n = names[id(net.edge_weight(e.key))]
            edges[str(e)] = {"tensor": n, "count": table[n]["rows"], "sha256": table[n]["keys_sha256"]}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "lift": json.dumps(net.lift.to_dict()),
                "lift_fingerprint": net.lift.fingerprint(), "network": json.dumps(_network_args(net)),
                "tensors": json.dumps(table), "edges": json.dumps(edges),
                "config": json.dumps(config.to_dict() if config is not None else None),
                "task": json.dumps({"loss": config.train.loss, "out_dim": net.out_dim} if config is not None else None),
                "step": json.dumps(step)}
        err = _write(path, tensors, meta)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise ExportError(err)
    return path


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0o22)  # safetensors creates the file 0600: give it the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"cannot write {path} ({e.__class__.__name__}: {e.strerror or e})"
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an export, JSON values decoded; an `ExportError` when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors' own error types: one line
        raise ExportError(f"{path}: not a readable .safetensors file ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]})") from None
    if raw.get("format") != FORMAT:
        raise ExportError(f"{path}: not a randlift_dist export (metadata format {raw.get('format')!r}): "
                          "write one with python -m randlift_dist.export")
    if raw.get("format_version") != str(FORMAT_VERSION):
        raise ExportError(f"{path}: export format version {raw.get('format_version')!r}; this version of "
                          f"randlift_dist reads version {FORMAT_VERSION}")
    try:
        return {k: (v if k in ("format", "format_version", "lift_fingerprint") else json.loads(v))
                for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: damaged metadata ({err})") from None


def lift_from_dict(d: dict[str, Any]) -> Lift:
    """The `Lift` of a `Lift.to_dict()` mapping."""
    base = BaseGraph.from_dict(d["base"])
    degrees = {tuple(k.split("->", 1)): v for k, v in d["degrees"].items()}
    return Lift(base, dict(d["sizes"]), d["law"], degrees, int(d["seed"]), int(d["block_size"]))


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         topology: str | None = None) -> LiftedNetwork:
    """The exported network as a world-size-1 `LiftedNetwork` in eval mode: `[B, in_dim] -> [B, out_dim]`.

    `dtype` (default: the exported one), `topology` (`stored` / `regenerate`, default: the
    exported one). The module's `metadata` attribute holds the file's metadata (config, task, step).
    """
    path = Path(path)
    meta = read_metadata(path)
    try:
        lift = lift_from_dict(meta["lift"])
    except (GraphError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{path}: damaged lift metadata ({err})") from None
    if lift.fingerprint() != meta.get("lift_fingerprint"):
        raise ExportError(f"{path}: the lift rebuilt from the metadata has fingerprint {lift.fingerprint()}, the "
                          f"file says {meta.get('lift_fingerprint')}: damaged metadata")
    kw = dict(meta["network"])
    saved_dtype, saved_topology = kw.pop("dtype"), kw.pop("topology")
    dt, topo = dtype or getattr(torch, saved_dtype), topology or saved_topology
    plan = build_plan(lift, None, topology=topo)  # draws the edges again (world size 1, no group)
    net = LiftedNetwork(lift.base, lift, plan, None, impl="auto", dtype=dt, **kw)
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    params = dict(net.named_parameters())
    if set(tensors) != set(params):
        raise ExportError(f"{path}: holds tensors {sorted(tensors)}, the network has {sorted(params)}: damaged file")
    keys, table = row_keys(net), meta["tensors"]
    edge_of = {v["tensor"]: k for k, v in meta["edges"].items()}
    with torch.no_grad():
        for name, p in params.items():
            k = keys[name]
            order = np.argsort(k, kind="stable")
            t = tensors.pop(name)
            if tuple(t.shape) != tuple(p.shape) or _sha256(k[order]) != table[name]["keys_sha256"]:
                what = f"the lifted edges of base edge {edge_of[name]}" if name in edge_of else f"the rows of {name}"
                raise ExportError(f"{path}: {what} drawn again from the lift's seed differ from the exported ones "
                                  f"({tuple(t.shape)} vs {tuple(p.shape)} here, or another sha256): this version of "
                                  "randlift_dist builds another network; load it with the version that wrote it")
            p[torch.from_numpy(order)] = t.to(dt)
    net.metadata = meta
    return net.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Export a trained run to one .safetensors file.")
    ap.add_argument("--run", "--run-dir", dest="run", required=True,
                    help="the run directory (run.dir of a training run); under torchrun spell it --run-dir")
    ap.add_argument("--out", required=True, help="the .safetensors file to write")
    ap.add_argument("--step", type=int, default=None, help="export the checkpoint of this step (default: newest intact)")
    return ap.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out={str(out)!r}: use a .safetensors file name")
    if not out.parent.is_dir():
        raise ExportError(f"--out={str(out)!r}: directory {str(out.parent)!r} does not exist")
    if discover_env()[1] > 1:
        raise ExportError("the export runs in one process (it reads every row from the checkpoint): run "
                          "python -m randlift_dist.export, not under a launcher")
    run = load_run(args.run, step=args.step)
    save(run, out)
    n = sum(p.numel() for p in run.net.parameters())
    print(f"{PROG}: {args.run} (checkpoint {run.checkpoint.name}, step {run.step}, {n:,} parameters) -> {out} "
          f"({out.stat().st_size:,} bytes)", file=sys.stderr, flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
