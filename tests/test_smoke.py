"""Smallest end-to-end check of the public API on one process."""
import torch

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift


def test_forward_backward_shapes():
    base = BaseGraph.mlp(3, [8, 8], 2, "tanh")
    lift = random_sparse_lift(base, 40, 4, seed=1)
    net = LiftedNetwork(base, lift, readout_init="normal")
    out = net(torch.randn(5, 3))
    assert out.shape == (5, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
