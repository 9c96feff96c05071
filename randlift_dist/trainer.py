"""`Trainer`: one training run as an object — set-up, `train_step`, `evaluate`, `save`, `resume`, `fit`.

Order of events in `Trainer(cfg, layout)`: lift -> plan (collective) -> network (local) -> data ->
`resume` (checkpoint weights go into the network before the engine exists: ZeRO and bf16 engines
copy them into their master partitions when built) -> engine, which restores its own step count,
moments and learning-rate schedule -> run directory outputs. Nothing is written to the run
directory before the resume has been accepted, so a refused resume changes nothing on disk; a
resumed run rewrites `metrics.jsonl` up to the resumed step, so every step appears once. A run is
finished only when its final checkpoint verifies (every block's sha256): a damaged one is reported
and the run trains again from the newest intact checkpoint.

`fit()` trains from the resumed step to `train.steps` (or to `train.stop_at`, when the run started
before it) and returns the last record. Every step ends with one all-reduce of a small flag vector
(a stop signal, a non-finite step) so that all ranks stop together; SIGTERM, SIGUSR1 and SIGINT
request a checkpoint at the next step boundary and a clean exit (a second SIGINT kills at once).
A non-finite loss or gradient norm stops the run (`train.on_nonfinite=stop`, `NonFiniteError`,
no checkpoint of the bad state) or drops the update (`skip`, counted and logged; the run stops
after `train.max_skipped` in a row).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, dump_config
from .data import Batches, build_dataset, eval_rows, replica_part, verify_shards
from .engine import build_engine
from .layout import Layout
from .limits import eval_chunk
from .metrics import MetricsSink, lift_statistics, peak_memory_mb, reduce_over_ranks
from .parallelize import shard_network
from .runs import network_kwargs
from .warmstart import warm_start


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm stopped being finite; the message names the step and the value."""


class RunFinished(Exception):
    """The run directory already holds a checkpoint at `train.steps`: nothing to train."""


