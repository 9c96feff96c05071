"""What a new user tripped on, each fixed: plain type names, a data path the kind does not read, a degree
that makes an edge fully connected, the progress bar's first estimate."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from randlift_dist.config import ConfigError, describe_fields, load_config
from randlift_dist.graph import BaseGraph
from randlift_dist.lift import fully_connected_lift, random_sparse_lift
from randlift_dist.metrics import MetricsSink


@pytest.mark.parametrize("override, words", [
    ("train.steps=abc", "expected an integer"),
    ("model.out_dim=x", "expected an integer or null"),
    ("train.lr=fast", "expected a number"),
    ("model.recompute=maybe", "expected true or false"),
    ("train.stop_at=1.5", "expected an integer or null"),
])
def test_messages_name_types_in_plain_words(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value) and "<class" not in str(err.value)


def test_help_config_shows_no_python_reprs():
    text = "\n".join(describe_fields())
    assert "<class" not in text and "[Any]" not in text and "typing." not in text
    assert "model.lift.degree [any value] = 4:" in text
    assert "model.base [a mapping] = {activation: tanh, builder: mlp" in text


def test_a_data_path_the_kind_does_not_read_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.* data.kind=teacher does not read a path"):
        load_config(None, [f"data.path={tmp_path / 'x.npz'}"])
    with pytest.raises(ConfigError, match="data.kind=shards needs data.path"):
        load_config(None, ["data.kind=shards"])


def test_degree_at_least_the_fibre_size_is_said_to_take_every_pair():
    base = BaseGraph.mlp(3, [1, 1], 1)
    lift = random_sparse_lift(base, 64, {"x->h1": 2, "h1->h2": 1000, "h2->y": 63})
    got = {str(e): lift.all_pairs(e) for e in base.edges}
    assert got == {"x->h1": True, "h1->h2": True, "h2->y": False}  # the input fibre has one vertex
    assert lift.edges("h1->h2")[0].size == 64 * 64  # indeed the fully-connected edge
    assert all(fully_connected_lift(base, 8).all_pairs(e) for e in base.edges)


def test_progress_bar_rate_ignores_the_slow_first_step(tmp_path):
    cfg = SimpleNamespace(run=SimpleNamespace(progress=True), wandb=SimpleNamespace(mode="disabled"))
    sink = MetricsSink(cfg, tmp_path, 1000, 0, {})
    time.sleep(1.0)  # the first step: imports, allocation
    sink.advance()
    for _ in range(20):
        sink.advance()
    d = sink.bar.format_dict
    rate = (d["n"] - d["initial"]) / max(d["elapsed"], 1e-9)
    assert d["initial"] == 1 and rate > 100, d  # from the 20 fast steps, not 21 steps per second
    sink.close()
