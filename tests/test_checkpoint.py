"""Checkpoints on real files: integrity, fallback, partial directories, disk full, data, resharding.

A small world-size-1 `LiftedNetwork` takes one Adam step (so the moments are real) through a
minimal engine stand-in (`net`, `name`, `master_weight`, `moments`, `load_moments`), and is saved
at steps 1 and 2 with a small block size, so every tensor spans several blocks. Damage is done to
the files the way it happens (bytes flipped inside a weight block, truncation, an emptied or
deleted file, a deleted meta.json); each must be reported in one line naming the file, and
resuming must fall back to step 1. Disk full is real: a 2 MiB tmpfs (skipped when it cannot be
mounted). Resharding: two spawned gloo ranks each save half of the rows (round-robin by key, not
contiguous), and one process loads them exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from randlift_dist import Layout, LiftedNetwork
from randlift_dist import checkpoint as ck
from randlift_dist.config import load_config

OVERRIDES = ["model.lift.size=40", "parallel.engine=torch", "train.optimizer=adam", "data.n_train=256"]
BLOCK = 600  # bytes per block: several blocks per tensor


class Engine:
    """What `save` and `load_moments` use of a training engine; one Adam step on a fixed batch."""

    name = "torch"

    def __init__(self, net, steps: int = 1):
        self.net = net
        self.opt = torch.optim.Adam(net.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = torch.randn(16, net.base.in_dim, generator=g)
            self.opt.zero_grad()
            net(x).pow(2).mean().backward()
            self.opt.step()

    def master_weight(self, p):
        return p.detach()

    def moments(self, p):
        st = self.opt.state.get(p, {})
        return {k: st[k] for k in ("exp_avg", "exp_avg_sq") if k in st}

    def load_moments(self, p, moments, step):
        self.opt.state[p].update({k: v.clone() for k, v in moments.items()})


def make(cfg):
    base, lift = cfg.build_lift()
    net = LiftedNetwork(base, lift, out_dim=1, seed=cfg.model.weight_seed, readout_init="normal")
    return lift, net


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of steps 1 and 2 (different weights), written once: `(folder, cfg, lift, engines)`."""
    root = tmp_path_factory.mktemp("saved")
    cfg = load_config(None, OVERRIDES)
    engines = {}
    for step in (1, 2):
        lift, net = make(cfg)
        engines[step] = Engine(net, steps=step)
        ck.save(root, step, cfg, lift, engines[step], Layout(), keep=3, block_bytes=BLOCK)
    return root, cfg, lift, engines


@pytest.fixture
def run(tmp_path, saved):
    """A copy of the saved checkpoints in tmp_path; returns (cfg, lift, engines)."""
    root, cfg, lift, engines = saved
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return load_config(None, OVERRIDES), lift, engines


def assert_loaded(path, cfg, lift, engine):
    _, net = make(cfg)
    step, state = ck.load_weights(path, cfg, lift, net)
    for (name, p), (_, q) in zip(engine.net.named_parameters(), net.named_parameters()):
        assert torch.equal(p, q), name
        saved = engine.moments(p)
        assert set(saved) == set(state[name]["moments"]) == {"exp_avg", "exp_avg_sq"}
        for k, v in saved.items():
            assert torch.equal(v, state[name]["moments"][k]), (name, k)
    return step


def test_roundtrip_many_blocks(tmp_path, run):
    cfg, lift, engines = run
    meta = ck.read_meta(tmp_path / "step_00000002")
    blocks = [len(pm["blocks"]["start"]) for pm in meta["shards"][0]["params"].values()]
    assert max(blocks) >= 10, blocks
    assert assert_loaded(tmp_path / "step_00000002", cfg, lift, engines[2]) == 2
    assert ck.find_intact(tmp_path) == (tmp_path / "step_00000002", [])


def flip16(path: Path, name: str) -> None:
    """Flip 16 bytes inside the value rows of the middle block of tensor `name`."""
    meta = ck.read_meta(path)
    s = meta["shards"][0]
    pm = s["params"][name]
    starts = pm["blocks"]["start"] + [pm["rows"]]
    b = (len(starts) - 1) // 2
    r = starts[b + 1] - starts[b]
    off = pm["blocks"]["offset"][b] + 8 * r + 4  # past the keys: weight values
    raw = bytearray((path / s["file"]).read_bytes())
    raw[off:off + 16] = bytes(x ^ 0xFF for x in raw[off:off + 16])
    (path / s["file"]).write_bytes(bytes(raw))


