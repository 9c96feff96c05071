"""The memory and communication model (`randlift_dist.estimate`) of whole runs against real ones.

- parameters and indices: exactly those of a real world-size-1 `LiftedNetwork` (fixed-degree
  law: the expected edge counts are exact) after a training step and the evaluation forwards,
  every `CSR` structure its kernels built counted; parameters within a few % for the Bernoulli law;
- DeepSpeed ZeRO-1 over two data-parallel ranks, fp32 and bf16: weights, the fp32 master
  partition and the moments exactly those of a real engine after a step;
- two lift-parallel ranks (a real gloo world): rows and parameters of each rank exactly, and the
  halo, the rows sent and the indices (CSRs and the plan's exchange arrays) within a few % of the
  sampled plan's;
- halo and exchange volume against the plan statistics CLI (`python -m randlift_dist.planstats
  --json`), which samples the real lift;
- the allocator the CPU model assumes: the CLI's mmap threshold really maps tensors that big;
- the CLI's JSON keys, `--device cuda` / `--no-triton`, bad input exits 2 with one line, and the
  memory benchmark still runs on this API. The terms one by one: `test_estimate_terms.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed import run_world
from randlift_dist import LiftedNetwork
from randlift_dist.config import load_config
from randlift_dist.estimate import PARTS, estimate, main
from randlift_dist.ops import CSR
from test_estimate_terms import csr_structures, storage_bytes

ROOT = Path(__file__).resolve().parents[1]
BASE = {"builder": "residual_mlp", "in_dim": 3, "width": 4, "depth": 3, "out_dim": 1, "activation": "gelu",
        "bias": True}


def _write(tmp_path: Path, name: str, lift: dict, **sections) -> str:
    cfg = {"model": {"base": BASE, "lift": lift}, "train": {"batch_size": 16}, "parallel": {"engine": "torch"}}
    cfg.update(sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _index_bytes(net: torch.nn.Module) -> int:
    seen: set = set()
    csrs = [v for m in net.modules() for v in vars(m).values() if isinstance(v, CSR)]
    assert csrs, "no CSR found on the network's modules"
    return sum(sum(csr_structures(c, seen).values()) for c in csrs)


@pytest.mark.parametrize("size,n_test", [(700, 40), (2048, 300)])
def test_parameters_and_index_bytes_exact(tmp_path, size, n_test):
    """Training at batch 16 (the readout-side edges, d_v = 1 from d_u = 4: the CSR kernel with its
    fused backward) and evaluation of n_test and the training rows in chunks of the training batch
    (`limits.eval_chunk`) and their remainders: every structure built."""
    path = _write(tmp_path, "fixed.yaml", {"size": size, "degree": 5, "law": "fixed_degree", "block_size": 256},
                  data={"n_test": n_test})
    cfg = load_config(path)
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=1, readout_scale="sqrt", seed=0)
    est = estimate(cfg)
    params = sum(p.numel() for p in net.parameters())
    assert est["params"] == params and est["params_per_rank"] == params
    assert max(est["eval_batches"]) == 16 and (n_test % 16 == 0 or n_test % 16 in est["eval_batches"])
    net(torch.randn(16, 3)).square().sum().backward()
    with torch.no_grad():
        for b in est["eval_batches"]:
            net(torch.randn(b, 3))
    assert est["indices_bytes"] == _index_bytes(net)


def test_bernoulli_parameters_close(tmp_path):
    path = _write(tmp_path, "bern.yaml", {"size": 3000, "degree": 6, "seed": 2, "block_size": 256})
    cfg = load_config(path)
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=1)
    assert estimate(cfg)["params"] == pytest.approx(sum(p.numel() for p in net.parameters()), rel=0.02)


# ---------------------------------------------------------------- two real ranks
TWO_RANKS = {"model": {"base": dict(BASE, depth=2), "lift": {"size": 3000, "degree": 6, "law": "fixed_degree",
                                                             "seed": 3, "block_size": 64}},
             "data": {"n_test": 24}, "train": {"batch_size": 8}, "parallel": {"engine": "torch", "lift_parallel": 2}}


def _two_rank_worker(rank: int, world_size: int, path: str, exchange: str) -> dict:
    """One rank's real plan and network: what the estimate predicts, counted."""
    from randlift_dist import Communicator, Layout, build_plan

    base, lift = load_config(path).build_lift()
    layout = Layout.from_initialized(2)
    plan = build_plan(lift, layout, "block", exchange)
    net = LiftedNetwork(base, lift, plan, Communicator.create(plan, layout), out_dim=1)
    net(torch.randn(8, 3)).square().sum().backward()
    with torch.no_grad():
        for b in estimate(load_config(path), 2)["eval_batches"]:  # the test rows and training rows evaluated
            net(torch.randn(b, 3))
    arrays = [[ep.local_first, ep.exchange.send_idx, ep.exchange.halo_global] for ep in plan.edges.values()
              if ep.exchange is not None]
    ex = {f"{u}->{v}": (ep.exchange.mode, ep.exchange.n_halo, ep.exchange.rows_sent())
          for (u, v), ep in plan.edges.items() if ep.exchange is not None}
    return {"params": sum(p.numel() for p in net.parameters()), "exchange": ex,
            "indices": _index_bytes(net) + storage_bytes(arrays, set())}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("exchange", ["alltoall", "allgather"])
