"""GPU checks (CUDA): kernel parity with the CPU reference, networks on a GPU (MLPs, CNNs, a
transformer) against the CPU, a training run.

Kernels `blocked` and `triton` (compiled; `tests/test_triton.py` has the finer-grained Triton
parity tests, which also run on CUDA when a GPU is present), bitwise reruns of the Triton
kernels, activations past 2**31 elements (int64 offsets). Skipped where no CUDA device is
present (CI, these CPU machines); `bench/gpu_check.sh` runs them together with the GPU timings
when a GPU is lent.
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


def _has_triton() -> bool:
    from randlift_dist.ops import triton_kernels

    return triton_kernels.available()


# (impl, dtype, relative tolerance against the float64 CPU reference)
CASES = [("blocked", torch.float64, 1e-10), ("blocked", torch.float32, 1e-5),
         ("triton", torch.float32, 1e-5), ("triton", torch.bfloat16, 3e-2), ("auto", torch.float32, 1e-5)]


@pytest.mark.parametrize("impl, dtype, tol", CASES)
@pytest.mark.parametrize("d_v, d_u, B", [(1, 1, 64), (16, 16, 32), (8, 1, 16), (1, 8, 16), (16, 16, 1),
                                         (32, 16, 300), (1, 1, 1000)])
def test_kernels_on_gpu_match_cpu_reference(d_v, d_u, B, impl, dtype, tol):
    if impl == "triton" and not _has_triton():
        pytest.skip("triton is not installed")
    csr, y, w = _problem(300, 200, 6, d_v, d_u, B)
    y_ref, w_ref = y.clone().requires_grad_(), w.clone().requires_grad_()
    z_ref = aggregate(y_ref, w_ref, csr, "reference")
    g = torch.randn_like(z_ref)
    z_ref.backward(g)
    dev = torch.device("cuda")
    y_d = y.to(dev, dtype).requires_grad_()
    w_d = w.to(dev, dtype).requires_grad_()
    z = aggregate(y_d, w_d, csr.to(dev), impl)
    z.backward(g.to(dev, dtype))
    for got, ref in ((z, z_ref), (y_d.grad, y_ref.grad), (w_d.grad, w_ref.grad)):
        assert got.dtype == dtype
        err = (got.double().cpu() - ref.detach()).norm() / ref.detach().norm()
        assert err < tol, (impl, dtype, float(err))


@pytest.mark.parametrize("d", [1, 16])
def test_triton_on_gpu_is_bitwise_deterministic(d):
    if not _has_triton():
        pytest.skip("triton is not installed")
    csr, y, w = _problem(4096, 4096, 24, d, d, 128, seed=3)
    dev = torch.device("cuda")
    csr = csr.to(dev)
    y = y.to(dev, torch.float32).requires_grad_()
    w = w.to(dev, torch.float32).requires_grad_()
    g = torch.randn(4096, d, 128, device=dev)
    runs = []
    for _ in range(2):
        z = aggregate(y, w, csr, "triton")
        runs.append((z.detach().clone(), *torch.autograd.grad(z, (y, w), g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.timeout(300)
def test_triton_offsets_beyond_int32():
    """Activations of more than 2**31 elements: rows near the end are gathered correctly."""
    if not _has_triton():
        pytest.skip("triton is not installed")
    B, tail = 512, 100
    n = (1 << 31) // B + 4096  # y [n, 1, B] bf16 has > 2**31 elements (4.3 GB)
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(4)
    row = torch.arange(64).repeat_interleave(5)
    col_sub = torch.randint(0, tail, (row.numel(),), generator=g)
    y_sub = torch.randn(tail, 1, B, generator=g).to(torch.bfloat16)
    w = torch.randn(row.numel(), 1, 1, generator=g).to(torch.bfloat16)
    gz = torch.randn(64, 1, B, generator=g).to(torch.bfloat16)
    ref = [t.float() for t in _grads(y_sub.float(), w.float(), CSR(row, col_sub, 64, tail), gz.float(), "reference")]
    y = torch.zeros(n, 1, B, dtype=torch.bfloat16, device=dev)
    y[n - tail:] = y_sub.to(dev)
    z, gy, gw = _grads(y, w.to(dev), CSR(row, col_sub + n - tail, 64, n).to(dev), gz.to(dev), "triton")
    for got, r in ((z, ref[0]), (gy[n - tail:], ref[1]), (gw, ref[2])):
        assert ((got.float().cpu() - r).norm() / r.norm()) < 3e-2
    assert not gy[:n - tail].any()


def _grads(y, w, csr, gz, impl):
    y, w = y.detach().requires_grad_(), w.detach().requires_grad_()
    z = aggregate(y, w, csr, impl)
    return (z.detach(), *torch.autograd.grad(z, (y, w), gz))


@pytest.mark.parametrize("impl", ["blocked", "triton"])
def test_network_on_gpu_matches_cpu(impl):
    if impl == "triton" and not _has_triton():
        pytest.skip("triton is not installed")
    base = BaseGraph.residual_mlp(3, 8, 3, 2, "gelu", bias=True)
    lift = random_sparse_lift(base, 257, 5, seed=1)
    cpu = LiftedNetwork(base, lift, readout_init="normal", seed=2)
    gpu = LiftedNetwork(base, lift, readout_init="normal", seed=2, impl=impl).cuda()
    x = torch.randn(17, 3)
    out_c, out_g = cpu(x), gpu(x.cuda())
    assert torch.allclose(out_g.cpu(), out_c, rtol=1e-4, atol=1e-5)
    out_c.square().sum().backward()
    out_g.square().sum().backward()
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        err = (pg.grad.cpu() - pc.grad).norm() / pc.grad.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))


POSITIONED = {  # vertices with positions: conv windows (1-d, 2-d), pooling, attention, norms, tokens
    "cnn1d": lambda: BaseGraph.cnn1d(40, 1, [4, 4, 4], 10, kernel=[5, 3, 3], stride=2, padding=1, head="flatten"),
    "cnn2d": lambda: BaseGraph.cnn2d([9, 8], 2, [2, 3], 2, kernel=3, stride=[1, 2], head="mean"),
    "transformer": lambda: BaseGraph.transformer(6, 4, 3, 2, tokens=9, causal=True, mixer_kernel=3, depth=2),
}


def _positioned_parity(name: str, impl: str, device: str) -> None:
    """The same lift and weights on CPU and on `device`: outputs and every parameter's gradient."""
    base = POSITIONED[name]()
    lift = random_sparse_lift(base, 24, 4, seed=1)
    cpu = LiftedNetwork(base, lift, readout_init="normal", seed=2)
    dev = LiftedNetwork(base, lift, readout_init="normal", seed=2, impl=impl).to(device)
    x = torch.randn(13, base.in_dim)
    tokens = base.vertices[base.inputs[0]].tokens
    if tokens is not None:
        x = torch.randint(0, tokens, x.shape).float()
    out_c, out_d = cpu(x), dev(x.to(device))
    assert torch.allclose(out_d.cpu(), out_c, rtol=1e-4, atol=1e-5), (name, float((out_d.cpu() - out_c).abs().max()))
    out_c.square().sum().backward()
    out_d.square().sum().backward()
    for (pname, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
        err = (pd.grad.cpu() - pc.grad).norm() / pc.grad.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, pname, float(err))


@pytest.mark.parametrize("name", sorted(POSITIONED))
@pytest.mark.parametrize("impl", ["blocked", "triton"])
def test_positioned_networks_on_gpu_match_cpu(name, impl):
    if impl == "triton" and not _has_triton():
        pytest.skip("triton is not installed")
    _positioned_parity(name, impl, "cuda")


@pytest.mark.timeout(600)
def test_training_run_on_gpu(tmp_path):
    import json

    from launch import launch

    launch(tmp_path, 1, "parallel.engine=torch", "train.steps=60", "wandb.mode=disabled", timeout=600)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["test_loss"] for r in recs if "test_loss" in r]
    assert evals[-1] < evals[0]
    assert recs[-1]["peak_mem_mb"] > 0
