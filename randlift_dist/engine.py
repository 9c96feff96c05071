"""Training engines: DeepSpeed (the default) and plain torch, with one interface.

Both take a sharded `LiftedNetwork` and a `Layout` and do, per step: forward and backward on this
replica's slice of the global batch (in `micro_batches` equal micro-batches whose gradients are
accumulated: the same gradient as one pass, with activation memory of one micro-batch), MSE loss,
gradient averaging over the data-parallel group, global gradient norm (each shard counted once: a
sum of squares over the lift-parallel group), clipping and the optimizer step. The loss and the
gradient norm they report do not depend on the layout, and are the same on every rank (they come
out of all-reduces), so every rank takes the same decision when one is not finite:
`train_step(..., skip_nonfinite=True)` then drops the update (the torch engine checks before the
optimizer step; DeepSpeed's step cannot be undone, so there a non-finite gradient found after its
step is reported as `applied`).

One schedule for every engine: there is no scheduler object. Before each step the engine sets
`lr = train.lr * lr_factor(cfg, step)` (linear warm-up, then cosine or constant) on every param
group of the optimizer that steps: the torch optimizer, the inner optimizer that DeepSpeed's ZeRO
or bf16 wrapper steps on its flat fp32 partitions, or DeepSpeed's CPU Adam under optimizer offload.
DeepSpeed has no scheduler and no optimizer of its own to override it, and the lr reported is the
lr used. A resume restores the step count (hence the lr), the moments and Adam's step count (hence
its bias correction), and under DeepSpeed ZeRO / bf16 the fp32 master weights (`restore`).

DeepSpeed itself is imported only by `engine_deepspeed` (lazily): its config, the mpu, the CPU
Adam and the accessors of its partitioned master weights and moments live there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from . import engine_deepspeed as dsx
from .config import Config
from .engine_deepspeed import require_deepspeed  # noqa: F401 - the entry point's preflight imports it from here
from .layout import Layout
from .tasks import Task
from .limits import NORM_CHUNK

MOMENT_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer of `train.optimizer`; `fused` Adam updates in one kernel per parameter
    (no per-step temporaries the size of the parameters)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=t.lr, weight_decay=t.weight_decay, **({"fused": True} if fused else {}))


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def torch_moments(optimizer: torch.optim.Optimizer, p: torch.nn.Parameter, name: str) -> dict[str, torch.Tensor]:
    """A torch optimizer's moments of one parameter (absent ones, like SGD's without momentum, left out)."""
    st = optimizer.state.get(p, {})
    return {k: st[k] for k in MOMENT_KEYS[name] if st.get(k) is not None}


def set_torch_state(optimizer: torch.optim.Optimizer, p: torch.nn.Parameter, moments: dict[str, torch.Tensor],
                    step: int, name: str) -> None:
    """Restore a torch optimizer's per-parameter state (moments, and Adam's step count)."""
    st = optimizer.state[p]
    for k, v in moments.items():
        st[k] = v.to(p.device, p.dtype).clone()
    if name != "sgd" and moments:
        st["step"] = torch.tensor(float(step))


def _sum_squares(g: torch.Tensor, chunk: int = NORM_CHUNK) -> torch.Tensor:
    """Sum of squares in float64, a chunk at a time through one reused float64 buffer (`dot`:
    no float64 copy of a whole gradient, and no fresh copy and square per chunk: those were 2 x
    8 MiB of new memory per chunk, 0.8 GB per step at 52M parameters, each page faulted in)."""
    flat = g.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=g.device)
    if g.dtype == torch.float64:
        return torch.dot(flat, flat)
    buf = torch.empty(min(chunk, flat.numel()), dtype=torch.float64, device=g.device)
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for c in flat.split(chunk):
        b = buf[: c.numel()]
        b.copy_(c)
        total += torch.dot(b, b)
    return total


def _step_result(loss: float, norm: float, lr: float) -> dict[str, Any]:
    """A step's report; `finite` is the same on every rank (loss and norm come out of all-reduces)."""
    return {"loss": loss, "grad_norm": norm, "lr": lr, "finite": math.isfinite(loss) and math.isfinite(norm)}


