"""Entry point: `python -m randlift_dist.train [--config FILE] [key.path=value ...]` (`randlift-train`).

Works as a plain process (world size 1), under `torchrun --nproc_per_node N` (single or multi
node), and under `srun` with one task per process (ranks from SLURM_PROCID / SLURM_NTASKS). With
no `--config` it runs the embedded default: a tiny teacher-student task on the CPU.

Every check of the input runs before any process group starts (`preflight`); `--preflight
--world-size N` runs only those checks, for launchers. Exit codes: 0 done (or already done),
2 bad input (config, layout, a checkpoint that does not fit), 3 a non-finite loss or gradient,
1 anything else (a peer that stopped answering, an I/O error), each with one line on stderr
naming the step and what was being done; under a launcher only rank 0 prints a config error, and
rank 0 writes `<run.dir>/exit_status.json` (`{"code", "message"}`) on any error exit.

Memory (`limit_heap`, before anything is built): glibc's mmap threshold is fixed at
`HEAP_MMAP_THRESHOLD` (4 MiB), so every tensor of that size or more has its own mapping and goes
back to the system when freed, and torch is asked for huge pages for its big CPU tensors
(`THP_MEM_ALLOC_ENABLE=1` unless it is set, as `launch/run.sh` does), so those fresh mappings cost
few page faults. glibc's default raises the threshold up to 32 MiB as big blocks are freed, then
keeps freed activations, gradients and the collectives' buffers (in gloo's thread arenas too) in
heaps that the next step reuses only in part: +0.4 GB per rank, varying from run to run, on a
2-rank 52M lift (docs/scale.md). `RANDLIFT_MALLOC=default` leaves both as they are.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, ConfigError, describe_fields, dump_config, load_config
from .data import build_dataset
from .engine import require_deepspeed
from .estimate import MMAP_THRESHOLD
from .launch_env import discover_env
from .layout import Layout, LayoutError
from .trainer import NonFiniteError, RunFinished, Trainer

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_NONFINITE = 0, 1, 2, 3
HEAP_MMAP_THRESHOLD = MMAP_THRESHOLD  # bytes: allocations this big or bigger get their own mapping (4 MiB)
_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def limit_heap(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (which also stops glibc from raising it), so
    freed tensors of that size or more are unmapped at once instead of kept in the heap, and set
    `THP_MEM_ALLOC_ENABLE=1` unless it is set (torch reads it at its first CPU allocation: call this
    before any tensor exists). True if the threshold was set; False off glibc, or with
    `RANDLIFT_MALLOC=default` (then nothing is changed).

    Why huge pages: tensors between 4 and 32 MiB are now fresh pages each step. With 4 KiB pages
    that cost (CPU time per step, one thread): +15 % at 52M parameters on one rank, and +22 % /
    +65 % step time on two ranks at 206M / 52M; with huge pages it was within run-to-run noise
    (measurements in docs/scale.md)."""
    if os.environ.get("RANDLIFT_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="randlift-train", description="Train a random sparse lift.")
    ap.add_argument("--config", default=None, help="YAML config file (default: the embedded tiny run)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its doc and exit")
    ap.add_argument("--preflight", action="store_true",
                    help="only check the config and the layout for --world-size ranks (exit 0, or 2 with one line)")
    ap.add_argument("--world-size", type=int, default=None, help="with --preflight: the number of ranks to check for")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.lift.size=512")
    return ap.parse_args(argv)


def preflight(cfg: Config, world_size: int) -> None:
    """Every check that needs the world size or the machine but no process group."""
    cfg.check_world(world_size)
    p = cfg.parallel
    if p.engine == "deepspeed":
        require_deepspeed()
    if not torch.cuda.is_available():
        if p.backend == "nccl":
            raise ConfigError("parallel.backend=nccl needs CUDA GPUs, and this machine has none: "
                              "use parallel.backend=auto or gloo")
    if cfg.model.impl == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.impl=triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU "
                          "interpreter): use model.impl=auto")
    base = cfg.build_lift()[0]
    build_dataset(cfg, base, cfg.out_dim(base))  # labels, widths, files: checked (and kept for the run)


def _write_status(cfg: Config | None, rank: int, code: int, message: str) -> None:
    if cfg is None or rank != 0:
        return
    try:
        d = Path(cfg.run.dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "exit_status.json").write_text(json.dumps({"code": code, "message": message}) + "\n")
    except OSError:
        pass


def _should_print(code: int, rank: int) -> bool:
    """Say an error once: bad input and non-finite steps are the same on every rank (rank 0 says
    it); under our launchers rank 0's message is printed by the launcher from exit_status.json.
    Other failures (a peer that stopped answering) are each rank's own."""
    if os.environ.get("RANDLIFT_LAUNCHER_REPORTS") == "1" and rank == 0:
        return False
    return rank == 0 or code not in (EXIT_INPUT, EXIT_NONFINITE)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit_heap()
    if args.help_config:
        print("\n".join(describe_fields()))
        return EXIT_OK
    rank, world_size, _ = discover_env()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return EXIT_OK
        preflight(cfg, args.world_size or world_size)
        if args.preflight:
            return EXIT_OK
    except (ConfigError, LayoutError) as err:
        if rank == 0:  # every rank found the same: say it once
            print(f"randlift-train: config error: {_one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    if Path(cfg.run.dir, "exit_status.json").exists() and rank == 0:
        Path(cfg.run.dir, "exit_status.json").unlink()
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    layout = trainer = None
    try:
        layout = Layout.create(cfg.parallel.lift_parallel, backend, timeout_s=cfg.parallel.setup_timeout_s,
                               need_group=cfg.parallel.engine == "deepspeed")
        trainer = Trainer(cfg, layout)
        result = trainer.fit()
    except RunFinished as done:
        code, msg = EXIT_OK, _one_line(done)
    except (ConfigError, ckpt.CheckpointError, LayoutError) as err:
        code, msg = EXIT_INPUT, f"error: {_one_line(err)}"
        if isinstance(err, ckpt.CheckpointWriteError):
            code = EXIT_ERROR
    except NonFiniteError as err:
        code, msg = EXIT_NONFINITE, f"error: {_one_line(err)}"
    except KeyboardInterrupt:
        code, msg = 130, "interrupted (second Ctrl-C): no checkpoint of the current step"
    except Exception as err:  # noqa: BLE001 - one line instead of a wall of tracebacks under launchers
        phase = trainer.phase if trainer is not None else "set-up"
        code, msg = EXIT_ERROR, f"error during {phase}: {type(err).__name__}: {_one_line(err)[:500]}"
        if os.environ.get("RANDLIFT_TRACEBACK"):
            raise
    else:
        code = EXIT_OK
        keys = ("loss", "accuracy", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
        msg = ", ".join([f"final step {result['step']}"] + [f"{k} {result[k]:.6g}" for k in keys if k in result])
    me = layout.rank if layout is not None else rank
    if code == EXIT_OK:
        if me == 0:
            print(msg if msg.startswith("final") else f"randlift-train: {msg}", flush=True)
    else:
        if _should_print(code, me):
            print(f"randlift-train: rank {me}: {msg}", file=sys.stderr, flush=True)
        _write_status(cfg, me, code, msg)
    if dist.is_initialized():
        if code == EXIT_OK:
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip gloo's thread teardown at exit, which can abort
    return code


if __name__ == "__main__":
    sys.exit(main())
