"""GPU checks (CUDA): kernel parity with the CPU reference, the network on a GPU, a training run.

Skipped where no CUDA device is present (CI, these CPU machines); `bench/gpu_check.sh` runs them
together with the GPU timings when a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift
from randlift_dist.ops import CSR, aggregate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _problem(n_v, n_u, k, d_v, d_u, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    row = torch.arange(n_v).repeat_interleave(k)
    col = torch.randint(0, n_u, (n_v * k,), generator=g)
    key = torch.unique(row * n_u + col)
    row, col = key // n_u, key % n_u
    y = torch.randn(n_u, d_u, B, generator=g, dtype=torch.float64)
    w = torch.randn(row.numel(), d_v, d_u, generator=g, dtype=torch.float64)
    return CSR(row, col, n_v, n_u), y, w


@pytest.mark.parametrize("d_v, d_u, B", [(1, 1, 64), (16, 16, 32), (8, 1, 16), (1, 8, 16), (16, 16, 1)])
def test_kernels_on_gpu_match_cpu_reference(d_v, d_u, B):
    csr, y, w = _problem(300, 200, 6, d_v, d_u, B)
    y_ref, w_ref = y.clone().requires_grad_(), w.clone().requires_grad_()
    z_ref = aggregate(y_ref, w_ref, csr, "reference")
    g = torch.randn_like(z_ref)
    z_ref.backward(g)
    dev = torch.device("cuda")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        y_d = y.to(dev, dtype).requires_grad_()
        w_d = w.to(dev, dtype).requires_grad_()
        z = aggregate(y_d, w_d, csr.to(dev), "auto")
        z.backward(g.to(dev, dtype))
        for got, ref in ((z, z_ref), (y_d.grad, y_ref.grad), (w_d.grad, w_ref.grad)):
            err = (got.double().cpu() - ref.detach()).norm() / ref.detach().norm()
            assert err < tol, (dtype, err)


def test_network_on_gpu_matches_cpu():
    base = BaseGraph.residual_mlp(3, 8, 3, 2, "gelu", bias=True)
    lift = random_sparse_lift(base, 257, 5, seed=1)
    cpu = LiftedNetwork(base, lift, readout_init="normal", seed=2)
    gpu = LiftedNetwork(base, lift, readout_init="normal", seed=2).cuda()
    x = torch.randn(17, 3)
    out_c, out_g = cpu(x), gpu(x.cuda())
    assert torch.allclose(out_g.cpu(), out_c, rtol=1e-4, atol=1e-5)
    out_c.square().sum().backward()
    out_g.square().sum().backward()
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        err = (pg.grad.cpu() - pc.grad).norm() / pc.grad.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))


@pytest.mark.timeout(600)
def test_training_run_on_gpu(tmp_path):
    import json

    from launch import launch

    launch(tmp_path, 1, "parallel.engine=torch", "train.steps=60", "wandb.mode=disabled", timeout=600)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["test_loss"] for r in recs if "test_loss" in r]
    assert evals[-1] < evals[0]
    assert recs[-1]["peak_mem_mb"] > 0
