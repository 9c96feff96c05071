"""End-to-end: a base with conv, attention, a layer norm, pooling and a flatten head, trained by
the real entry point (teacher-student task, whose teacher is a lift of the same base).

One base network holds every new edge and vertex kind, so each launch checks all of them: the
loss curve of 20 Adam steps on 2 lift-parallel ranks (DeepSpeed, ZeRO 0), 3 lift-parallel ranks
with the regenerated topology (DeepSpeed, ZeRO 1), and 2 data-parallel replicas (DeepSpeed, ZeRO
1) equals the one-process torch run to 1e-4 relative; a run stopped at step 10 on one process and
resumed on 3 lift-parallel ranks (resharded checkpoint) continues the same curve.
"""

from __future__ import annotations

import pytest
import yaml

from launch import assert_curves_match, launch, losses, metrics

BASE = {
    "vertices": [
        {"name": "x", "dim": 2, "role": "input", "positions": [10]},
        {"name": "c", "dim": 3, "activation": "tanh", "bias": True},
        {"name": "a", "dim": 3, "kind": "attention", "bias": True},
        {"name": "s", "dim": 4, "norm": "layer", "bias": True},
        {"name": "p", "dim": 2, "activation": "tanh"},
        {"name": "y", "dim": 1, "role": "output"},
    ],
    "edges": [{"src": "x", "dst": "c", "kind": "conv", "kernel": 3, "padding": 1},
              {"src": "c", "dst": "a", "slot": "q"}, {"src": "c", "dst": "a", "slot": "k"},
              {"src": "c", "dst": "a", "slot": "v"}, ["c", "s"], ["a", "s"],
              {"src": "s", "dst": "p", "kind": "pool", "pool": "max", "kernel": 2},
              {"src": "p", "dst": "y", "kind": "flatten"}],
}
QUICK = ["train.steps=20", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "wandb.mode=disabled",
         "train.optimizer=adam", "train.lr=0.01", "data.n_train=256", "data.n_test=32", "train.batch_size=32"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    cfg = {"model": {"base": BASE, "lift": {"size": 11, "degree": 3, "block_size": 4}},
           "data": {"teacher_size": 5, "teacher_degree": 2}}
    path = d / "positions.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config):
    d = tmp_path_factory.mktemp("ref")
    launch(d, 1, *QUICK, "parallel.engine=torch", config=config)
    curve = losses(d)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(16, 21)) / 5
    assert last < 0.8 * first, f"the reference run does not learn: {curve}"
    return curve


LAYOUTS = [("deepspeed", 0, 2, 2, "stored"), ("deepspeed", 1, 3, 3, "regenerate"), ("deepspeed", 1, 2, 1, "stored")]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("engine, zero, nproc, lift_parallel, topology", LAYOUTS,
                         ids=["ds-zero0-lp2", "ds-zero1-lp3-regenerate", "ds-zero1-dp2"])
def test_curve_independent_of_layout(tmp_path, config, reference, engine, zero, nproc, lift_parallel, topology):
    launch(tmp_path, nproc, *QUICK, f"parallel.engine={engine}", f"parallel.zero_stage={zero}",
           f"parallel.lift_parallel={lift_parallel}", f"model.topology={topology}", config=config, timeout=400)
    assert_curves_match(losses(tmp_path), reference, 1e-4)
    if lift_parallel > 1:
        assert all(r["comm_bytes"] > 0 for r in metrics(tmp_path) if "loss" in r)


@pytest.mark.timeout(400)
def test_resume_on_another_layout_continues_the_curve(tmp_path, config, reference):
    extra = ["parallel.engine=torch", "checkpoint.every=10"]
    launch(tmp_path, 1, *QUICK, *extra, "train.stop_at=10", config=config)
    launch(tmp_path, 3, *QUICK, *extra, "parallel.lift_parallel=3", config=config, timeout=400)
    assert_curves_match(losses(tmp_path), reference, 1e-4, steps=list(range(11, 21)))