_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Trainer:
    def __init__(self, cfg: Config, layout: Layout):
        t0 = time.perf_counter()
        self.cfg, self.layout = cfg, layout
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.base, self.lift = cfg.build_lift()
        self._refuse_if_finished()
        self.net = shard_network(self.base, self.lift, layout, **network_kwargs(cfg, self.base))
        self.net.to(layout.device())
        self.data = build_dataset(cfg, self.base, cfg.out_dim(self.base))  # checked (and kept) by the preflight
        if cfg.data.kind == "shards" and cfg.data.shards.verify:
            self.phase = "verifying the data shards"
            verify_shards(self.data, layout.rank, layout.world_size)
        self.batches = Batches(self.data.train, cfg.train.batch_size, layout.data_rank, layout.data_parallel,
                               cfg.data.seed)
        self.resumed_from, self.start_step, state = self.resume()
        self.warm = None
        if state is None and cfg.model.init_from:  # a fresh start from a smaller trained lift (collective)
            self.warm = warm_start(self.net, cfg.model.init_from, cfg.model.init_noise)
        self.engine = build_engine(self.net, cfg, layout)
        self.engine.restore(state, self.start_step)
        del state
        self.stats = lift_statistics(self.engine.net, layout)
        if layout.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.sink = MetricsSink(cfg, self.run_dir, cfg.train.steps, self.start_step, cfg.to_dict(),
                                enabled=layout.rank == 0)
        self.sink.summary({**self.stats, "layout": layout.describe(), "dataset": self.data.description,
                           "setup_s": time.perf_counter() - t0})
        self.step, self.skipped_in_row, self.skipped = self.start_step, 0, 0
        self.phase = "set-up"

    # ------------------------------------------------------------ resume / save
    def _refuse_if_finished(self) -> None:
        """Before any set-up: the newest checkpoint already reached `train.steps` and every block of
        it verifies (sha256; files split over the ranks) -> `RunFinished`. A damaged one is kept in
        `self.damaged` with its one-line problems: the resume skips it, reports them, and the run
        trains again from the newest intact checkpoint to the end."""
        self.damaged: dict[Path, list[str]] = {}
        if self.cfg.train.resume != "auto":
            return
        newest, _ = ckpt.find_intact(self.ckpt_root, verify=False)  # structure only: cheap, local
        if newest is None:
            return
        meta = ckpt.read_meta(newest)
        if int(meta["step"]) >= self.cfg.train.steps:
            ckpt.check_compatible(meta, self.cfg, self.lift, newest)  # a refused resume stays refused
            bad = ckpt.verify_checksums(newest, self.layout)
            if not bad:
                raise RunFinished(f"run {self.run_dir} already finished: checkpoint {newest.name} is at step "
                                  f"{meta['step']} of train.steps={self.cfg.train.steps}; nothing to do "
                                  "(raise train.steps to train further, or use a new run.dir)")
            self.damaged[newest] = [f"{line} (the final checkpoint: training to step {self.cfg.train.steps} again)"
                                    for line in bad]

    def resume(self) -> tuple[Path | None, int, dict | None]:
        """Load the checkpoint's weights into the network: `(path, step, saved rows)`.

        `train.resume`: `auto` takes the newest intact checkpoint of the run directory (damaged
        ones, a damaged final one included, are reported in one line each and skipped), `none`
        starts fresh, a path loads that one."""
        how = self.cfg.train.resume
        if how == "none":
            return None, 0, None
        if how == "auto":
            return ckpt.load_latest(self.ckpt_root, self.cfg, self.lift, self.net, layout=self.layout,
                                    damaged=self.damaged)
        step, state = ckpt.load_weights(Path(how), self.cfg, self.lift, self.net)
        return Path(how), step, state

    def save(self) -> Path:
        """Collective: a checkpoint of the current step (atomic; rotation keeps `checkpoint.keep`)."""
        self.phase = f"checkpoint save at step {self.step}"
        path = ckpt.save(self.ckpt_root, self.step, self.cfg, self.lift, self.engine, self.layout,
                         self.cfg.checkpoint.keep)
        self.sink.print(f"checkpoint {path} (step {self.step})")
        return path

    # ------------------------------------------------------------ steps
    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the batch of the current step; `applied` False if it was dropped."""
        self.phase = f"training step {self.step + 1}"
        x, y = self.batches(self.step)
        self.net.comm.stats.reset()
        t0 = time.perf_counter()
        out = self.engine.train_step(x, y, skip_nonfinite=self.cfg.train.on_nonfinite == "skip")
        out["step_s"] = time.perf_counter() - t0
        self.step += 1
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the test set and on up to `train.eval_train_max` training rows
        (`test_loss`, `train_loss`, and `*_accuracy` for classification). Each split's rows are
        divided over the data-parallel replicas; collective."""
        self.phase = f"evaluation at step {self.step}"
        out: dict[str, float] = {}
        splits = [("test", self.data.test, None)]
        if self.cfg.train.eval_train_max != 0:
            splits.append(("train", self.data.train, eval_rows(len(self.data.train), self.cfg.train.eval_train_max)))
        for prefix, src, rows in splits:
            n = len(src) if rows is None else int(rows.size)
            out.update(self.engine.task.metrics(self._split_sums(src, rows, n) if n else {}, n, prefix))
        return out

    def _split_sums(self, src, rows, n: int) -> dict[str, float]:
        """This replica's part of `n` evaluation rows of a source (rows `rows`, or all), read and run
        in chunks, then summed over the data-parallel group."""
        L = self.layout
        lo, hi = replica_part(n, L.data_rank, L.data_parallel)
        t = self.cfg.train
        chunk = eval_chunk(t.batch_size, L.data_parallel, t.micro_batch_size)
        sums = {"loss": 0.0, "correct": 0.0}
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            x, y = src.span(a, b) if rows is None else src.take(rows[a:b])
            for k, v in self.engine.eval_sums(x, y).items():
                sums[k] += v
        t = torch.tensor([sums["loss"], sums["correct"]], dtype=torch.float64)
        if L.data_group is not None and L.data_parallel > 1:
            dist.all_reduce(t, group=L.data_group)
        return {"loss": float(t[0]), "correct": float(t[1])}

    def _agree(self, stop_signal: int, nonfinite: bool) -> tuple[int, bool]:
        """The one per-step all-reduce: every rank learns the largest signal and any non-finite step."""
        flag = torch.tensor([float(stop_signal), float(nonfinite)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag[0]), bool(flag[1])

    def _record(self, out: dict[str, Any], window: dict[str, float]) -> dict[str, Any]:
        stats = self.net.comm.stats
        hits, self.engine.train_hits = self.engine.train_hits, 0
        red = reduce_over_ranks({"comm_bytes": stats.bytes_total, "comm_bytes_max": stats.bytes_total,
                                 "exchange_s_max": stats.wait_s, "peak_mem_mb_max": peak_memory_mb(self.layout.device()),
                                 "step_time_max": window["t"], "hits": hits},
                                {"comm_bytes": "sum", "comm_bytes_max": "max", "exchange_s_max": "max",
                                 "peak_mem_mb_max": "max", "step_time_max": "max", "hits": "sum"})
        wall = max(red["step_time_max"], 1e-9)
        task = {}
        if self.engine.task.classification:  # every rank of a lift-parallel group counted its replica's hits
            task["accuracy"] = red["hits"] / (self.layout.lift_parallel * max(window["samples"], 1))
        return {"step": self.step, "loss": out["loss"], **task, "lr": out["lr"], "grad_norm": out["grad_norm"],
                "samples_per_s": window["samples"] / wall, "edges_per_s": self.stats["edges"] * window["steps"] / wall,
                "comm_bytes": int(red["comm_bytes"]), "comm_bytes_max_rank": int(red["comm_bytes_max"]),
                "exchange_s_max": red["exchange_s_max"], "peak_mem_mb": red["peak_mem_mb_max"],
                "skipped_steps": self.skipped}

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self._announce()
        requested = {"signal": 0}
        previous = {s: signal.getsignal(s) for s in _SIGNALS}

        def on_signal(signum, frame):
            requested["signal"] = signum
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)

        for s in _SIGNALS:
            signal.signal(s, on_signal)
        stop_at = t.stop_at if t.stop_at is not None and t.stop_at > self.start_step else None
        window = {"t": 0.0, "samples": 0, "steps": 0}
        last: dict[str, Any] = {"step": self.step}
        try:
            if self.start_step == 0:  # the starting point of the curve
                self.sink.log({"step": 0, **self.evaluate()})
            self.layout.set_timeout(cfg.parallel.timeout_s, self.net.comm.edge_groups.values())
            while self.step < t.steps:
                out = self.train_step()
                sig, nonfinite = self._agree(requested["signal"], not out["finite"])
                window["t"] += out["step_s"]
                window["samples"] += t.batch_size
                window["steps"] += 1
                self.sink.advance()
                if nonfinite:
                    self._on_nonfinite(out)
                else:
                    self.skipped_in_row = 0
                stop = sig or (-1 if stop_at is not None and self.step >= stop_at and self.step < t.steps else 0)
                if self.step % t.log_every == 0 or self.step == t.steps or stop:
                    record = self._record(out, window)
                    if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                        record.update(self.evaluate())
                    self.sink.log(record)
                    last, window = record, {"t": 0.0, "samples": 0, "steps": 0}
                if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == t.steps:
                    self.save()
                if stop:
                    why = "train.stop_at" if stop == -1 else f"signal {signal.Signals(stop).name}"
                    self.sink.print(f"stopping at step {self.step} ({why}): checkpoint written; "
                                    "rerun the same command to continue")
                    return {**last, "step": self.step, "stopped_by_signal": stop}
            return {**last, "step": self.step, "stopped_by_signal": 0}
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.sink.close()

    def _on_nonfinite(self, out: dict[str, Any]) -> None:
        what = ", ".join(f"{k} {out[k]!r}" for k in ("loss", "grad_norm"))
        if self.cfg.train.on_nonfinite == "skip" and out.get("applied") is False:
            self.skipped += 1
            self.skipped_in_row += 1
            self.sink.print(f"step {self.step}: non-finite ({what}): update dropped "
                            f"({self.skipped_in_row} in a row, {self.skipped} in all)")
            if self.skipped_in_row < self.cfg.train.max_skipped:
                return
            raise NonFiniteError(f"{self.skipped_in_row} non-finite steps in a row (train.max_skipped="
                                 f"{self.cfg.train.max_skipped}), the last at step {self.step} ({what}); "
                                 "lower train.lr or check the data; no checkpoint of this state was written")
        raise NonFiniteError(f"non-finite {what} at step {self.step}: stopped without saving this state (the last "
                             "good checkpoints are kept); lower train.lr, check the data, or set "
                             "train.on_nonfinite=skip")

    def _announce(self) -> None:
        s, L = self.stats, self.layout
        resumed = f"; resumed from {self.resumed_from} at step {self.start_step}" if self.resumed_from else ""
        self.sink.print(f"randlift_dist: {L.describe()}; lift {s['params']:,} parameters, {s['edges']:,} lifted "
                        f"edges; {self.data.description}; engine {self.engine.name}{resumed}")
        if self.warm is not None:
            w = self.warm
            bad = {k: n for k, n in w["inexact"].items() if n}
            self.sink.print(f"warm start from {w['path']} (fibres {w['sizes']}): " + (
                "exact (the same function at step 0)" if not bad else "not exact at " + ", ".join(
                    f"{n} of {w['targets'][k]} targets of {k}" for k, n in bad.items()) +
                " (a pulled-back in-edge is missing there)"))
        for k, v in s["per_edge"].items():
            self.sink.print(f"  edge {k}: {v['edges']:,} edges, mean in-degree {v['mean_in_degree']:.2f}, "
                            f"halo fraction {v['halo_fraction']:.3f}, exchange {v['exchange']}")
        for e in self.base.edges:  # inputs' fibres have one vertex: their edges always take every pair
            if self.lift.law != "full" and self.lift.all_pairs(e) and self.base.vertices[e.src].role != "input":
                self.sink.print(f"randlift_dist: note: edge {e}: degree {self.lift.degrees[e.key]:g} >= the size "
                                f"{self.lift.n(e.src)} of fibre {e.src!r}: every pair is an edge (this edge is "
                                "fully connected; lift_stats.json: all_pairs)")
