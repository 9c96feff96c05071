"""The per-position activation memory model (`activation_memory.py`) against what autograd saves.

For bases with conv, pooling (max and avg), flatten, mean and select heads, token and float
inputs, attention (self and with a conv value path), layer norms, gelu/relu/tanh and residual
edges, at two batch sizes: the predicted bytes kept for the backward equal the bytes of the
distinct tensors autograd saved in a real forward (within 1 %), and they scale with B * P.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import test_positions_train as tp
import test_warmstart as tw
from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift
from randlift_dist.activation_memory import activation_bytes, measured_saved_bytes
from randlift_dist.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = {
    "mnist1d_cnn": lambda: load_config(CONFIGS / "mnist1d_cnn.yaml").build_lift(),
    "attention_recall": lambda: load_config(CONFIGS / "attention_recall.yaml").build_lift(),
    "conv_attention_pool": lambda: (b := BaseGraph.from_dict(tp.BASE), random_sparse_lift(b, 40, 3, seed=0)),
    "hybrid_avgpool": lambda: (b := BaseGraph.from_dict(tw.HYBRID), random_sparse_lift(b, 30, 3, seed=0)),
    "transformer_float": lambda: (b := BaseGraph.transformer(12, 8, 4, 3, in_dim=3, mixer_kernel=3, depth=2),
                                  random_sparse_lift(b, 20, 3, seed=0)),
    "cnn2d_mean": lambda: (b := BaseGraph.cnn2d([9, 8], 2, [2, 3], 2, kernel=3, stride=[1, 2], head="mean"),
                           random_sparse_lift(b, 12, 3, seed=0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_predicted_equals_saved(name):
    base, lift = CASES[name]()
    out_dim = base.readout_dim()
    net = LiftedNetwork(base, lift, readout_init="normal")
    got = []
    for B in (7, 21):
        x = torch.randn(B, base.in_dim)
        V = base.vertices[base.inputs[0]].tokens
        if V is not None:
            x = torch.randint(0, V, x.shape).float()
        est = activation_bytes(base, lift, B, 4, out_dim)
        meas = measured_saved_bytes(net, x)
        assert abs(meas - est["total"]) <= 0.01 * meas, (B, meas, est)
        got.append(est["total"] - est["readout"])
    assert abs(got[1] / got[0] - 3.0) < 1e-9  # per sample: B * P scaling, nothing else