def test_two_ranks_against_their_real_plans(tmp_path, exchange):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**TWO_RANKS, "parallel": {**TWO_RANKS["parallel"], "exchange": exchange}}))
    ranks = run_world(_two_rank_worker, 2, str(path), exchange, timeout=200)
    est = estimate(load_config(str(path)), 2)
    assert est["params_per_rank"] == max(r["params"] for r in ranks)  # fixed degree, equal loads: exact
    by_edge = {e["edge"]: e for e in est["edges"]}
    assert {name for r in ranks for name in r["exchange"]} == {n for n, e in by_edge.items() if e["mode"] != "none"}
    for r, real in enumerate(ranks):
        for name, (mode, n_halo, _) in real["exchange"].items():
            assert by_edge[name]["mode"] == mode == exchange
            assert by_edge[name]["halo_rows_per_rank"][r] == pytest.approx(n_halo, rel=0.03)
    sent_rows = sum(s for r in ranks for _, _, s in r["exchange"].values()) / 2  # the estimate: each rank's expectation
    assert est["exchange_bytes_forward_per_step"] == pytest.approx(sent_rows * 8 * 4 * 4, rel=0.03)  # B 8, d_u 4
    assert est["indices_bytes"] == pytest.approx(max(r["indices"] for r in ranks), rel=0.03)


DS_OVERRIDES = ([], ["parallel.precision=bf16"])


