"""Use what a run trained: `load_run` (the network of a checkpoint, its config and its task) and the
plumbing the `predict`, `evaluate` and `export` commands share.

    run = load_run("runs/tiny")              # newest intact checkpoint, world size 1, CPU
    out = run.net(x)                         # [B, in_dim] -> [B, out_dim]

What `load_run` reads: `<run>/config.yaml` (the resolved config the trainer wrote) and one checkpoint
of `<run>/checkpoints/`. It builds the network the way the trainer does (`network_kwargs`: the
same lift, plan strategy, readout, kernel and dtype), puts the checkpoint's weights in with
`checkpoint.load_weights` (every block it reads is sha256-verified) and returns it in eval mode.
The checkpoint is the newest one whose structure is intact and whose blocks verify (a damaged one
is reported in one line and the next older one tried, as the trainer's resume does: O(own rows)
per rank; at world size 1 that reads, and so verifies, every block), or the one of `step=N`.
Nothing in the run directory is written or removed: a run may still be training.

World size: without a process group the network is the whole lift in this process. Inside an
initialised process group every rank calls `load_run` (collective) and gets its shard of
`Layout.from_initialized(config.parallel.lift_parallel)`, or of the `layout` given; any layout
works, whatever the run was trained on (checkpoints are keyed by global rows).
Weights: checkpoints hold fp32 master weights, so a bf16 DeepSpeed run loads in fp32 (its own
evaluation ran on bf16 weights), and a `train.dtype=float64` run in float64 from fp32 values.
Errors are `RunError` (a `ConfigError`: one line, exit 2 in the commands).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config
from .launch_env import LaunchEnvError, discover_env
from .layout import Layout, LayoutError, check_degrees
from .lift import LiftError
from .model import LiftedNetwork
from .parallelize import shard_network
from .partition import PartitionError
from .tasks import Task

EXIT_OK, EXIT_ERROR, EXIT_INPUT = 0, 1, 2
INPUT_ERRORS = (ConfigError, LayoutError, PartitionError, LaunchEnvError, LiftError, ckpt.CheckpointError)


class RunError(ConfigError):
    """A run directory cannot be used (missing, no config, no intact checkpoint); one line (exit 2)."""


@dataclasses.dataclass
class LoadedRun:
    """A trained network with what it was trained for."""

    net: LiftedNetwork  # eval mode; this rank's shard inside a process group
    config: Config  # the run's resolved config (run.dir: where it was loaded from)
    task: Task  # loss and metrics (`tasks.py`)
    step: int  # the checkpoint's step
    checkpoint: Path  # the checkpoint directory the weights came from
    layout: Layout | None = None  # None: world size 1, no process group

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_dim]` -> `[B, out_dim]` outputs (logits for classification); collective when sharded."""
        return self.net(x.to(next(self.net.parameters()).device))


def _stderr(line: str) -> None:
    print(f"randlift: checkpoint: {line}", file=sys.stderr, flush=True)


def read_run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run directory (`config.yaml`), with `run.dir` set to where it is now."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} does not exist: pass the run.dir of a training run")
    f = run_dir / "config.yaml"
    if not f.is_file():
        raise RunError(f"{run_dir}: no config.yaml, so not a run directory written by randlift_dist.train "
                       "(pass the run.dir of a training run)")
    try:  # a resume path recorded in the config may be gone: it does not matter for loading
        cfg = load_config(f, ["train.resume=none"])
    except ConfigError as err:
        raise RunError(f"{f}: {err}") from None
    cfg.run.dir = str(run_dir)
    return cfg