def grad_norm(grads: list[torch.Tensor], layout: Layout) -> float:
    """Global L2 norm of sharded gradients: each shard's sum of squares, summed over the lift group."""
    sq = torch.stack([_sum_squares(g) for g in grads if g is not None]).sum().reshape(1)
    return float(_all_reduce(sq, layout.lift_group).sqrt())


class Engine:
    """Common parts: the loss, the learning rate, evaluation."""

    name = "base"

    def __init__(self, net, cfg: Config, layout: Layout):
        self.net, self.cfg, self.layout = net, cfg, layout
        self.step_count = 0
        self.micro_batches = cfg.micro_batches(layout.data_parallel)
        self.task = Task(cfg.train.loss, net.out_dim)
        self.train_hits = 0  # top-1 hits of the training batches since the trainer last read them

    def _micro(self, x: torch.Tensor, y: torch.Tensor):
        """`(x, y)` micro-batches of this replica's batch (equal sizes: the config checks it)."""
        k = self.micro_batches
        return zip(x.chunk(k), y.chunk(k)) if k > 1 else [(x, y)]

    def restore(self, state: dict | None, step: int) -> None:
        """Continue at `step`: optimizer moments and Adam's step count from a checkpoint's rows
        (`state`: parameter name -> {"value", "moments"}) and the step count, which is all the
        learning-rate schedule depends on."""
        if state is not None:
            for name, p in self.net.named_parameters():
                self.load_moments(p, state[name]["moments"], step)
        self.step_count = step

    def lr(self) -> float:
        """The learning rate of the next step (every engine sets it on its optimizer before stepping)."""
        return self.cfg.train.lr * lr_factor(self.cfg, self.step_count)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task's loss of a (micro-)batch, in float32 whatever the precision (`tasks.py`)."""
        out = self.forward(x)
        self.train_hits += self.task.correct(out, y)
        return self.task.loss(out, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.device()))

    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The task's summed loss and top-1 hits over these rows (`Task.sums`) in one no-grad forward:
        the caller hands one evaluation chunk (`limits.eval_chunk`, `Trainer._split_sums`); collective
        over the lift group."""
        return self.task.sums(self.forward(x), y)

    def replica_mean(self, value: float) -> float:
        """Average of a per-replica scalar over the data-parallel group."""
        t = torch.tensor([value], dtype=torch.float64)
        return float(_all_reduce(t, self.layout.data_group)) / self.layout.data_parallel

    def master_weight(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full-precision value of a parameter (what checkpoints store)."""
        return p.detach()

    # engines implement: train_step, moments, load_moments


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, net, cfg: Config, layout: Layout):
        super().__init__(net, cfg, layout)
        self.params = [p for p in net.parameters()]
        self.optimizer = make_optimizer(cfg, self.params, fused=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, skip_nonfinite: bool = False) -> dict[str, float]:
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # No gradients between steps: the first micro-batch's backward hands each weight gradient
        # to `.grad` as it is (no second copy the size of the largest parameter while it is added)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for xm, ym in self._micro(x, y):
            loss = self._loss(xm, ym)
            (loss / self.micro_batches).backward()
            loss_sum += loss.item()
        loss_mean = self.replica_mean(loss_sum / self.micro_batches)
        D = self.layout.data_parallel
        for p in self.params:  # a parameter the loss does not reach (zeros, as with zero_grad before)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if D > 1:  # average over data-parallel replicas, one flat all-reduce
            flat = torch.cat([g.reshape(-1) for g in grads])
            _all_reduce(flat, self.layout.data_group).div_(D)
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
        norm = grad_norm(grads, self.layout)
        self.step_count += 1
        out = _step_result(loss_mean, norm, lr)
        if not out["finite"] and skip_nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            return {**out, "applied": False}
        clip = self.cfg.train.grad_clip
        if clip > 0:
            coef = clip / (norm + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)
        del grads
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # evaluation and checkpoints run without them
        return {**out, "applied": True}

    def moments(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        return torch_moments(self.optimizer, p, self.cfg.train.optimizer)

    def load_moments(self, p: torch.nn.Parameter, moments: dict[str, torch.Tensor], step: int) -> None:
        set_torch_state(self.optimizer, p, moments, step, self.cfg.train.optimizer)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, net, cfg: Config, layout: Layout):
        super().__init__(net, cfg, layout)
        if not dist.is_initialized():
            raise RuntimeError("the DeepSpeed engine needs a process group: build the Layout with "
                               "Layout.create(..., need_group=True)")
        params = list(net.parameters())
        # the optimizer that steps, and whose param groups get each step's lr (see the module doc)
        self.optimizer = dsx.host_adam(cfg, params) if cfg.parallel.offload_optimizer else make_optimizer(cfg, params)
        self.engine = dsx.initialize(net, self.optimizer, cfg, layout)
        self.net = self.engine.module
        self._inner_state_made = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        return self.engine(x.to(self.engine.device, dtype))

    def restore(self, state: dict | None, step: int) -> None:
        """Also the fp32 master weights: DeepSpeed made its masters (bf16) from the module's weights
        after casting them to bf16, so without this a resumed bf16 run would go on from rounded ones."""
        super().restore(state, step)
        if state is not None and self._fragment_api():
            for name, p in self.net.named_parameters():
                dsx.set_full_fp32_param(p, state[name]["value"])

    def train_step(self, x: torch.Tensor, y: torch.Tensor, skip_nonfinite: bool = False) -> dict[str, float]:
        lr = self.lr()
        for g in self.optimizer.param_groups:  # ZeRO's flat partitions, bf16's masters, or the host Adam's
            g["lr"] = lr
        micro = list(self._micro(x, y))
        loss_sum, norm = 0.0, None
        for i, (xm, ym) in enumerate(micro):
            loss = self._loss(xm, ym)
            self.engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
            loss_sum += loss.item()
            if i == len(micro) - 1 and not self._fragment_api():  # stage 0 fp32: the norm is not recorded
                norm = grad_norm([p.grad for p in self.net.parameters()], self.layout)
                out = _step_result(self.replica_mean(loss_sum / len(micro)), norm, lr)
                if skip_nonfinite and not out["finite"]:
                    self._drop_step()
                    self.step_count += 1
                    return {**out, "applied": False}
            self.engine.step()  # the optimizer steps at the accumulation boundary only
        self.step_count += 1
        if norm is None:
            ds_norm = self.engine.get_global_grad_norm()
            norm = float(ds_norm) if ds_norm is not None else float("nan")
        return {**_step_result(self.replica_mean(loss_sum / len(micro)), norm, lr), "applied": True}

    def _drop_step(self) -> None:
        """Skip the optimizer update of a non-finite step (stage 0 fp32): clear the gradients and
        move DeepSpeed's counters past the boundary without stepping."""
        self.engine.zero_grad()
        self.engine.micro_steps += 1
        self.engine.global_steps += 1
        self.engine.global_samples += self.cfg.train.batch_size

    def _fragment_api(self) -> bool:
        return self.cfg.parallel.zero_stage > 0 or self.cfg.parallel.precision == "bf16"

    def moments(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        if not self._fragment_api():  # stage 0, fp32: the client torch optimizer itself
            return torch_moments(self.optimizer, p, self.cfg.train.optimizer)
        out = {k: dsx.full_optimizer_state(p, k) for k in MOMENT_KEYS[self.cfg.train.optimizer]}
        return {k: v for k, v in out.items() if v is not None}

    def master_weight(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master copy of a parameter (bf16 / ZeRO keep it apart from the module's)."""
        return dsx.full_fp32_param(p) if self._fragment_api() else p.detach()

    def load_moments(self, p: torch.nn.Parameter, moments: dict[str, torch.Tensor], step: int) -> None:
        if not self._fragment_api():  # stage 0, fp32: the client torch optimizer itself
            set_torch_state(self.optimizer, p, moments, step, self.cfg.train.optimizer)
            return
        if not self._inner_state_made:
            dsx.ensure_inner_state(self.engine, self.cfg, step)
            self._inner_state_made = True
        for k, v in moments.items():
            dsx.set_full_optimizer_state(p, v, k)

    def save_native(self, path: str) -> None:
        """DeepSpeed's own checkpoint files (resuming always uses the layout-independent copy)."""
        self.engine.save_checkpoint(path, tag="ds", client_state={"step": self.step_count})


def build_engine(net, cfg: Config, layout: Layout) -> Engine:
    if cfg.parallel.engine == "torch":
        return TorchEngine(net, cfg, layout)
    return DeepSpeedEngine(net, cfg, layout)
