"""Data kinds in one process: batch orders, shards (writing, reading, damage), files, packaged sets."""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from randlift_dist.config import ConfigError, load_config
from randlift_dist.data import (Batches, DataError, FeistelOrder, ShardSource, TensorSource, build_dataset,
                                data_identity, eval_rows, replica_part, verify_shards, write_shards)
from randlift_dist.data.files import holdout_split
from randlift_dist.tasks import Task


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_order_is_a_permutation_for_every_key(n):
    orders = [FeistelOrder(n, key)(np.arange(n)) for key in (0, 1, 12345, 2**62 - 1)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(n))
    if n >= 17:
        assert len({tuple(o) for o in orders}) == 4  # the key matters


def test_feistel_order_at_any_position_without_the_whole_permutation():
    n = 50_000_000
    f = FeistelOrder(n, 7)
    pos = np.array([0, 1, 49_999_999, 123_456])
    assert np.array_equal(f(pos), np.array([f(np.array([p]))[0] for p in pos]))
    assert (f(np.arange(10_000)) < n).all() and len(set(f(np.arange(10_000)).tolist())) == 10_000


@pytest.mark.parametrize("lazy", [False, True])
def test_replica_batches_tile_the_global_batch_and_repeat(lazy, tmp_path):
    x = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    y = np.arange(200, dtype=np.int64)
    src = ShardSource(write_shards(tmp_path / "s", x, y, shard_bytes=100), "train") if lazy else \
        TensorSource(torch.from_numpy(x), torch.from_numpy(y))
    world = Batches(src, 24, 0, 1, seed=3)
    parts = [Batches(src, 24, k, 4, seed=3) for k in range(4)]
    for step in (0, 1, 7, 8, 9, 50):  # 8 batches per epoch: 7 -> 8 crosses an epoch
        rows = np.concatenate([p.rows(step) for p in parts])
        assert np.array_equal(rows, world.rows(step))
        xb, yb = world(step)
        assert np.array_equal(yb.numpy(), rows) and np.array_equal(xb.numpy(), x[rows])
    epoch0 = np.concatenate([world.rows(s) for s in range(8)])
    assert len(set(epoch0.tolist())) == 192  # no row twice within an epoch
    assert not np.array_equal(world.rows(0), world.rows(8))  # a new order each epoch
    assert np.array_equal(Batches(src, 24, 0, 1, seed=3).rows(9), world.rows(9))  # a function of (seed, step)


def test_in_memory_order_is_the_one_the_project_always_used():
    src = TensorSource(torch.zeros(100, 1), torch.zeros(100, 1))
    b = Batches(src, 10, 0, 1, seed=5)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    assert np.array_equal(b.rows(23), torch.randperm(100, generator=g)[30:40].numpy())


def test_eval_rows_and_replica_parts():
    assert eval_rows(10, None) is None and eval_rows(10, 10) is None
    assert eval_rows(10, 4).tolist() == [0, 2, 5, 7]
    parts = [replica_part(10, k, 3) for k in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]


def test_shards_round_trip_from_chunks_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 2, 3)).astype(np.float32)  # rows flatten to 6 inputs
    y = rng.integers(0, 5, 1000)
    chunks = ((x[a:a + 130], y[a:a + 130]) for a in range(0, 1000, 130))
    out = write_shards(tmp_path / "d", chunks, None, x[:50], y[:50], classes=5, shard_bytes=24 * 64)
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["rows"] == 1000 and len(index["splits"]["train"]["shards"]) == 16
    assert index["x"] == {"dtype": "<f4", "shape": [2, 3]} and index["classes"] == 5
    src = ShardSource(out, "train")
    idx = np.array([999, 0, 63, 64, 64, 65, 500, 1])
    xb, yb = src.take(idx)
    assert xb.shape == (8, 6) and np.array_equal(xb.numpy(), x[idx].reshape(8, 6))
    assert np.array_equal(yb.numpy(), y[idx])
    assert np.array_equal(src.span(60, 200)[0].numpy(), x[60:200].reshape(140, 6))
    assert len(ShardSource(out, "test")) == 50
    with pytest.raises(DataError, match="already holds a shard index"):
        write_shards(out, x, y)


def _shard_dataset(tmp_path, y, x=None, classes=4):
    n = len(y)
    x = np.random.default_rng(1).standard_normal((n, 3)).astype(np.float32) if x is None else x
    folder = write_shards(tmp_path / "d", x, y, x[:10], y[:10], classes=classes, shard_bytes=12 * 16)
    task = Task("cross_entropy", 4)
    return SimpleNamespace(train=ShardSource(folder, "train"), test=ShardSource(folder, "test"), task=task), folder


def test_damaged_truncated_and_mismatched_shards_are_named(tmp_path):
    ds, folder = _shard_dataset(tmp_path, np.arange(64) % 4)
    verify_shards(ds)  # intact
    f = folder / "train-00002.x.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00002\.x\.npy: sha256 mismatch"):
        verify_shards(ds)
    f.write_bytes(bytes(data[:-12]))
    with pytest.raises(DataError, match=r"train-00002\.x\.npy: \d+ bytes, the index says \d+ \(truncated"):
        ShardSource(folder, "train")
    np.save(folder / "train-00003.y.npy", np.zeros((16, 2), np.int64))  # another shape...
    meta = json.loads((folder / "index.json").read_text())
    meta["splits"]["train"]["shards"][3]["y"]["bytes"] = (folder / "train-00003.y.npy").stat().st_size
    meta["splits"]["train"]["shards"][2]["x"]["bytes"] = f.stat().st_size  # ...and sizes that agree
    (folder / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"holds int64 \[16, 2\].*the index says int64 \[16\]"):
        ShardSource(folder, "train")


