"""Using trained runs end to end: `load_run`, `predict`, `evaluate` and `export`, through the real
commands, on a run trained at world size 1 (regression) and one trained lift-parallel on 2 ranks
(classification), both with the torch engine. Outputs are compared with the network `load_run`
gives (exactly where the arithmetic is the same, to 1e-6 where a layout sums in another order),
metrics with the trainer's final ones in `metrics.jsonl`; the exported files are loaded in a fresh
interpreter that must not import deepspeed. Bad inputs: one line, exit 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_world
from launch import launch, metrics, train_env
from randlift_dist import load_run
from randlift_dist.evaluate import main as evaluate_main
from randlift_dist.export import main as export_main
from randlift_dist.predict import main as predict_main

COMMON = ["train.steps=20", "train.log_every=5", "train.eval_every=10", "checkpoint.every=10", "wandb.mode=disabled",
          "parallel.engine=torch", "train.lr=0.02", "model.lift.size=48", "data.n_train=512", "data.n_test=96",
          "train.batch_size=32", "train.eval_train_max=0"]
CLS = ["train.loss=cross_entropy", "model.base.out_dim=3", "parallel.lift_parallel=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs and a set of input rows: `{"ws1": dir, "lp2": dir, "x": [100, 4] float32}`."""
    root = tmp_path_factory.mktemp("runs")
    launch(root / "ws1", 1, *COMMON)
    launch(root / "lp2", 2, *COMMON, *CLS)
    x = np.random.default_rng(7).standard_normal((100, 4)).astype(np.float32)
    np.save(root / "x.npy", x)
    return {"ws1": root / "ws1", "lp2": root / "lp2", "x": x, "x_path": root / "x.npy"}