def _deepspeed_worker(rank: int, world_size: int, path: str) -> list[dict]:
    """ZeRO-1 over 2 data-parallel ranks, fp32 then bf16: what one rank holds after a step."""
    from randlift_dist import Layout
    from randlift_dist.engine import DeepSpeedEngine

    out = []
    for over in DS_OVERRIDES:
        cfg = load_config(path, over)
        base, lift = cfg.build_lift()
        eng = DeepSpeedEngine(LiftedNetwork(base, lift, out_dim=1, readout_init="normal"), cfg, Layout.from_initialized(1))
        eng.train_step(torch.randn(4, 3), torch.randn(4, 1))
        opt = eng.engine.optimizer
        moments = [t for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
        out.append({"weights": storage_bytes(list(eng.net.parameters()), set()),
                    "master": storage_bytes(opt.single_partition_of_fp32_groups, set()),
                    "moments": storage_bytes(moments, set())})
    return out


@pytest.mark.timeout(300)
def test_zero1_state_equals_a_real_deepspeed_engine(tmp_path):
    """bf16 or fp32 weights, the fp32 master partition and Adam's moments on it (1 / D each)."""
    pytest.importorskip("deepspeed")
    path = _write(tmp_path, "ds.yaml", {"size": 400, "degree": 4, "law": "fixed_degree", "block_size": 64},
                  train={"batch_size": 8}, data={"n_test": 8},
                  parallel={"engine": "deepspeed", "zero_stage": 1})
    ranks = run_world(_deepspeed_worker, 2, path, timeout=280)
    for over, real in zip(DS_OVERRIDES, ranks[0]):
        est = estimate(load_config(path, over), 2)
        assert (est["weights_bytes"], est["master_weights_bytes"], est["optimizer_state_bytes"]) == \
            (real["weights"], real["master"], real["moments"]), over


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


# ---------------------------------------------------------------- the allocator the CPU model assumes
ALLOC_SCRIPT = """
import ctypes, sys, torch
from randlift_dist import train
from randlift_dist.limits import MMAP_THRESHOLD
if sys.argv[1] == "limit":
    assert train.limit_heap()
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    return 0, 0
where = []
for _ in range(3):  # glibc raises its threshold to a freed mapping's size: the second one comes from the heap
    t = torch.empty(MMAP_THRESHOLD // 4 + 1024)
    lo, hi = heap()
    where.append("heap" if lo <= t.data_ptr() < hi else "mapped")
    del t
print(" ".join(where))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tensors_of_the_threshold_are_mapped_only_with_the_clis_setting():
    """The CPU model puts tensors of `MMAP_THRESHOLD` bytes or more in `transient` (mapped, returned
    when freed): true under `train.limit_heap`; with glibc's default they end up in the heap."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc")
    env = {"RANDLIFT_MALLOC": "", "PATH": "/usr/bin:/bin"}
    got = {}
    for mode in ("limit", "default"):
        out = subprocess.run([sys.executable, "-c", ALLOC_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        got[mode] = out.stdout.split()
    assert got["limit"] == ["mapped"] * 3
    assert "heap" in got["default"]


# ---------------------------------------------------------------- the CLI
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
    assert main(["--config", path, "--device", "cuda", "--json"]) == 0
    cuda = json.loads(capsys.readouterr().out)
    assert {e["kernel"] for e in cuda["edges"]} == {"triton"} and cuda["workspaces_bytes"] == 0
    assert main(["--config", path, "--device", "cuda", "--no-triton", "--json"]) == 0
    assert {e["kernel"] for e in json.loads(capsys.readouterr().out)["edges"]} == {"blocked"}


@pytest.mark.parametrize("args,needle", [
    (["--world-size", "3", "parallel.lift_parallel=2"], "world size 3"),
    (["model.lift.sise=4"], "sise"),
    (["train.batch_size=15", "--world-size", "2"], "batch_size"),
    (["train.micro_batch_size=5"], "train.micro_batch_size=5"),
    (["--world-size", "0"], "--world-size 0"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, needle):
    path = _write(tmp_path, "bad.yaml", {"size": 64, "degree": 2})
    assert main(["--config", path, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_exit_status_and_the_memory_benchmark(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "randlift_dist.estimate", "--config", str(tmp_path / "no.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no.yaml" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT / "bench"))
    for name in memory.CASES:  # every case's config estimates (what run_case compares with)
        cfg_path = tmp_path / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(memory.case_config(name, 2, str(tmp_path / name))))
        est = estimate(load_config(str(cfg_path)), memory.CASES[name][3])
        assert est["peak_bytes_per_rank"] > est["weights_bytes"] > 0


def test_gradient_norm_sum_of_squares_in_float64():
    """`engine._sum_squares` (one reused float64 chunk buffer) against a whole float64 copy."""
    from randlift_dist.engine import _sum_squares

    g = torch.randn(3 * 1000 + 7, generator=torch.Generator().manual_seed(0))
    want = (g.double() ** 2).sum()
    assert float(_sum_squares(g, chunk=1000)) == pytest.approx(float(want), rel=1e-14)
    assert float(_sum_squares(g.double())) == pytest.approx(float(want), rel=1e-14)
    assert float(_sum_squares(torch.empty(0))) == 0.0


def test_evaluation_chunks_follow_the_training_batch():
    """Evaluation runs in chunks of the training micro-batch per replica (at most EVAL_CHUNK rows), so
    a run sized by its training step is not pushed over by its evaluations; the estimator asks the
    same function."""
    from randlift_dist.limits import EVAL_CHUNK, eval_chunk
    assert eval_chunk(64, 1, None) == 64 and eval_chunk(64, 2, None) == 32 and eval_chunk(64, 2, 8) == 8
    assert eval_chunk(1 << 16, 1, None) == EVAL_CHUNK and eval_chunk(1, 4, None) == 1
    cfg = load_config(None, ["train.batch_size=32", "data.n_test=1000", "data.n_train=3000"])
    est = estimate(cfg)
    assert max(est["eval_batches"]) == 32 and 1000 % 32 in est["eval_batches"]