def test_bad_labels_and_values_in_shards_are_found_when_verifying(tmp_path):
    y = np.arange(64) % 4
    y[40] = 7
    ds, folder = _shard_dataset(tmp_path, y)
    with pytest.raises(DataError, match=r"train-00002\.y\.npy: 1 labels outside \[0, 4\)"):
        verify_shards(ds)
    x = np.zeros((64, 3), np.float32)
    x[5, 1] = np.inf
    ds, _ = _shard_dataset(tmp_path / "b", np.arange(64) % 4, x)
    with pytest.raises(DataError, match=r"train-00000\.x\.npy: non-finite"):
        verify_shards(ds)


def _cfg(tmp_path, *overrides):
    return load_config(None, ["wandb.mode=disabled", f"run.dir={tmp_path / 'run'}", *overrides])


def test_npz_classification_explicit_test_split_and_declared_classes(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((120, 4)).astype(np.float32), rng.integers(0, 3, 120)
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=x[:20], y_test=y[:20], classes=np.int64(3))
    base_keys = ["data.kind=npz", f"data.path={tmp_path / 'a.npz'}", "train.loss=cross_entropy", "model.base.out_dim=3"]
    cfg = _cfg(tmp_path, *base_keys)
    base = cfg.build_lift()[0]
    ds = build_dataset(cfg, base, 3)
    assert ds.y_train.dtype == torch.int64 and np.array_equal(ds.y_test.numpy(), y[:20])
    assert build_dataset(cfg, base, 3) is ds  # kept for the run: preflight, then the trainer
    np.savez(tmp_path / "b.npz", x=x, y=y, classes=np.int64(5))
    with pytest.raises(ConfigError, match="5 classes but the readout has 3 outputs"):
        build_dataset(_cfg(tmp_path, *base_keys[:1], f"data.path={tmp_path / 'b.npz'}", *base_keys[2:]), base, 3)


def test_npz_holdout_is_the_historical_split():
    x, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20, dtype=np.float32)
    (xtr, ytr), (xte, yte) = holdout_split(x, y, 5, seed=4)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(4)).numpy()
    assert np.array_equal(ytr, y[perm[:15]]) and np.array_equal(yte, y[perm[15:]])


def test_digits_stratified_seeded_split(tmp_path):
    cfg = _cfg(tmp_path, "data.kind=digits", "train.loss=cross_entropy", "model.base.in_dim=64", "model.base.out_dim=10")
    ds = build_dataset(cfg, cfg.build_lift()[0], 10)
    assert (len(ds.train), len(ds.test)) == (1437, 360) and ds.x_train.shape[1] == 64
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about 20 % of each class (~180 per class)
    other = _cfg(tmp_path, "data.kind=digits", "train.loss=cross_entropy", "model.base.in_dim=64",
                 "model.base.out_dim=10", "data.digits.split_seed=1")
    assert not torch.equal(build_dataset(other, other.build_lift()[0], 10).y_test, ds.y_test)


def test_mnist1d_generated_offline_cached_by_arguments_and_rng_untouched(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    import mnist1d.data as m1d

    def no_download(*a, **k):
        raise AssertionError("the download path was taken")

    monkeypatch.setattr(m1d, "get_dataset", no_download)
    monkeypatch.setattr("requests.get", no_download)
    random.seed(11)
    np.random.seed(11)
    before = (random.random(), np.random.rand())
    random.seed(11)
    np.random.seed(11)
    keys = ["data.kind=mnist1d", "train.loss=cross_entropy", "model.base.in_dim=40", "model.base.out_dim=10",
            f"data.mnist1d.cache_dir={tmp_path / 'cache'}"]
    cfg = _cfg(tmp_path, *keys)
    ds = build_dataset(cfg, cfg.build_lift()[0], 10)
    assert (random.random(), np.random.rand()) == before  # the generator's reseeding was undone
    assert (len(ds.train), len(ds.test), ds.x_train.shape[1]) == (4000, 1000, 40)
    assert sorted(np.unique(ds.y_train.numpy()).tolist()) == list(range(10))
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and "n5000-split0.8-len40-seed42" in cached[0].name
    monkeypatch.setattr(m1d, "make_dataset", no_download)  # from now on: the cache only
    again = _cfg(tmp_path, *keys, "train.steps=7")  # another run, same data
    sys.modules["randlift_dist.data"]._MEMO.clear()
    assert torch.equal(build_dataset(again, again.build_lift()[0], 10).x_test, ds.x_test)
    assert data_identity(again) == data_identity(cfg) and "cache_dir" not in json.dumps(data_identity(cfg))


def test_data_identity_keeps_the_teacher_fingerprint_and_hashes_files(tmp_path):
    cfg = _cfg(tmp_path)
    assert data_identity(cfg) == {k: getattr(cfg.data, k) for k in ("kind", "path", "n_train", "n_test", "input_dist",
                                                                    "label_noise", "teacher_size", "teacher_degree",
                                                                    "teacher_seed", "seed")}
    np.savez(tmp_path / "a.npz", x=np.zeros((8, 4), np.float32), y=np.zeros((8, 1), np.float32))
    ident = data_identity(_cfg(tmp_path, "data.kind=npz", f"data.path={tmp_path / 'a.npz'}"))
    assert len(ident["file_sha256"]) == 64