def command(module: str, *args, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m randlift_dist.<module>` (or torchrun with `nproc` workers) with `args`."""
    head = [sys.executable, "-m"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    return subprocess.run([*head, f"randlift_dist.{module}", *map(str, args)], env=train_env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final(run_dir: Path) -> dict:
    return [r for r in metrics(run_dir) if "test_loss" in r][-1]


def reference(run_dir: Path, x: np.ndarray, step: int | None = None) -> np.ndarray:
    run = load_run(run_dir, step=step)
    return run.predict(torch.from_numpy(x)).numpy()


FRESH = """
import sys, json, numpy as np, torch
from randlift_dist.export import load
x = torch.from_numpy(np.load(sys.argv[1]))
for path, out in zip(sys.argv[2::2], sys.argv[3::2]):
    net = load(path)
    with torch.no_grad():
        np.save(out, net(x).numpy())
assert not torch.distributed.is_initialized()
print(json.dumps({"deepspeed": "deepspeed" in sys.modules, "type": type(net).__mro__[-2].__name__,
                  "step": net.metadata["step"], "loss": net.metadata["task"]["loss"]}))
"""


@pytest.mark.timeout(900)
def test_load_predict_evaluate_export_agree(runs, tmp_path):
    x = runs["x"]
    for name in ("ws1", "lp2"):
        run = load_run(runs[name])
        assert run.step == 20 and run.checkpoint.name == "step_00000020" and run.layout is None
        assert not run.net.training and run.net.plan.world_size == 1
        assert run.task.loss_name == ("mse" if name == "ws1" else "cross_entropy")
        assert Path(run.config.run.dir) == runs[name]
    ref = {n: reference(runs[n], x) for n in ("ws1", "lp2")}
    assert ref["ws1"].shape == (100, 1) and ref["lp2"].shape == (100, 3)
    older = reference(runs["ws1"], x, step=10)
    assert not np.allclose(older, ref["ws1"])  # step 10 is another network

    # predict: one process (npz); torchrun, lift-parallel 2 as trained (npz, classes); 2 replicas (npy)
    ok(command("predict", "--run", runs["ws1"], "--input", runs["x_path"], "--output", tmp_path / "a.npz",
               "--batch-size", "1000"))
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) == {"outputs"} and np.array_equal(f["outputs"], ref["ws1"])
    np.savez(tmp_path / "x.npz", x=x)
    ok(command("predict", "--run-dir", runs["lp2"], "--input", tmp_path / "x.npz", "--output", tmp_path / "b.npz",
               "--batch-size", "32", "--no-progress", nproc=2))
    with np.load(tmp_path / "b.npz") as f:
        np.testing.assert_allclose(f["outputs"], ref["lp2"], rtol=1e-6, atol=1e-6)
        assert np.array_equal(f["classes"], ref["lp2"].argmax(1)) and f["classes"].dtype == np.int64
    ok(command("predict", "--run-dir", runs["ws1"], "--input", runs["x_path"], "--output", tmp_path / "c.npy",
               "--lift-parallel", "1", "--batch-size", "7", nproc=2))  # 2 data-parallel replicas
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), ref["ws1"], rtol=1e-6, atol=1e-6)

    # evaluate: the trainer's final test metrics, on the run's own layout and on another
    for name, nproc in (("ws1", 1), ("lp2", 2), ("lp2", 1)):
        got = json.loads(ok(command("evaluate", "--run-dir", runs[name], "--json", nproc=nproc)).stdout)
        want = final(runs[name])
        assert got["samples"] == 96 and got["step"] == 20
        assert got["loss"] == pytest.approx(want["test_loss"], rel=1e-6, abs=0), (name, nproc, got, want)
        if name == "lp2":
            assert got["accuracy"] == want["test_accuracy"]
    text = ok(command("evaluate", "--run", runs["lp2"], "--step", "10")).stdout.split("\n")
    mid = [r for r in metrics(runs["lp2"]) if r["step"] == 10][0]
    assert text[0].startswith("loss ") and text[1].startswith("accuracy ") and text[2] == ""
    assert float(text[0].split()[1]) == pytest.approx(mid["test_loss"], rel=1e-6)
    assert float(text[1].split()[1]) == mid["test_accuracy"]

    # export (one process, from the checkpoints) and load in a fresh interpreter without deepspeed
    args = []
    for name in ("ws1", "lp2"):
        ok(command("export", "--run", runs[name], "--out", tmp_path / f"{name}.safetensors"))
        args += [tmp_path / f"{name}.safetensors", tmp_path / f"{name}_out.npy"]
    proc = subprocess.run([sys.executable, "-c", FRESH, runs["x_path"], *map(str, args)], env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"deepspeed": False, "type": "Module", "step": 20, "loss": "cross_entropy"}, info
    for name in ("ws1", "lp2"):
        assert np.array_equal(np.load(tmp_path / f"{name}_out.npy"), ref[name]), name


def _sharded(rank, world_size, run_dir, x, out):
    """Inside a 2-rank world: load_run shards as the run was trained (lift-parallel 2), predicts,
    and exports (collective)."""
    from randlift_dist import export

    run = load_run(run_dir)
    assert run.layout is not None and run.layout.lift_parallel == 2 and run.net.plan.world_size == 2
    y = run.predict(torch.from_numpy(x)).numpy()
    export.save(run, out)
    return y, run.net.plan.n_own("h1"), run.step


@pytest.mark.timeout(600)
def test_sharded_load_and_export_at_world_size_2(runs, tmp_path):
    from safetensors.torch import load_file

    from randlift_dist import export

    x = runs["x"]
    ref = reference(runs["lp2"], x)
    res = run_world(_sharded, 2, runs["lp2"], x, tmp_path / "lp2.safetensors", timeout=400)
    assert res[0][1] + res[1][1] == 48 and res[0][2] == 20
    for y, _, _ in res:  # every rank of the lift group returns the whole output
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    net = export.load(tmp_path / "lp2.safetensors")
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, res[0][0], rtol=1e-6, atol=1e-6)
    assert np.array_equal(got, ref)
    # the same tensors as an export of the whole network in one process
    export.save(load_run(runs["lp2"]), tmp_path / "ws1.safetensors")
    a, b = load_file(tmp_path / "lp2.safetensors"), load_file(tmp_path / "ws1.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert export.read_metadata(tmp_path / "lp2.safetensors") == export.read_metadata(tmp_path / "ws1.safetensors")


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert "Traceback" not in err and all(n in lines[0] for n in needles), (needles, err)
    return lines[0]


@pytest.mark.timeout(600)
def test_bad_inputs_one_line_exit_2(runs, tmp_path, capsys):
    x, ws1, lp2 = runs["x_path"], runs["ws1"], runs["lp2"]
    out = tmp_path / "out.npz"
    np.save(tmp_path / "wide.npy", np.zeros((5, 6), np.float32))
    nan = np.ones((5, 4), np.float32)
    nan[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan)
    (tmp_path / "text.npy").write_text("not numpy")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(ws1 / "config.yaml", empty / "config.yaml")
    cases = [
        (predict_main, ["--run", ws1, "--input", tmp_path / "wide.npy", "--output", out], ["4 input values", "(5, 6)"]),
        (predict_main, ["--run", ws1, "--input", tmp_path / "nan.npz", "--output", out], ["non-finite", "[2, 1]"]),
        (predict_main, ["--run", ws1, "--input", tmp_path / "nan.npz", "--key", "z", "--output", out], ["no array 'z'"]),
        (predict_main, ["--run", ws1, "--input", tmp_path / "text.npy", "--output", out], ["cannot read"]),
        (predict_main, ["--run", ws1, "--input", x, "--output", tmp_path / "out.csv"], [".npz", ".npy"]),
        (predict_main, ["--run", tmp_path / "nope", "--input", x, "--output", out], ["does not exist"]),
        (predict_main, ["--run", tmp_path, "--input", x, "--output", out], ["no config.yaml"]),
        (predict_main, ["--run", empty, "--input", x, "--output", out], ["no checkpoint"]),
        (predict_main, ["--run", ws1, "--input", x, "--output", out, "--step", "15"], ["no checkpoint at step 15",
                                                                                        "10, 20"]),
        (evaluate_main, ["--run", tmp_path / "nope"], ["does not exist"]),
        (export_main, ["--run", ws1, "--out", tmp_path / "w.pt"], [".safetensors"]),
        (export_main, ["--run", empty, "--out", tmp_path / "w.safetensors"], ["no checkpoint"]),
    ]
    labels = np.array([0, 1, 2, 5, 1], np.int64)
    np.savez(tmp_path / "bad_labels.npz", x=np.zeros((5, 4), np.float32), y=labels)
    np.savez(tmp_path / "float_labels.npz", x=np.zeros((5, 4), np.float32), y=labels.astype(np.float32))
    np.savez(tmp_path / "narrow.npz", x=np.zeros((5, 3), np.float32), y=labels % 3)
    cases += [
        (evaluate_main, ["--run", lp2, "--data", tmp_path / "bad_labels.npz"], ["outside [0, 3)", "model.out_dim"]),
        (evaluate_main, ["--run", lp2, "--data", tmp_path / "float_labels.npz"], ["integer class labels"]),
        (evaluate_main, ["--run", lp2, "--data", tmp_path / "narrow.npz"], ["4 input values"]),
        (evaluate_main, ["--run", lp2, "--data", tmp_path / "nope.npz"], ["no such file"]),
        (evaluate_main, ["--run", lp2, "--data", tmp_path / "nan.npz", "--split", "train"], ["--split"]),
    ]
    for main, argv, needles in cases:
        _one_line_error(capsys, main([*map(str, argv), *(["--no-progress"] if main is predict_main else [])]),
                        *needles)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))

    # damaged checkpoints: the newest falls back to the older, with one line; none left: exit 2
    run = tmp_path / "damaged"
    shutil.copytree(ws1, run)
    for step in (20, 10):
        shard = run / "checkpoints" / f"step_{step:08d}" / "shard_0000.bin"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        code = predict_main(["--run", str(run), "--input", str(x), "--output", str(out), "--no-progress"])
        err = capsys.readouterr().err
        if step == 20:
            assert code == 0 and "step_00000020" in err and "sha256 mismatch" in err and "using" in err, err
            with np.load(out) as f:
                assert np.array_equal(f["outputs"], reference(ws1, runs["x"], step=10))
            capsys.readouterr()
            _one_line_error(capsys, evaluate_main(["--run", str(run), "--step", "20"]), "step 20 is damaged")
        else:
            assert code == 2 and "no intact checkpoint (2 damaged)" in err and len(err.strip().splitlines()) == 1, err

    # the real exit status and stream of a process, plain and under torchrun
    proc = command("predict", "--run", ws1, "--input", tmp_path / "nan.npz", "--output", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"randlift-predict: error: --input='{tmp_path / 'nan.npz'}': array 'x' has 1 non-finite values (NaN or inf; "
        "the first at index [2, 1]): clean the data before training"]
    proc = command("evaluate", "--run-dir", run, nproc=2)
    assert proc.returncode != 0 and sum("no intact checkpoint" in ln for ln in proc.stderr.splitlines()) == 1, \
        proc.stderr[-3000:]
