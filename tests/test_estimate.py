"""The memory and communication model (`randlift_dist.estimate`) against exact counts.

- parameters: exactly those of a real world-size-1 `LiftedNetwork` (fixed-degree law: the
  expected edge counts are exact), and within a few % for the Bernoulli law;
- indices: the bytes of every `CSR` of a real network, with the caches its kernels build in one
  forward and backward, within 2 %;
- halo and exchange volume: the expected halo per base edge and the bytes per sample against the
  plan statistics CLI (`python -m randlift_dist.planstats --json`), which samples the real lift;
- layout, precision and ZeRO terms scale as documented; the CLI's JSON keys, and bad input exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from randlift_dist import LiftedNetwork
from randlift_dist.config import load_config
from randlift_dist.estimate import PARTS, estimate, main
from randlift_dist.ops import CSR

ROOT = Path(__file__).resolve().parents[1]
BASE = {"builder": "residual_mlp", "in_dim": 3, "width": 4, "depth": 3, "out_dim": 1, "activation": "gelu",
        "bias": True}


def _write(tmp_path: Path, name: str, lift: dict, **sections) -> str:
    cfg = {"model": {"base": BASE, "lift": lift}, "train": {"batch_size": 16}, "parallel": {"engine": "torch"}}
    cfg.update(sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of the distinct tensor storages reachable from obj (CSR attributes, caches)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, CSR):
        return _tensor_bytes(vars(obj), seen)
    return 0


def _network(path: str) -> tuple[LiftedNetwork, dict]:
    cfg = load_config(path)
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=1, readout_scale="sqrt", seed=0)
    return net, estimate(cfg)


@pytest.mark.parametrize("size", [700, 2048])
def test_parameters_exact_and_index_bytes(tmp_path, size):
    path = _write(tmp_path, "fixed.yaml", {"size": size, "degree": 5, "law": "fixed_degree", "block_size": 256})
    net, est = _network(path)
    params = sum(p.numel() for p in net.parameters())
    assert est["params"] == params and est["params_per_rank"] == params
    assert est["weights_bytes"] == 4 * params and est["gradients_bytes"] == 4 * params
    assert est["optimizer_state_bytes"] == 8 * params  # Adam: two fp32 moments
    x = torch.randn(16, 3)
    net(x).square().sum().backward()  # builds the kernels' cached structures (transposed, groups, ...)
    seen: set = set()
    csrs = [v for m in net.modules() for v in vars(m).values() if isinstance(v, CSR)]
    assert csrs, "no CSR found on the network's modules"
    held = sum(_tensor_bytes(c, seen) for c in csrs)
    assert est["indices_bytes"] == pytest.approx(held, rel=0.02)


def test_bernoulli_parameters_close(tmp_path):
    path = _write(tmp_path, "bern.yaml", {"size": 3000, "degree": 6, "seed": 2, "block_size": 256})
    net, est = _network(path)
    assert est["params"] == pytest.approx(sum(p.numel() for p in net.parameters()), rel=0.02)


def _planstats(path: str, P: int, exchange: str, as_cli: bool, capsys) -> dict:
    """The plan statistics of the sampled lift: through the real CLI, or its `main` in-process."""
    argv = ["--config", path, "--world-size", str(P), "--exchange", exchange, "--json"]
    if as_cli:
        out = subprocess.run([sys.executable, "-m", "randlift_dist.planstats", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    from randlift_dist.planstats import main as planstats_main

    capsys.readouterr()
    planstats_main(argv)
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("P,exchange,as_cli", [(2, "auto", True), (2, "alltoall", False), (4, "alltoall", False)])
def test_halo_and_bytes_match_plan_statistics(tmp_path, capsys, P, exchange, as_cli):
    path = _write(tmp_path, "halo.yaml", {"size": 6000, "degree": 3, "seed": 1, "block_size": 256})
    stats = _planstats(path, P, exchange, as_cli, capsys)
    est = estimate(load_config(path, [f"parallel.lift_parallel={P}", f"parallel.exchange={exchange}"]))
    by_edge = {e["edge"]: e for e in est["edges"]}
    exchanging = [s for s in stats["edges"] if s["mode"] != "none"]
    assert exchanging
    for s in stats["edges"]:
        e = by_edge[s["edge"]]
        assert e["mode"] == s["mode"]
        if s["mode"] != "none":
            assert e["halo_rows"] == pytest.approx(s["halo_rows"], rel=0.03)
    per_sample = est["exchange_bytes_forward_per_step"] / est["micro_batch"]
    mean_rank = stats["total"]["bytes_per_sample"]["sum"] / P  # the estimate is every rank's expectation
    assert per_sample == pytest.approx(mean_rank, rel=0.03)


def test_layout_precision_and_zero_terms(tmp_path):
    path = _write(tmp_path, "zero.yaml", {"size": 4096, "degree": 4, "law": "fixed_degree"},
                  train={"batch_size": 64})
    one = estimate(load_config(path))
    lp2 = estimate(load_config(path, ["parallel.lift_parallel=2"]))
    assert lp2["params_per_rank"] == pytest.approx(one["params_per_rank"] / 2, rel=0.01)
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=1"]
    f32 = estimate(load_config(path, ds), world_size=4)
    z1 = estimate(load_config(path, ds + ["parallel.precision=bf16"]), world_size=4)
    assert f32["weights_bytes"] == pytest.approx(4 * one["params"])
    assert z1["weights_bytes"] == pytest.approx(2 * one["params"])  # bf16 parameters
    assert z1["optimizer_state_bytes"] == pytest.approx(8 * one["params"] / 4)  # fp32 moments / D
    assert z1["master_weights_bytes"] == pytest.approx(4 * one["params"] / 4)  # the fp32 copy / D
    off = estimate(load_config(path, ds + ["parallel.precision=bf16", "parallel.offload_optimizer=true"]), world_size=4)
    assert off["optimizer_state_bytes"] == 0 and off["host_bytes_per_rank"] > 0
    assert off["peak_bytes_per_rank"] < z1["peak_bytes_per_rank"]


def test_cli_json(tmp_path, capsys):
    path = _write(tmp_path, "cli.yaml", {"size": 512, "degree": 4})
    assert main(["--config", path, "--world-size", "2", "parallel.lift_parallel=2", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    for k in ("peak_bytes_per_rank", "params", "params_per_rank", "bytes_per_param", "peak_phase",
              "exchange_bytes_forward_per_step", "exchange_bytes_backward_per_step", "setup_peak_bytes_per_rank"):
        assert k in est
    parts = sum(est[f"{k}_bytes"] for k in PARTS)
    assert est["peak_bytes_per_rank"] == max(parts, est["setup_peak_bytes_per_rank"])
    assert est["bytes_per_param"] == pytest.approx(est["peak_bytes_per_rank"] / est["params_per_rank"])
    assert est["exchange_bytes_forward_per_step"] > 0
    assert main(["--config", path]) == 0
    assert "peak" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--world-size", "3", "parallel.lift_parallel=2"], "--world-size 3"),
    (["model.lift.sise=4"], "sise"),
    (["train.batch_size=15", "--world-size", "2"], "batch_size"),
    (["--world-size", "0"], "--world-size 0"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, needle):
    path = _write(tmp_path, "bad.yaml", {"size": 64, "degree": 2})
    assert main(["--config", path, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_exit_status(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "randlift_dist.estimate", "--config", str(tmp_path / "no.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no.yaml" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_allocator_settings_the_model_assumes(monkeypatch):
    """The CPU model assumes the CLI's mmap threshold (`train.limit_heap`); `RANDLIFT_MALLOC=default`
    leaves glibc and torch's huge-page setting alone."""
    import os
    import platform

    from randlift_dist import train
    from randlift_dist.estimate import MMAP_THRESHOLD

    assert train.HEAP_MMAP_THRESHOLD == MMAP_THRESHOLD
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setenv("RANDLIFT_MALLOC", "default")
    assert train.limit_heap() is False and "THP_MEM_ALLOC_ENABLE" not in os.environ
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        monkeypatch.delenv("RANDLIFT_MALLOC")
        assert train.limit_heap() is True
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def test_weight_gradient_copy_only_with_micro_batches(tmp_path):
    """Torch engine: the first micro-batch's weight gradients become `.grad` as they are; later ones
    are added to it, so micro-batches add (at most) one copy of an edge's gradient to the peak."""
    lift, data = {"size": 4096, "degree": 8, "law": "fixed_degree"}, {"n_test": 16}
    one = estimate(load_config(_write(tmp_path, "a.yaml", lift, data=data, train={"batch_size": 16})))
    acc = estimate(load_config(_write(tmp_path, "b.yaml", lift, data=data,
                                      train={"batch_size": 32, "micro_batch_size": 16})))
    largest = max(e["edges"] * e["d_src"] * e["d_dst"] for e in one["edges"]) * 4
    assert 0 < acc["peak_bytes_per_rank"] - one["peak_bytes_per_rank"] <= largest + one["gradients_bytes"]


def test_gradient_norm_sum_of_squares_in_float64():
    """`engine._sum_squares` (one reused float64 chunk buffer) against a whole float64 copy."""
    from randlift_dist.engine import _sum_squares

    g = torch.randn(3 * 1000 + 7, generator=torch.Generator().manual_seed(0))
    want = (g.double() ** 2).sum()
    assert float(_sum_squares(g, chunk=1000)) == pytest.approx(float(want), rel=1e-14)
    assert float(_sum_squares(g.double())) == pytest.approx(float(want), rel=1e-14)
    assert float(_sum_squares(torch.empty(0))) == 0.0
