"""Micro-batches with gradient accumulation: activation memory of one micro-batch, the same curve.

`train.micro_batch_size` splits each replica's batch; the accumulated gradient equals the one-pass
gradient (sums of equal-size means), so the loss curve equals the run without micro-batches, for
the torch engine and for DeepSpeed (its `gradient_accumulation_steps`), also lift-parallel.
"""

from __future__ import annotations

import pytest

from launch import assert_curves_match, launch, losses

QUICK = ["train.steps=12", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "wandb.mode=disabled",
         "model.lift.size=48", "data.n_train=512", "data.n_test=64", "train.batch_size=32"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_micro_batches_leave_the_loss_curve_unchanged(tmp_path, engine):
    whole = tmp_path / "whole"
    launch(whole, 1, *QUICK, f"parallel.engine={engine}")
    micro = tmp_path / "micro"
    launch(micro, 1, *QUICK, f"parallel.engine={engine}", "train.micro_batch_size=8")
    assert_curves_match(losses(micro), losses(whole), rtol=1e-5)
    if engine == "torch":  # and sharded: 2 ranks of one lift, 4 micro-batches each
        sharded = tmp_path / "lp2"
        launch(sharded, 2, *QUICK, f"parallel.engine={engine}", "train.micro_batch_size=8",
               "parallel.lift_parallel=2")
        assert_curves_match(losses(sharded), losses(whole), rtol=1e-5)


def test_micro_batch_size_must_divide_the_replica_batch(tmp_path):
    proc = launch(tmp_path, 1, *QUICK, "parallel.engine=torch", "train.micro_batch_size=5", check=False)
    assert proc.returncode == 2 and "train.micro_batch_size=5" in proc.stderr and "32" in proc.stderr


@pytest.mark.timeout(600)
def test_recomputation_leaves_the_loss_curve_unchanged(tmp_path):
    """`model.recompute=true` (vertex intermediates recomputed in the backward, exchanges included)."""
    ref = tmp_path / "ref"
    launch(ref, 1, *QUICK, "parallel.engine=torch")
    for nproc, extra in ((1, []), (2, ["parallel.lift_parallel=2"])):
        d = tmp_path / f"recompute{nproc}"
        launch(d, nproc, *QUICK, "parallel.engine=torch", "model.recompute=true", *extra)
        assert_curves_match(losses(d), losses(ref), rtol=1e-5)
