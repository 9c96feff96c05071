"""DeepSpeed glue: the only module that imports deepspeed (lazily, never at package import time).

What lives here is what the DeepSpeed engine (`engine.DeepSpeedEngine`) needs from DeepSpeed:
- `import_deepspeed`: the import, quiet on the normal path. With no GPU, `DS_ACCELERATOR=cpu` is set
  before the first import (unless the user set it), so DeepSpeed does not warn on every rank that it
  fell back to the CPU; on ranks other than 0 DeepSpeed's logger only shows errors; torch's
  FutureWarning about the deprecated gather DeepSpeed calls is not shown.
- `initialize`: `deepspeed.initialize` with a client optimizer, no scheduler, and the print of
  DeepSpeed's CPU communication op ("... built successfully", every rank, every run, built or
  not) dropped; anything else DeepSpeed prints passes through.
- `ds_config`: DeepSpeed's configuration generated from ours, never patched after loading. It has
  no `optimizer` and no `scheduler` section: the engine always passes its own optimizer (a torch
  optimizer, or `DeepSpeedCPUAdam` under optimizer offload: `host_adam`) and sets the learning rate
  of every step itself, so the schedule is one function of the config whatever the engine, ZeRO
  stage, precision or offload (DeepSpeed's own `WarmupCosineLR` warms up logarithmically and
  ignores `last_epoch`, so a resume under it warmed up again).
- `LiftMPU`: our layout as DeepSpeed's model-parallel unit (lift-parallel = its model parallel).
- Fragment accessors: the full fp32 master copy and optimizer state of one parameter under ZeRO
  1/2 or bf16 (DeepSpeed keeps them as flat partitions), and `ensure_inner_state`, which creates the
  inner optimizer's lazily made state so a checkpoint's moments and step count can be written in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Any

import torch

from .config import Config, ConfigError
from .launch_env import discover_env
from .layout import Layout

_NOISE = re.compile(r"^DeepSpeed \S+ built successfully$")  # deepspeed.comm.torch.build_shm_op's print


def import_deepspeed(rank: int | None = None):
    """`import deepspeed`, quietly (see the module doc); a `ConfigError` when it is not installed.

    `rank`: this process's global rank when known (else read from the launcher's environment)."""
    if "deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ and not _accelerator():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed picks anyway, said on every rank otherwise
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError(f"parallel.engine=deepspeed but deepspeed cannot be imported ({err}): "
                          "pip install deepspeed, or set parallel.engine=torch") from None
    # DeepSpeed gathers with torch's deprecated name (ours use all_gather_single): one FutureWarning
    # per rank and run that nobody can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if rank is None:
        rank = discover_env()[0]
    if rank != 0:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        for h in logger.handlers:
            h.setLevel(logging.ERROR)
    return deepspeed


def _accelerator() -> bool:
    """Whether torch sees a device DeepSpeed would pick instead of the CPU (CUDA, XPU, MPS)."""
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or bool(mps and mps.is_available())


def require_deepspeed() -> None:
    """Fail with a config error, before any process group, when DeepSpeed cannot be imported."""
    import_deepspeed()


class LiftMPU:
    """DeepSpeed's view of our layout: lift-parallel = its model parallel axis."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_model_parallel_group(self):
        return self.layout.lift_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.lift_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.lift_parallel

    def get_data_parallel_group(self):
        return self.layout.data_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data_parallel


def ds_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    """DeepSpeed's configuration, generated from ours (never patched after loading)."""
    p, t = cfg.parallel, cfg.train
    micro = t.batch_size // layout.data_parallel
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro // cfg.micro_batches(layout.data_parallel),
        "gradient_accumulation_steps": cfg.micro_batches(layout.data_parallel),
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    if p.offload_optimizer:  # the config refused offload with SGD or ZeRO 0; the optimizer is host_adam's
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return ds


def host_adam(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer under offload: DeepSpeed's vectorised CPU Adam (JIT-built once per machine into
    TORCH_EXTENSIONS_DIR), Adam or AdamW as `train.optimizer` says (DeepSpeed's `"type": "Adam"`
    would have been AdamW), with torch's defaults (betas 0.9 / 0.999, eps 1e-8)."""
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t = cfg.train
    return DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay, adamw_mode=t.optimizer == "adamw")


def initialize(net: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, layout: Layout):
    """`deepspeed.initialize` with our optimizer and no scheduler; returns DeepSpeed's engine."""
    deepspeed = import_deepspeed(layout.rank)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config(cfg, layout),
                                                   mpu=LiftMPU(layout))
    finally:
        kept = [ln for ln in out.getvalue().splitlines() if not _NOISE.match(ln.strip())]
        if kept:
            print("\n".join(kept), flush=True)
    if engine.lr_scheduler is not None or engine.basic_optimizer is not optimizer:
        raise RuntimeError("DeepSpeed replaced the engine's optimizer or added a scheduler: the learning rate "
                           "would not be the config's (ds_config must have no optimizer or scheduler section)")
    return engine


def is_host_adam(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "DeepSpeedCPUAdam"


def full_fp32_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master copy of `p` (collective over the data-parallel group under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p)


def set_full_fp32_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write `value` (the full parameter) into this rank's fragment of `p`'s fp32 master copy."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value.to(torch.float32))


def full_optimizer_state(p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(p, key)


def set_full_optimizer_state(p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(p, value.to(torch.float32), key)


def ensure_inner_state(engine, cfg: Config, step: int) -> None:
    """ZeRO / bf16 keep flat fp32 partitions in the inner optimizer, whose state is made lazily on
    its first step: create it (zeros) with Adam's step count `step`, so that saved moments can be
    written in and the next update's bias correction is that of step `step + 1`."""
    inner, t = engine.basic_optimizer, cfg.train
    host = is_host_adam(inner)  # DeepSpeedCPUAdam counts steps in a Python int, torch's Adam in a tensor
    for group in inner.param_groups:
        for flat in group["params"]:
            st = inner.state[flat]
            if t.optimizer == "sgd":
                if t.momentum > 0:
                    st.setdefault("momentum_buffer", torch.zeros_like(flat))
            else:
                st.setdefault("exp_avg", torch.zeros_like(flat, dtype=torch.float32))
                st.setdefault("exp_avg_sq", torch.zeros_like(flat, dtype=torch.float32))
                st["step"] = int(step) if host else torch.tensor(float(step))
    if host:
        _replay_host_adam(inner, step)
    # link each parameter's fragment to the new state (DeepSpeed does this after its first step)
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _replay_host_adam(opt, step: int) -> None:
    """Bring the C++ side of a fresh `DeepSpeedCPUAdam` to step `step` as an uninterrupted run has it.

    It keeps beta1^t and beta2^t as running float products, multiplied once per step; a fresh one
    asked for step t + 1 computes pow(beta, t + 1) instead, which differs in the last bits (a
    resumed curve then drifts from the uninterrupted one by ~1e-6 relative over a few tens of
    steps). Stepping it through 1..t on empty tensors repeats the same products: the resumed run's
    bias correction is then bitwise the uninterrupted run's. ~1 us per step, once per resume."""
    g, empty = opt.param_groups[0], torch.empty(0)
    b1, b2 = g["betas"]
    for k in range(1, int(step) + 1):
        opt.ds_opt_adam.adam_update(opt.opt_id, k, g["lr"], b1, b2, g["eps"], g["weight_decay"],
                                    g["bias_correction"], empty, empty, empty, empty)
