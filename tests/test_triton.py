"""`aggregate(..., impl="triton")` against `impl="reference"`: forward, input and weight gradients.

Without a CUDA device (CI, these CPU machines) the kernels run on CPU tensors under the Triton
interpreter (`TRITON_INTERPRET=1`, set here before triton is imported); with a GPU and
`TRITON_INTERPRET` unset they run compiled on CUDA. The reference is always the float64 CPU
result. Shapes are small (the interpreter runs each program in Python). Also: bitwise equal
reruns, tiling edge cases (tiny tiles), the error paths, that the kernels compile for sm_90 on a
machine without a GPU, and that importing the package does not import triton.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
triton = pytest.importorskip("triton")

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift  # noqa: E402
from randlift_dist.ops import CSR, aggregate  # noqa: E402
from randlift_dist.ops import triton_kernels as tk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = torch.device("cpu" if INTERPRET else "cuda")
# rows of very different in-degree in one CSR, incl. empty rows; sources 13..15 have no out-edges
DEGREES = [0, 1, 30, 0, 3, 1, 5, 2, 0, 7]
N_SRC = 16


def _mixed_csr(seed: int = 0) -> CSR:
    g = torch.Generator().manual_seed(seed)
    row = torch.arange(len(DEGREES)).repeat_interleave(torch.tensor(DEGREES))
    col = torch.randint(0, N_SRC - 3, (row.numel(),), generator=g)
    return CSR(row, col, len(DEGREES), N_SRC)


def _run(csr: CSR, y: torch.Tensor, w: torch.Tensor, g: torch.Tensor, impl: str, dtype, dev):
    """Forward and both gradients of `aggregate` at dtype on dev, returned as CPU tensors."""
    y_d = y.to(dev, dtype, copy=True).requires_grad_()
    w_d = w.to(dev, dtype, copy=True).requires_grad_()
    z = aggregate(y_d, w_d, csr.to(dev), impl)
    z.backward(g.to(dev, dtype))
    assert z.dtype == dtype and y_d.grad.dtype == dtype and w_d.grad.dtype == dtype
    return [t.detach().cpu() for t in (z, y_d.grad, w_d.grad)]


def _check(csr: CSR, d_v: int, d_u: int, B: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(csr.n_cols, d_u, B, generator=g, dtype=torch.float64)
    w = torch.randn(csr.nnz, d_v, d_u, generator=g, dtype=torch.float64)
    gz = torch.randn(csr.n_rows, d_v, B, generator=g, dtype=torch.float64)
    ref = _run(csr, y, w, gz, "reference", torch.float64, torch.device("cpu"))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        got = _run(csr, y, w, gz, "triton", dtype, DEV)
        for name, a, r in zip(("z", "grad y", "grad w"), got, ref):
            err = float((a.double() - r).norm() / r.norm().clamp_min(1e-30))
            assert err < tol, (name, dtype, d_v, d_u, err)
        # rows without in-edges and sources without out-edges get exact zeros
        assert not got[0][torch.tensor(DEGREES) == 0].any()
        assert not got[1][N_SRC - 3:].any()


@pytest.mark.parametrize("d_v, d_u", [(1, 1), (8, 8), (16, 16), (32, 32), (32, 16), (16, 1), (1, 8), (3, 5)])
def test_parity_with_reference(d_v, d_u):
    _check(_mixed_csr(), d_v, d_u, B=6)


@pytest.mark.parametrize("d_v, d_u", [(1, 1), (16, 16), (8, 8)])
def test_parity_with_small_tiles(monkeypatch, d_v, d_u):
    """Several batch tiles, row blocks and edge tiles, with partial (masked) last tiles."""
    for name, value in (("_SCALAR_ROWS", 4), ("_SCALAR_BATCH", 4), ("_SCALAR_EDGES", 8),
                        ("_BLOCK_BATCH", 16), ("_BCAST_ELEMS", 1024)):
        monkeypatch.setattr(tk, name, value)
    _check(_mixed_csr(1), d_v, d_u, B=37, seed=1)


@pytest.mark.parametrize("d", [1, 16])
def test_reruns_are_bitwise_equal(d):
    csr = _mixed_csr(2)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(N_SRC, d, 20, generator=g)
    w = torch.randn(csr.nnz, d, d, generator=g)
    gz = torch.randn(csr.n_rows, d, 20, generator=g)
    first = _run(csr, y, w, gz, "triton", torch.float32, DEV)
    second = _run(csr, y, w, gz, "triton", torch.float32, DEV)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [1, 16])
def test_float16(d):
    csr = _mixed_csr(3)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(N_SRC, d, 5, generator=g, dtype=torch.float64)
    w = torch.randn(csr.nnz, d, d, generator=g, dtype=torch.float64)
    gz = torch.randn(csr.n_rows, d, 5, generator=g, dtype=torch.float64)
    ref = _run(csr, y, w, gz, "reference", torch.float64, torch.device("cpu"))
    got = _run(csr, y, w, gz, "triton", torch.float16, DEV)
    for a, r in zip(got, ref):
        assert float((a.double() - r).norm() / r.norm()) < 5e-3


def test_saves_only_inputs():
    """Between forward and backward only y and w are kept (no gathered [m, d, B] tensor)."""
    csr = _mixed_csr()
    y = torch.randn(N_SRC, 16, 4, device=DEV, requires_grad=True)
    w = torch.randn(csr.nnz, 16, 16, device=DEV, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        aggregate(y, w, csr.to(DEV), "triton")
    assert sorted(tuple(t.shape) for t in saved) == sorted([tuple(y.shape), tuple(w.shape)])
    assert all(t.data_ptr() in (y.data_ptr(), w.data_ptr()) for t in saved)


def test_network_matches_reference():
    base = BaseGraph.residual_mlp(3, 4, 2, 1, "tanh")  # dims 3 -> 4 (padded), 4 -> 4, 4 -> 1
    lift = random_sparse_lift(base, 6, 3, seed=0)
    x = torch.randn(5, 3)
    grads = []
    for impl, dev in (("reference", torch.device("cpu")), ("triton", DEV)):
        net = LiftedNetwork(base, lift, readout_init="normal", seed=1, impl=impl).to(dev)
        out = net(x.to(dev))
        out.square().sum().backward()
        grads.append((out.detach().cpu(), [p.grad.cpu() for p in net.parameters()]))
    (o_ref, g_ref), (o_tri, g_tri) = grads
    assert torch.allclose(o_tri, o_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_tri, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_conv_network_matches_reference():
    """Conv edges run the Triton kernels on the unfolded sources (d = 1 and d = 2 members, scalar and
    block paths), pooling and flatten heads: the same output and gradients as `reference`."""
    base = BaseGraph.cnn1d(9, 2, [1, 2], 1, kernel=[3, 2], stride=[1, 2], head="flatten")
    lift = random_sparse_lift(base, 4, 2, seed=0)
    x = torch.randn(3, base.in_dim)
    grads = []
    for impl, dev in (("reference", torch.device("cpu")), ("triton", DEV)):
        net = LiftedNetwork(base, lift, readout_init="normal", seed=1, impl=impl).to(dev)
        out = net(x.to(dev))
        out.square().sum().backward()
        grads.append((out.detach().cpu(), [p.grad.cpu() for p in net.parameters()]))
    (o_ref, g_ref), (o_tri, g_tri) = grads
    assert torch.allclose(o_tri, o_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_tri, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _tiny():
    csr = CSR(torch.tensor([0, 1]), torch.tensor([1, 0]), 2, 2)
    return csr, torch.randn(2, 1, 3), torch.randn(2, 1, 1)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    csr, y, w = _tiny()
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        aggregate(y, w, csr, "triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    csr, y, w = _tiny()
    with pytest.raises(RuntimeError, match="needs the triton package: pip install triton"):
        aggregate(y, w, csr, "triton")


def test_unsupported_dtype_is_a_clear_error():
    csr, y, w = _tiny()
    with pytest.raises(ValueError, match="float64.*impl='blocked'"):
        aggregate(y.double().to(DEV), w.double().to(DEV), csr.to(DEV), "triton")


def test_auto_uses_triton_only_on_cuda(monkeypatch):
    csr, y, w = _tiny()
    called = []
    orig = tk.triton_aggregate
    monkeypatch.setattr(tk, "triton_aggregate", lambda *a: called.append(1) or orig(*a))
    aggregate(y, w, csr, "auto")
    assert not called  # CPU tensors: the CPU kernels
    if torch.cuda.is_available() and not INTERPRET:
        aggregate(y.cuda(), w.cuda(), csr.to("cuda"), "auto")
        assert called


@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90():
    """The GPU code path compiles to cubins for an H100/H200 even without a GPU (a fresh process:
    the interpreter, once used, changes triton's code generation in this one)."""
    code = ("from randlift_dist.ops.triton_kernels import compile_for_target; "
            "print(compile_for_target(90))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not bundled.exists() and not shutil.which("ptxas"):
        pytest.skip("no ptxas (triton's CUDA backend) to compile for sm_90 here")
    r = subprocess.run([sys.executable, "-c", code], env=env, timeout=280, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == 28


def test_package_import_does_not_import_triton():
    code = ("import sys, torch, randlift_dist, randlift_dist.ops, randlift_dist.train; "
            "x = torch.randn(2, 1, 3); csr = randlift_dist.ops.CSR(torch.tensor([0]), torch.tensor([1]), 2, 2); "
            "randlift_dist.ops.aggregate(x, torch.randn(1, 1, 1), csr); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