def damage(path: Path, how: str) -> str:
    shard = path / "shard_0000.bin"
    if how == "flip":
        flip16(path, "edges.1.weight")
        return "sha256 mismatch"
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return "truncated"
    if how == "empty":
        shard.write_bytes(b"")
        return "empty"
    if how == "no_shard":
        shard.unlink()
        return "missing"
    if how == "no_meta":
        (path / "meta.json").unlink()
        return "missing"
    if how == "bad_meta":
        (path / "meta.json").write_text('{"format": 2, "step":')
        return "unreadable"
    if how == "meta_keys":
        meta = ck.read_meta(path)
        del meta["shards"][0]["bytes"]
        (path / "meta.json").write_text(json.dumps(meta))
        return "damaged (no shards[0])"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "no_shard", "no_meta", "bad_meta", "meta_keys"])
def test_damage_is_one_line_and_resume_falls_back(tmp_path, run, how):
    cfg, lift, engines = run
    bad, good = tmp_path / "step_00000002", tmp_path / "step_00000001"
    what = damage(bad, how)
    path, problems = ck.find_intact(tmp_path)
    assert path == good
    assert len(problems) == 1 and "\n" not in problems[0] and what in problems[0], problems
    assert str(bad) in problems[0] and ("meta.json" in problems[0]) == ("meta" in how), problems
    lines = []
    assert ck.find_latest(tmp_path, report=lines.append) == good
    assert lines == problems + [f"resuming from {good}"]
    # loading the damaged one directly: one line, a CheckpointCorruptError, weights untouched
    _, net = make(cfg)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ck.CheckpointCorruptError) as err:
        ck.load_weights(bad, cfg, lift, net)
    msg = str(err.value)
    assert "\n" not in msg and what in msg and str(bad) in msg and "weights_only" not in msg, msg
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # the O(own rows) resume path falls back too, and says so
    lines = []
    _, net = make(cfg)
    path, step, state = ck.load_latest(tmp_path, cfg, lift, net, report=lines.append)
    assert (path, step) == (good, 1) and lines[-1] == f"resuming from {good} (newest intact checkpoint)"
    assert assert_loaded(good, cfg, lift, engines[1]) == 1


def test_verify_checksums_and_a_damage_found_by_the_caller(tmp_path, run):
    """`verify_checksums` hashes every block of one checkpoint (the finished-run check); a
    checkpoint the caller found damaged is skipped by `load_latest` with the caller's lines."""
    cfg, lift, _ = run
    final = tmp_path / "step_00000002"
    assert ck.verify_checksums(final) == []
    flip16(final, "readouts.v3")
    bad = ck.verify_checksums(final)
    assert len(bad) == 1 and "\n" not in bad[0] and str(final / "shard_0000.bin") in bad[0] and "sha256" in bad[0]
    lines = []
    _, net = make(cfg)
    path, step, _ = ck.load_latest(tmp_path, cfg, lift, net, report=lines.append, damaged={final: ["final: damaged"]})
    assert (path, step) == (tmp_path / "step_00000001", 1)
    assert lines == ["final: damaged", f"resuming from {tmp_path / 'step_00000001'} (newest intact checkpoint)"]


def test_latest_pointing_at_a_bad_or_missing_checkpoint(tmp_path, run):
    cfg, lift, _ = run
    (tmp_path / "step_00000001" / "shard_0000.bin").write_bytes(b"")
    (tmp_path / "latest").write_text("step_00000001")  # the pointer names the damaged one
    assert ck.find_latest(tmp_path, report=None) == tmp_path / "step_00000002"
    flip16(tmp_path / "step_00000002", "readouts.v3")
    path, problems = ck.find_intact(tmp_path)
    assert path is None and len(problems) == 2, problems
    lines = []
    assert ck.find_latest(tmp_path, report=lines.append) is None
    assert lines[-1] == "no intact checkpoint: starting from step 0"
    (tmp_path / "latest").write_text("step_00000007")
    _, problems = ck.find_intact(tmp_path)
    assert "step_00000007" in problems[0] and "does not exist" in problems[0]


