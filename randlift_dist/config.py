"""Typed run configuration: dataclasses with a one-line doc per field, YAML files, dotted overrides.

`load_config(path, overrides)` reads a YAML file (or, when `path` is None, the embedded default:
the dataclass defaults below, a tiny teacher-student run that `configs/tiny.yaml` spells out), applies `key.path=value` overrides (values parsed as YAML scalars), rejects
unknown keys, checks types and choices, and validates each section where it lives. Every error is
a `ConfigError` naming the key, the bad value and the fix; nothing here starts a process group.
Values that depend on the world (the data-parallel degree, DeepSpeed's batch sizes) are derived
later (`derive`), never written in the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_parse import ConfigError, apply_overrides, build, doc
from .config_parse import describe_fields as _describe_fields
from .graph import BaseGraph, GraphError
from .layout import LayoutError, check_degrees
from .lift import LiftError, fully_connected_lift, random_sparse_lift
from .plan import ALLGATHER_THRESHOLD

__all__ = ["Config", "ConfigError", "load_config", "dump_config", "describe_fields"]


@dataclass
class LiftConfig:
    size: int | dict = doc("fibre size s of every hidden and output vertex (or a mapping vertex: size)", 64)
    degree: Any = doc("average degree per base edge (number, or mapping 'u->v': degree)", 4)
    law: Literal["bernoulli", "fixed_degree", "full"] = doc(
        "edge law: the random sparse lift's (bernoulli, fixed_degree) or the fully-connected lift (full)", "bernoulli")
    seed: int = doc("seed of the lifted graph (its edges)", 0)
    block_size: int = doc("targets per sampling block (part of the lift's definition)", 512)


@dataclass
class ModelConfig:
    base: dict = doc("base network: {vertices, edges} or a builder {builder: mlp, in_dim, hidden_dims, out_dim, activation}",
                     factory=lambda: {"builder": "mlp", "in_dim": 4, "hidden_dims": [4, 4], "out_dim": 1,
                                      "activation": "tanh"})
    lift: LiftConfig = doc("the lift of the base network", factory=LiftConfig)
    out_dim: int | None = doc("readout width (null: the output vertices' dimension, when they agree)", None)
    weight_seed: int = doc("seed of the initial weights", 0)
    weight_scale: float | None = doc("std of initial edge weights (null: 1/sqrt(expected fan-in))", None)
    readout_scale: Literal["sum", "mean", "sqrt"] = doc("readout normalisation c: 1, 1/N or 1/sqrt(N)", "sqrt")
    readout_init: Literal["zero", "normal"] = doc("initial readout rows", "zero")
    recompute: bool = doc("recompute each vertex's aggregation in the backward instead of keeping its "
                          "intermediates (less activation memory, about one more forward)", False)
    impl: Literal["auto", "reference", "csr", "blocked", "triton"] = doc(
        "aggregation kernel (auto: triton on CUDA when installed, else csr for scalar targets, else blocked)", "auto")
    topology: Literal["stored", "regenerate"] = doc(
        "lifted edges kept as index arrays (stored), or drawn again from the lift's seed chunk by chunk in every "
        "forward and backward (regenerate: no per-edge indices in memory, slower; for d = 1 lifts, where indices "
        "outweigh the parameters)", "stored")
    init_from: str | None = doc(
        "warm start: a checkpoint (or run) directory of a trained smaller lift of the same base (or the base network "
        "itself); its weights are pulled back so the network computes the same function at step 0", None)
    init_noise: float = doc("warm start: add this times the fresh initial edge weights (breaks the symmetry of copies)",
                            0.0)


@dataclass
class Mnist1dConfig:
    num_samples: int = doc("samples generated (the generator's num_samples), split into train and test", 5000)
    train_split: float = doc("fraction of the samples in the training split (the generator's train_split)", 0.8)
    length: int = doc("length of each signal (the generator's final_seq_length)", 40)
    seed: int = doc("seed of the generator (its own default is 42)", 42)
    cache_dir: str | None = doc("where the generated arrays are cached (null: $RANDLIFT_CACHE or "
                                "~/.cache/randlift_dist)", None)


@dataclass
class DigitsConfig:
    test_fraction: float = doc("fraction of each class held out for the test set (stratified split)", 0.2)
    split_seed: int = doc("seed of the train/test split (data.seed orders the batches)", 0)


@dataclass
class ShardsConfig:
    verify: bool = doc("hash every shard (sha256, split over the ranks) and check every label when the run starts",
                       True)


@dataclass
class RecallConfig:
    n_train: int = doc("training sequences", 8000)
    n_test: int = doc("test sequences", 2000)
    pairs: int = doc("key-value pairs per sequence (length 2 * pairs + 1, the last token the query)", 4)
    keys: int = doc("key ids [0, keys)", 8)
    values: int = doc("value ids [keys, keys + values): the classes", 8)
    seed: int = doc("seed of the generator", 0)


DATA_KINDS = ("teacher", "file", "npz", "mnist1d", "digits", "shards", "recall")
PATH_KINDS = ("file", "npz", "shards")


@dataclass
class DataConfig:
    kind: Literal["teacher", "file", "npz", "mnist1d", "digits", "shards", "recall"] = doc(
        "the data: teacher (teacher-student task), npz (arrays in a .npz/.pt file; 'file' is the same), mnist1d "
        "(MNIST-1D, generated offline), digits (scikit-learn's 8x8 digits), shards (a directory of .npy shards "
        "read lazily: data larger than memory), recall (associative recall sequences, generated)", "teacher")
    path: str | None = doc("data.kind=npz: the .npz/.pt file (arrays x [N, in_dim] and y: [N, out_dim] floats, or [N] "
                           "integer classes; optional x_test, y_test); data.kind=shards: the directory "
                           "(randlift_dist.data.write_shards)", None)
    n_train: int = doc("training samples (teacher task)", 2048)
    n_test: int = doc("test samples (teacher task); npz without x_test: rows held out for the test set", 512)
    input_dist: Literal["gaussian", "uniform"] = doc("input law of the teacher task", "gaussian")
    label_noise: float = doc("std of Gaussian noise added to the teacher's training labels (regression)", 0.0)
    teacher_size: int = doc("lift size of the teacher (the witness network)", 4)
    teacher_degree: float = doc("average degree of the teacher's lift", 2)
    teacher_seed: int = doc("seed of the teacher's lift and weights", 1234)
    seed: int = doc("seed of the batch order (every kind), of the teacher's inputs and noise, of the npz split", 0)
    mnist1d: Mnist1dConfig = doc("data.kind=mnist1d: the generator's arguments", factory=Mnist1dConfig)
    digits: DigitsConfig = doc("data.kind=digits: the split", factory=DigitsConfig)
    shards: ShardsConfig = doc("data.kind=shards: reading", factory=ShardsConfig)
    recall: RecallConfig = doc("data.kind=recall: the generator (randlift_dist/data/recall.py)", factory=RecallConfig)


@dataclass
class TrainConfig:
    steps: int = doc("optimizer steps", 300)
    lr: float = doc("peak learning rate", 0.05)
    batch_size: int = doc("global batch (split over data-parallel replicas)", 64)
    optimizer: Literal["sgd", "adam", "adamw"] = doc("optimizer", "adam")
    momentum: float = doc("SGD momentum", 0.0)
    weight_decay: float = doc("weight decay", 0.0)
    warmup_steps: int = doc("linear warm-up steps", 10)
    schedule: Literal["cosine", "constant"] = doc("learning-rate schedule after warm-up", "cosine")
    min_lr_ratio: float = doc("final lr / peak lr of the cosine schedule", 0.1)
    grad_clip: float = doc("clip the global gradient norm to this (0: off)", 1.0)
    log_every: int = doc("steps between metric records", 10)
    eval_every: int = doc("steps between test evaluations (0: only at the end)", 50)
    resume: str = doc("'auto' (latest checkpoint in run.dir), 'none', or a checkpoint directory", "auto")
    dtype: Literal["float32", "float64"] = doc("parameter dtype of the torch engine", "float32")
    stop_at: int | None = doc("end this invocation after this step, with a checkpoint (resume later)", None)
    micro_batch_size: int | None = doc("samples per forward/backward on each replica; gradients are accumulated "
                                       "over the replica's batch (null: the whole replica batch at once)", None)
    on_nonfinite: Literal["stop", "skip"] = doc("a non-finite loss or gradient norm: stop (exit 3, good checkpoints "
                                                "kept) or skip the step", "stop")
    max_skipped: int = doc("on_nonfinite=skip: stop after this many non-finite steps in a row", 10)
    resume_allow_data_change: bool = doc("resume even though the data configuration differs from the checkpoint's",
                                         False)
    loss: Literal["mse", "cross_entropy"] = doc(
        "mse (regression) or cross_entropy (classification: integer labels, the readout's outputs are logits, "
        "accuracy is reported)", "mse")
    eval_train_max: int | None = doc("training samples evaluated at each evaluation (train_loss, train_accuracy): "
                                     "all when there are fewer, else this many evenly spaced (null: all; 0: none)",
                                     4096)


@dataclass
class ParallelConfig:
    lift_parallel: int = doc("ranks sharing one lift (data_parallel = world_size / lift_parallel)", 1)
    engine: Literal["deepspeed", "torch"] = doc("training engine", "deepspeed")
    zero_stage: Literal[0, 1, 2] = doc("DeepSpeed ZeRO stage (optimizer/gradient sharding over data-parallel)", 0)
    precision: Literal["fp32", "bf16"] = doc("DeepSpeed precision", "fp32")
    offload_optimizer: bool = doc("DeepSpeed optimizer state offload to CPU (ZeRO >= 1)", False)
    partition: Literal["block", "graph", "random"] = doc("ownership of lifted vertices", "block")
    exchange: Literal["auto", "alltoall", "allgather"] = doc("exchange mode per base edge", "auto")
    allgather_threshold: float = doc("auto mode: all-gather when halo rows >= this fraction of its volume",
                                      ALLGATHER_THRESHOLD)
    backend: Literal["auto", "gloo", "nccl"] = doc("torch.distributed backend (auto: nccl with GPUs)", "auto")
    timeout_s: float = doc("collective timeout once training runs: a peer silent this long ends the job", 300.0)
    setup_timeout_s: float = doc("collective timeout during set-up (sampling, planning, loading)", 1800.0)


@dataclass
class CheckpointConfig:
    every: int = doc("steps between checkpoints (0: only at the end)", 100)
    keep: int = doc("checkpoints kept (older ones deleted)", 2)
    deepspeed_files: bool = doc("also write DeepSpeed's own checkpoint files", True)


@dataclass
class RunConfig:
    dir: str = doc("run directory: config, metrics.jsonl, checkpoints, wandb", "runs/tiny")
    name: str | None = doc("run name (wandb); default: the run directory's name", None)
    progress: bool = doc("show a progress bar on rank 0", True)


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = doc("wandb mode; offline never touches the network", "offline")
    project: str = doc("wandb project", "randlift_dist")
    entity: str | None = doc("wandb entity (team)", None)


@dataclass
class Config:
    model: ModelConfig = doc("the network", factory=ModelConfig)
    data: DataConfig = doc("the task", factory=DataConfig)
    train: TrainConfig = doc("optimisation", factory=TrainConfig)
    parallel: ParallelConfig = doc("parallel layout and engine", factory=ParallelConfig)
    checkpoint: CheckpointConfig = doc("checkpoints", factory=CheckpointConfig)
    run: RunConfig = doc("outputs", factory=RunConfig)
    wandb: WandbConfig = doc("wandb logging", factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Cross-field checks that do not need the world size."""
        positive = {"model.lift.block_size": self.model.lift.block_size,
                    "train.steps": self.train.steps, "train.batch_size": self.train.batch_size,
                    "train.log_every": self.train.log_every, "parallel.lift_parallel": self.parallel.lift_parallel,
                    "data.n_train": self.data.n_train, "data.teacher_size": self.data.teacher_size,
                    "checkpoint.keep": self.checkpoint.keep}
        for key, v in positive.items():
            if v <= 0:
                raise ConfigError(f"{key}={v!r}: must be > 0")
        non_negative = {"train.warmup_steps": self.train.warmup_steps, "train.eval_every": self.train.eval_every,
                        "checkpoint.every": self.checkpoint.every, "data.label_noise": self.data.label_noise,
                        "train.grad_clip": self.train.grad_clip, "train.weight_decay": self.train.weight_decay,
                        "data.n_test": self.data.n_test, "train.momentum": self.train.momentum}
        for key, v in non_negative.items():
            if v < 0:
                raise ConfigError(f"{key}={v!r}: must be >= 0")
        if not self.train.lr > 0:
            raise ConfigError(f"train.lr={self.train.lr!r}: must be > 0")
        self._check_data()
        if self.parallel.offload_optimizer and (self.parallel.engine != "deepspeed" or self.parallel.zero_stage == 0):
            raise ConfigError("parallel.offload_optimizer=true needs parallel.engine=deepspeed and parallel.zero_stage>=1")
        if self.parallel.offload_optimizer and self.train.optimizer == "sgd":
            raise ConfigError("parallel.offload_optimizer=true needs train.optimizer=adam or adamw")
        for key, v in {"parallel.timeout_s": self.parallel.timeout_s,
                       "parallel.setup_timeout_s": self.parallel.setup_timeout_s}.items():
            if not v > 0:
                raise ConfigError(f"{key}={v!r}: must be > 0 seconds")
        if self.train.micro_batch_size is not None and self.train.micro_batch_size <= 0:
            raise ConfigError(f"train.micro_batch_size={self.train.micro_batch_size}: must be > 0 (or null)")
        if self.train.max_skipped <= 0:
            raise ConfigError(f"train.max_skipped={self.train.max_skipped}: must be > 0")
        if self.parallel.precision == "bf16" and self.parallel.engine != "deepspeed":
            raise ConfigError("parallel.precision=bf16 needs parallel.engine=deepspeed (the torch engine runs in train.dtype)")
        if self.parallel.precision == "bf16" and self.parallel.zero_stage == 0:
            raise ConfigError("parallel.precision=bf16 needs parallel.zero_stage=1 or 2: the fp32 master weights "
                              "and moments that checkpoints save live in DeepSpeed's ZeRO optimizer")
        if self.model.topology == "regenerate" and self.model.impl != "auto":
            raise ConfigError(f"model.impl={self.model.impl} with model.topology=regenerate: the regenerated "
                              "topology has its own chunked kernel; set model.impl=auto (or model.topology=stored)")
        if self.model.init_from is not None and not Path(self.model.init_from).is_dir():
            raise ConfigError(f"model.init_from={self.model.init_from!r}: no such directory (give a checkpoint "
                              "directory or the run directory of a trained smaller lift)")
        if not self.model.init_noise >= 0:
            raise ConfigError(f"model.init_noise={self.model.init_noise!r}: must be >= 0")
        if not 0 < self.parallel.allgather_threshold:
            raise ConfigError(f"parallel.allgather_threshold={self.parallel.allgather_threshold!r}: must be > 0")
        if self.train.resume not in ("auto", "none") and not Path(self.train.resume).exists():
            raise ConfigError(f"train.resume={self.train.resume!r}: no such checkpoint directory "
                              "(use 'auto', 'none' or an existing checkpoint path)")
        self._check_base()
        return self

    def _check_data(self) -> None:
        d = self.data
        if d.kind in PATH_KINDS and not d.path:
            what = "a directory written by randlift_dist.data.write_shards" if d.kind == "shards" else \
                "a .npz or .pt file with arrays x and y"
            raise ConfigError(f"data.kind={d.kind} needs data.path=<{what}>")
        if d.path and d.kind not in PATH_KINDS:
            raise ConfigError(f"data.path={d.path!r} is set but data.kind={d.kind} does not read a path: set "
                              "data.kind=npz (a .npz/.pt file) or data.kind=shards (a shard directory), or remove "
                              "data.path")
        if not 0 < d.mnist1d.train_split < 1 or not 0 < d.digits.test_fraction < 1:
            bad = ("data.mnist1d.train_split", d.mnist1d.train_split) if not 0 < d.mnist1d.train_split < 1 else \
                ("data.digits.test_fraction", d.digits.test_fraction)
            raise ConfigError(f"{bad[0]}={bad[1]!r}: must be strictly between 0 and 1")
        for key, v in {"data.mnist1d.num_samples": d.mnist1d.num_samples, "data.mnist1d.length": d.mnist1d.length}.items():
            if v <= 0:
                raise ConfigError(f"{key}={v!r}: must be > 0")
        if self.train.eval_train_max is not None and self.train.eval_train_max < 0:
            raise ConfigError(f"train.eval_train_max={self.train.eval_train_max}: must be >= 0 (or null for all)")
        if self.train.loss == "cross_entropy" and d.kind == "teacher" and d.label_noise > 0:
            raise ConfigError("data.label_noise applies to regression labels: with train.loss=cross_entropy the "
                              "teacher's labels are classes (the argmax of its outputs); set data.label_noise=0")

    def _check_base(self) -> None:
        base = self.build_lift()[0]
        self.out_dim(base)
        if base.output_positions:
            raise ConfigError(f"model.base: the output vertices {base.outputs} have positions "
                              f"{base.output_positions}, but a task reads one vector per sample: end them with a "
                              "mean, select or flatten edge")

    def out_dim(self, base: BaseGraph) -> int:
        """The readout width (`model.out_dim`, or the output vertices' common dimension)."""
        try:
            return base.readout_dim(self.model.out_dim)
        except GraphError as err:
            raise ConfigError(f"model.out_dim: {err}") from None

    def check_world(self, world_size: int) -> int:
        """Checks that need the world size but no process group; returns the data-parallel degree."""
        try:
            dp = check_degrees(world_size, self.parallel.lift_parallel)
        except LayoutError as err:
            raise ConfigError(str(err)) from None
        t = self.train
        if t.batch_size % dp:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the data-parallel degree {dp} "
                              f"(world {world_size} / lift_parallel {self.parallel.lift_parallel}): "
                              f"use a multiple of {dp}")
        if t.micro_batch_size is not None and (t.batch_size // dp) % t.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} does not divide the per-replica batch "
                              f"{t.batch_size // dp} (train.batch_size {t.batch_size} / data-parallel {dp})")
        return dp

    def micro_batches(self, data_parallel: int) -> int:
        """Micro-batches per step on each replica (gradient accumulation steps)."""
        per_replica = self.train.batch_size // data_parallel
        return per_replica // (self.train.micro_batch_size or per_replica)

    def build_lift(self):
        """`(base, lift)` of `model.base` and `model.lift`: the one place a config becomes a lift
        (the trainer, the plan statistics and the estimator all call it)."""
        try:
            base = BaseGraph.from_dict(self.model.base)
        except GraphError as err:
            raise ConfigError(f"model.base: {err}") from None
        lc = self.model.lift
        if isinstance(lc.size, int) and lc.size <= 0:
            raise ConfigError(f"model.lift.size={lc.size}: a lift size must be a positive integer")
        try:
            if lc.law == "full":
                return base, fully_connected_lift(base, lc.size, lc.block_size)
            return base, random_sparse_lift(base, lc.size, lc.degree, lc.seed, lc.law, lc.block_size)
        except LiftError as err:
            raise ConfigError(f"model.lift: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override, type-check and validate a configuration."""
    data: Any = {}
    if path is not None:  # None: the embedded default, which is the dataclass defaults
        src = Path(path)
        if not src.is_file():
            raise ConfigError(f"--config {str(src)!r}: no such file")
        try:
            data = yaml.safe_load(src.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{src}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: the top level must be a mapping of sections (model, data, train, ...)")
    data = apply_overrides(data, list(overrides or []), Config)
    return build(Config, data, "").validate()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_fields(cls: type | None = None) -> list[str]:
    """`key [type] = default: doc` lines for every field (used by `--help-config`)."""
    return _describe_fields(cls or Config)
