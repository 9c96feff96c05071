"""Run-wide facts of an estimate, read from the config once: the layout, batches (training
micro-batch, every evaluation chunk), device, dtype, engine state, kernels and data (`Run`).

Every decision the runtime makes is asked of the runtime's own function: the world and batch
checks (`Config.check_world`), the kernel (`ops.kernels.choose_impl`), the evaluation chunk
(`limits.eval_chunk`) and the training rows an evaluation runs (`data.sources.eval_rows`), the
split sizes (`data.split_sizes`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from ..data import split_sizes
from ..data.sources import eval_rows
from ..limits import eval_chunk
from ..ops import kernels as _kernels
from . import terms as tm

DEVICES = ("cpu", "cuda")


class EstimateError(ValueError):
    """The run cannot be estimated as asked; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data term needs (`terms.data_bytes`), read from the config in `data_spec` only."""

    kind: str
    n_train: int
    n_test: int
    in_dim: int
    label: int  # bytes of one sample's label
    lazy: bool  # rows read from shards on demand (O(batch)), not arrays in memory (O(N))
    loss: str


def data_spec(cfg: Config, in_dim: int, out_dim: int) -> DataSpec:
    """What the data and logit terms read: `data.kind` (`shards` is read lazily), the rows of each
    split (`data.split_sizes`: the settings, a file's headers or a shard index; nothing is loaded)
    and `train.loss` (`cross_entropy`: int64 labels)."""
    loss = cfg.train.loss
    n_train, n_test = split_sizes(cfg)
    return DataSpec(cfg.data.kind, n_train, n_test, in_dim, tm.label_bytes(loss, out_dim), cfg.data.kind == "shards",
                    loss)


def eval_batches(splits: tuple[int, ...], data_parallel: int, step: int) -> tuple[int, ...]:
    """Every batch size the no-grad forward of an evaluation runs on some replica: for each split
    evaluated (the test rows, and up to `train.eval_train_max` training rows), each replica takes
    its floor-split slice (`Trainer._split_sums`) in chunks of `step`."""
    sizes = set()
    for n_split in splits:
        for k in range(data_parallel):
            n = n_split * (k + 1) // data_parallel - n_split * k // data_parallel
            if n >= step:
                sizes.add(step)
            if n % step:
                sizes.add(n % step)
    return tuple(sorted(sizes))


def train_rows_evaluated(n_train: int, limit: int | None) -> int:
    """Training rows each evaluation runs (`data.sources.eval_rows`; `train.eval_train_max` 0: none)."""
    if limit == 0 or n_train == 0:
        return 0
    rows = eval_rows(n_train, limit)
    return n_train if rows is None else int(rows.size)


@dataclasses.dataclass(frozen=True)
class Run:
    """Run-wide facts: layout, batches, device, dtype, engine state, kernels, data."""

    world_size: int
    lift_parallel: int
    data_parallel: int
    batch: int  # per replica
    micro_batch: int
    eval_batches: tuple[int, ...]
    device: str
    dtype: torch.dtype
    engine: tm.EngineState
    accumulate: bool  # later micro-batches add their weight gradients to .grad
    regen: bool
    impl: str
    triton: bool
    partition: str
    exchange: str
    threshold: float
    out_dim: int
    data: DataSpec

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def es(self) -> int:
        return self.engine.es

    def kernel(self, d_v: int, d_u: int, batch: int) -> str:
        return _kernels.choose_impl(self.impl, d_v, d_u, batch, self.dtype, self.device, self.triton)


def make_run(cfg: Config, world_size: int | None, device: str | None, triton: bool | None,
             in_dim: int, out_dim: int) -> Run:
    par, tr = cfg.parallel, cfg.train
    L = par.lift_parallel
    P = L if world_size is None else world_size
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise EstimateError(f"--world-size {P!r}: must be a positive integer, a multiple of "
                            f"parallel.lift_parallel={L} (world = lift_parallel x data_parallel)")
    D = cfg.check_world(P)  # the trainer's own checks of the world, batch and micro-batch
    device = device or ("cuda" if par.backend == "nccl" else "cpu")
    if device not in DEVICES:
        raise EstimateError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    ds = par.engine == "deepspeed"
    dtype = torch.bfloat16 if ds and par.precision == "bf16" else (
        torch.float64 if not ds and tr.dtype == "float64" else torch.float32)
    es = torch.empty(0, dtype=dtype).element_size()
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if tr.momentum > 0 else 0}[tr.optimizer]
    eng = tm.EngineState(ds, par.zero_stage, D, es, moments, par.offload_optimizer)
    B = tr.batch_size // D
    Bm = tr.micro_batch_size or B
    data = data_spec(cfg, in_dim, out_dim)
    splits = (data.n_test, train_rows_evaluated(data.n_train, tr.eval_train_max))
    return Run(P, L, D, B, Bm, eval_batches(splits, D, eval_chunk(tr.batch_size, D, tr.micro_batch_size)), device, dtype, eng,
               cfg.micro_batches(D) > 1, cfg.model.topology == "regenerate", cfg.model.impl,
               device == "cuda" if triton is None else bool(triton), par.partition, par.exchange,
               par.allgather_threshold, out_dim, data)