def test_partial_directories_are_cleaned_and_rotation_keeps_intact(tmp_path, run):
    cfg, lift, engines = run
    (tmp_path / "step_00000003.tmp").mkdir()
    (tmp_path / "step_00000003.tmp" / "shard_0000.bin").write_bytes(b"half")
    (tmp_path / "latest.tmp").write_text("x")
    assert ck.find_latest(tmp_path, report=None) == tmp_path / "step_00000002"
    assert not (tmp_path / "step_00000003.tmp").exists() and not (tmp_path / "latest.tmp").exists()
    (tmp_path / "step_00000004.tmp").mkdir()
    (tmp_path / "step_00000002" / "meta.json").unlink()  # step 2 broken: does not count as kept
    ck.save(tmp_path, 3, cfg, lift, engines[2], Layout(), keep=2, block_bytes=BLOCK)
    assert not (tmp_path / "step_00000004.tmp").exists()
    names = sorted(d.name for d in tmp_path.iterdir())
    assert names == ["latest", "step_00000001", "step_00000002", "step_00000003"], names
    ck.save(tmp_path, 4, cfg, lift, engines[2], Layout(), keep=2, block_bytes=BLOCK)
    names = sorted(d.name for d in tmp_path.iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"], names
    assert (tmp_path / "latest").read_text() == "step_00000004"


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / f"tmpfs_{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_keeps_the_previous_checkpoint(small_disk):
    cfg = load_config(None, OVERRIDES)
    lift, net = make(cfg)
    engine = Engine(net)
    root = small_disk / "checkpoints"
    ck.save(root, 1, cfg, lift, engine, Layout(), keep=1)
    size = (root / "step_00000001" / "shard_0000.bin").stat().st_size
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for half a shard
    with pytest.raises(ck.CheckpointWriteError) as err:
        ck.save(root, 2, cfg, lift, engine, Layout(), keep=1)
    msg = str(err.value)
    assert msg.startswith("disk full while writing checkpoint") and "bytes free" in msg and "\n" not in msg, msg
    assert "step_00000001 intact" in msg, msg
    assert sorted(d.name for d in root.iterdir()) == ["latest", "step_00000001"]
    assert (root / "latest").read_text() == "step_00000001"
    assert ck.find_intact(root) == (root / "step_00000001", [])


def test_data_change_is_refused_unless_allowed(tmp_path, run):
    _, lift, engines = run
    cfg = load_config(None, OVERRIDES + ["data.n_train=128", "data.teacher_seed=7"])
    _, net = make(cfg)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_weights(tmp_path / "step_00000002", cfg, lift, net)
    msg = str(err.value)
    assert "other data" in msg and "data.n_train 256 -> 128" in msg and "data.teacher_seed" in msg, msg
    assert "train.resume_allow_data_change=true" in msg and "\n" not in msg
    assert "data.seed" not in msg
    cfg.train.resume_allow_data_change = True
    assert assert_loaded(tmp_path / "step_00000002", cfg, lift, engines[2]) == 2


def test_other_readout_width_is_refused_in_one_line(tmp_path, run):
    cfg, lift, _ = run
    net = LiftedNetwork(*cfg.build_lift(), out_dim=2, seed=cfg.model.weight_seed, readout_init="normal")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_weights(tmp_path / "step_00000002", cfg, lift, net)
    msg = str(err.value)
    assert "other tensor shapes ('readouts." in msg and "model.out_dim" in msg and "\n" not in msg, msg


def test_data_file_contents_are_part_of_the_fingerprint(tmp_path, run):
    _, lift, engines = run
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((8, 4), np.float32), y=np.zeros((8, 1), np.float32))
    cfg = load_config(None, OVERRIDES + ["data.kind=file", f"data.path={data}", "data.n_test=2"])
    ck.save(tmp_path / "f", 1, cfg, lift, engines[1], Layout(), keep=1)
    np.savez(data, x=np.ones((8, 4), np.float32), y=np.zeros((8, 1), np.float32))
    _, net = make(cfg)
    with pytest.raises(ck.CheckpointError, match="contents of data.path"):
        ck.load_weights(tmp_path / "f" / "step_00000001", cfg, lift, net)