def network_kwargs(cfg: Config, base, device: torch.device | None = None) -> dict[str, Any]:
    """The keyword arguments of `shard_network` for this config: the one place the trainer and
    `load_run` build a network from. With a `device` that is not CUDA, `impl=triton` becomes `auto`
    (same sums, another kernel: a run trained on GPUs loads on a CPU)."""
    m, p = cfg.model, cfg.parallel
    impl = m.impl if m.impl != "triton" or (device is not None and device.type == "cuda") else "auto"
    return dict(strategy=p.partition, exchange=p.exchange, allgather_threshold=p.allgather_threshold,
                topology=m.topology, out_dim=cfg.out_dim(base), readout_scale=m.readout_scale,
                weight_scale=m.weight_scale, seed=m.weight_seed, readout_init=m.readout_init, impl=impl,
                recompute=m.recompute, dtype=torch.float64 if cfg.train.dtype == "float64" else torch.float32)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The finished checkpoint directories of a run, newest step first."""
    return ckpt.step_dirs(Path(run_dir) / "checkpoints")


def candidates(run_dir: Path, step: int | None) -> list[Path]:
    """The checkpoints to try, newest first (only that of `step` when given), or a `RunError`."""
    dirs = checkpoint_dirs(run_dir)
    if step is not None:
        want = [d for d in dirs if int(d.name[5:]) == step]
        if not want:
            have = ", ".join(str(int(d.name[5:])) for d in reversed(dirs)) or "none"
            raise RunError(f"{run_dir}: no checkpoint at step {step} (checkpoints at steps: {have})")
        return want
    if not dirs:
        raise RunError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} (the run saved none yet: "
                       "train it further, or lower checkpoint.every)")
    return dirs


def _load_into(dirs: list[Path], cfg: Config, lift, net, step: int | None,
               report: Callable[[str], None] | None, rank: int) -> tuple[Path, int]:
    """Weights of the first intact checkpoint of `dirs` into `net` (collective in a group): `(path, step)`."""
    compat = copy.deepcopy(cfg)
    compat.train.resume_allow_data_change = True  # the data (or its file) may have moved since
    problems: list[str] = []
    for d in dirs:
        bad = ckpt.structure_problems(d)
        if not bad:
            try:
                got = ckpt.load_weights(d, compat, lift, net)[0]
            except ckpt.CheckpointCorruptError as err:
                bad = [str(err)]
            else:
                if problems and report is not None and rank == 0:
                    for p in problems:
                        report(p)
                    report(f"using {d} (newest intact checkpoint)")
                return d, got
        problems += bad
    if step is not None:
        raise RunError(f"checkpoint at step {step} is damaged: {problems[0]}")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise RunError(f"{cfg.run.dir}: no intact checkpoint ({len(dirs)} damaged): {problems[0]}{more}")


def load_run(run_dir: str | Path, step: int | None = None, device: str | torch.device | None = None,
             layout: Layout | None = None, report: Callable[[str], None] | None = _stderr) -> LoadedRun:
    """The network of a run's newest intact checkpoint (or of `step`), its config and its task.

    Args:
      run_dir: a training run's `run.dir`.
      step: load the checkpoint of this step (verified) instead of the newest intact one.
      device: where the network goes (default: the layout's device, else the CPU).
      layout: shard over this layout (collective). Default: inside an initialised process group,
        `Layout.from_initialized(config.parallel.lift_parallel)`; else world size 1.
      report: gets one line per damaged checkpoint skipped (default: stderr).
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dirs = candidates(run_dir, step)  # before anything is built: a run with none fails at once
    base, lift = cfg.build_lift()
    if layout is None and dist.is_available() and dist.is_initialized():
        layout = Layout.from_initialized(cfg.parallel.lift_parallel)
    dev = torch.device(device) if device is not None else (layout.device() if layout is not None
                                                             else torch.device("cpu"))
    kw = network_kwargs(cfg, base, dev)
    net = shard_network(base, lift, layout, kw.pop("strategy"), kw.pop("exchange"), kw.pop("allgather_threshold"),
                        **kw)
    path, got = _load_into(dirs, cfg, lift, net, step, report, 0 if layout is None else layout.rank)
    net.to(dev).eval()
    return LoadedRun(net, cfg, Task(cfg.train.loss, net.out_dim), got, path, layout)


# ---------------------------------------------------------------- the commands' shared plumbing
def start_layout(cfg: Config, lift_parallel: int | None) -> Layout | None:
    """The layout of a command under torchrun / srun (None at world size 1): `lift_parallel`
    ranks share a replica (default: the run's `parallel.lift_parallel`, or 1 when it does not
    divide the world). The degrees are checked before any process group starts."""
    _, world_size, _ = discover_env()
    if world_size == 1:
        return None
    lp = lift_parallel or cfg.parallel.lift_parallel
    if lift_parallel is None and world_size % lp:
        lp = 1
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    if backend == "nccl" and not torch.cuda.is_available():
        backend = "gloo"
    check_degrees(world_size, lp)
    return Layout.create(lp, backend, timeout_s=cfg.parallel.setup_timeout_s)


def replica_rows(n: int, layout: Layout | None) -> tuple[int, int]:
    """`[lo, hi)`: the contiguous part of `n` rows this rank's data-parallel replica computes."""
    if layout is None:
        return 0, n
    return n * layout.data_rank // layout.data_parallel, n * (layout.data_rank + 1) // layout.data_parallel


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with the exit statuses of `train.py`: 0 done, 2 bad input (one line,
    said once by rank 0), 1 anything else (one line per rank). Inside a process group the process
    ends here (`os._exit`, skipping gloo's thread teardown, which can abort)."""
    rank = discover_env()[0]
    try:
        code = body()
    except INPUT_ERRORS as err:
        code = EXIT_INPUT
        if rank == 0:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # noqa: BLE001 - one line instead of a wall of tracebacks under launchers
        if os.environ.get("RANDLIFT_TRACEBACK"):
            raise
        code = EXIT_ERROR
        print(f"{prog}: rank {rank}: error: {type(err).__name__}: {one_line(err)[:500]}", file=sys.stderr,
              flush=True)
    if dist.is_available() and dist.is_initialized():
        if code == EXIT_OK:
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