# ---------------------------------------------------------------- resharding: save from 2 ranks
class RowSlice(torch.nn.Module):
    """Rank r of P holds some rows of a world-size-1 network (values + `shift`): round-robin by key
    (key r mod P), or `contiguous` key ranges (the r-th P-quantile of each fibre / edge set)."""

    def __init__(self, net, r: int, P: int, contiguous: bool = False, shift: float = 1.0):
        super().__init__()

        def mine(k: np.ndarray, n: int) -> np.ndarray:
            return (k * P // n == r) if contiguous else (k % P == r)

        self.base, self.lift = net.base, net.lift
        self.edges = torch.nn.ModuleList()
        self._index = []
        for e in net.base.edges:
            src, dst = net.edge_index(e.key)
            sel = mine(np.asarray(dst) * net.lift.n(e.src) + np.asarray(src), net.lift.n(e.src) * net.lift.n(e.dst))
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(net.edge_weight(e.key).detach()[sel] + shift)
            self.edges.append(layer)
            self._index.append((src[sel], dst[sel]))
        self._own = {v: np.flatnonzero(mine(np.arange(net.lift.n(v)), net.lift.n(v))) for v in net.base.vertices}
        self.biases = torch.nn.ParameterDict({k: torch.nn.Parameter(p.detach()[self._own[self.vertex_of(k)]] + shift)
                                              for k, p in net.biases.items()})
        self.readouts = torch.nn.ParameterDict({k: torch.nn.Parameter(p.detach()[self._own[self.vertex_of(k)]] + shift)
                                                for k, p in net.readouts.items()})

    def edge_index(self, key):
        return self._index[[e.key for e in self.base.edges].index(key)]

    def vertex_of(self, key):
        return list(self.base.vertices)[int(key[1:])]

    def own_rows(self, v):
        return torch.from_numpy(self._own[v])


class FixedMoments:
    name = "torch"

    def __init__(self, net):
        self.net = net

    def master_weight(self, p):
        return p.detach()

    def moments(self, p):
        return {"exp_avg": 2 * p.detach(), "exp_avg_sq": p.detach() ** 2}


def save_from_rank(rank: int, world: int, root: str) -> None:
    cfg = load_config(None, OVERRIDES)
    lift, net = make(cfg)
    layout = Layout(world_size=world, rank=rank, lift_parallel=world)
    ck.save(Path(root), 5, cfg, lift, FixedMoments(RowSlice(net, rank, world)), layout, keep=2, block_bytes=BLOCK)


@pytest.mark.timeout(120)
def test_checkpoint_from_two_ranks_loads_exactly_on_one(tmp_path, monkeypatch):
    from distributed import run_world

    run_world(save_from_rank, 2, str(tmp_path), timeout=100)
    meta = ck.read_meta(tmp_path / "step_00000005")
    assert [s["file"] for s in meta["shards"]] == ["shard_0000.bin", "shard_0001.bin"]
    cfg = load_config(None, OVERRIDES)
    lift, ref = make(cfg)
    assert ck.find_intact(tmp_path) == (tmp_path / "step_00000005", [])
    reads = []
    real = ck.read_rows.__globals__["_Reader"].read
    monkeypatch.setattr(ck.read_rows.__globals__["_Reader"], "read", lambda self, s, *a: reads.append(s["file"])
                        or real(self, s, *a))
    _, net = make(cfg)
    step, state = ck.load_weights(tmp_path / "step_00000005", cfg, lift, net)
    assert step == 5 and set(reads) == {"shard_0000.bin", "shard_0001.bin"}
    for (name, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        assert torch.equal(q, p.detach() + 1), name
        assert torch.equal(state[name]["moments"]["exp_avg"], 2 * (p.detach() + 1)), name
    # a reader holding the lower half of one tensor's keys reads about half of its blocks
    total = sum(len(s["params"]["edges.1.weight"]["blocks"]["start"]) for s in meta["shards"])
    keys = ck.row_keys(ref)["edges.1.weight"]
    low = keys < np.median(keys)
    reads.clear()
    got = ck.read_rows(tmp_path / "step_00000005", meta["shards"], {"edges.1.weight": keys[low]})
    assert torch.equal(got["edges.1.weight"]["value"], ref.edges[1].weight.detach()[low] + 1)
    assert total >= 10 and len(reads) <= total // 2 + 2, (len(reads), total)


def resume_on_rank(rank: int, world: int, root: str) -> tuple[str | None, int, bool]:
    """Contiguous halves: only rank 1 reads the damaged (last) blocks of the newest checkpoint."""
    cfg = load_config(None, OVERRIDES)
    lift, net = make(cfg)
    layout = Layout(world_size=world, rank=rank, lift_parallel=world)
    mine = RowSlice(net, rank, world, contiguous=True, shift=0.0)
    path, step, _ = ck.load_latest(Path(root), cfg, lift, mine, report=None, layout=layout)
    lift, net = make(cfg)
    want = RowSlice(Engine(net, steps=1).net, rank, world, contiguous=True, shift=0.0)
    same = all(torch.equal(p, q) for p, q in zip(mine.parameters(), want.parameters()))
    return (path.name if path else None), step, same


@pytest.mark.timeout(120)
def test_damage_seen_by_one_rank_makes_every_rank_fall_back(tmp_path, run):
    from distributed import run_world

    meta = ck.read_meta(tmp_path / "step_00000002")
    pm = meta["shards"][0]["params"]["edges.1.weight"]
    raw = bytearray((tmp_path / "step_00000002" / "shard_0000.bin").read_bytes())
    off = pm["blocks"]["offset"][-1] + 8 * (pm["rows"] - pm["blocks"]["start"][-1])  # the last block's weights
    raw[off:off + 16] = bytes(16)
    (tmp_path / "step_00000002" / "shard_0000.bin").write_bytes(bytes(raw))
    got = run_world(resume_on_rank, 2, str(tmp_path), timeout=100)
    assert got == [("step_00000001", 1, True)] * 2, got
