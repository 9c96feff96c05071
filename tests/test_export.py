"""`randlift_dist.export` in one process: the file's contents (header, canonical rows, the edge-list
hashes recomputed from the lift independently), round trips of stored and regenerated topologies
and of float64 weights, and every refusal: a foreign, damaged or tampered file, another format
version, a lift whose edges are drawn differently. Trained runs, world size 2 and a fresh
interpreter: `test_predict.py`.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from randlift_dist import BaseGraph, LiftedNetwork, random_sparse_lift
from randlift_dist.export import ExportError, load, read_metadata, save
from randlift_dist.plan import build_plan

BASE = {
    "vertices": [
        {"name": "x", "dim": 3, "role": "input"},
        {"name": "h1", "dim": 4, "activation": "tanh"},
        {"name": "h2", "dim": 4, "activation": "relu", "bias": True},
        {"name": "y", "dim": 2, "role": "output"},
    ],
    "edges": [["x", "h1"], ["h1", "h2"], ["x", "h2"], ["h2", "y"]],
}


def network(topology: str = "stored", dtype=torch.float32, **kw) -> LiftedNetwork:
    base = BaseGraph.from_dict(BASE)
    lift = random_sparse_lift(base, 40, 3, seed=5, block_size=16)  # 3 sampling blocks per fibre
    plan = build_plan(lift, None, topology=topology)
    args = dict(readout_scale="sqrt", seed=11, readout_init="normal", dtype=dtype)
    return LiftedNetwork(base, lift, plan, None, **{**args, **kw})


X = torch.from_numpy(np.random.default_rng(0).standard_normal((17, 3)).astype(np.float32))


def outputs(net) -> torch.Tensor:
    with torch.no_grad():
        return net(X)


def header(path) -> dict:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_file_holds_canonical_rows_and_edge_hashes(tmp_path):
    net = network()
    with torch.no_grad():  # trained-looking biases: not all zero
        net.bias("h2").copy_(torch.linspace(-1, 1, net.bias("h2").numel()).view_as(net.bias("h2")))
    path = save(net, tmp_path / "n.safetensors")
    head = header(path)
    names = dict(net.named_parameters())
    assert set(head) - {"__metadata__"} == set(names)
    assert all(head[n]["dtype"] == "F32" and head[n]["shape"] == list(p.shape) for n, p in names.items())
    meta = read_metadata(path)
    assert meta["format"] == "randlift_dist.export" and meta["format_version"] == "1"
    assert meta["lift"] == net.lift.to_dict() and meta["lift_fingerprint"] == net.lift.fingerprint()
    assert meta["network"] == {"out_dim": 2, "readout_scale": "sqrt", "weight_scale": None, "seed": 11,
                               "readout_init": "normal", "topology": "stored", "dtype": "float32"}
    assert meta["config"] is None and meta["step"] is None and meta["task"] is None
    tensors = load_file(path)
    for e in net.base.edges:  # the hash of the lifted edge list, from the lift itself
        src, dst = net.lift.edges(e)  # sorted by (dst, src)
        keys = dst * net.lift.n(e.src) + src
        entry = meta["edges"][str(e)]
        assert entry["count"] == keys.size == tensors[entry["tensor"]].shape[0]
        assert entry["sha256"] == hashlib.sha256(keys.astype("<i8").tobytes()).hexdigest()
        # rows in (dst, src) order: the weight of each lifted edge where the network has it
        s_here, d_here = net.edge_index(e)
        got = dict(zip(zip(s_here.tolist(), d_here.tolist()), net.edge_weight(e).detach()))
        want = torch.stack([got[(int(s), int(d))] for s, d in zip(src, dst)])
        assert torch.equal(tensors[entry["tensor"]], want)
    assert torch.equal(tensors["biases.v2"], net.bias("h2").detach())
    out = load(path)
    assert type(out) is LiftedNetwork and not out.training and out.metadata["lift"] == meta["lift"]
    assert torch.equal(outputs(out), outputs(net))


def test_round_trips(tmp_path):
    net = network()
    ref = outputs(net)
    path = save(net, tmp_path / "a.safetensors")
    regen = load(path, topology="regenerate")  # the edges drawn chunk by chunk, no indices kept
    assert regen.plan.topology == "regenerate"
    torch.testing.assert_close(outputs(regen), ref, rtol=1e-6, atol=1e-6)
    wide = load(path, dtype=torch.float64)
    assert wide.readout_weight("y").dtype == torch.float64
    torch.testing.assert_close(outputs(wide), ref.double(), rtol=1e-5, atol=1e-6)
    # a network built regenerated (as `model.topology=regenerate` trains) exports the same tensors
    other = save(network("regenerate"), tmp_path / "b.safetensors")
    a, b = load_file(path), load_file(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(other)["network"]["topology"] == "regenerate"
    assert load(other).plan.topology == "regenerate"
    # float64 weights stay float64, bit for bit; weight_scale and readout_scale are carried
    net64 = network(dtype=torch.float64, weight_scale=0.3, readout_scale="mean")
    p64 = save(net64, tmp_path / "c.safetensors")
    assert header(p64)["edges.0.weight"]["dtype"] == "F64"
    back = load(p64)
    assert back.c == net64.c and back.weight_scale == 0.3
    assert torch.equal(outputs(back), outputs(net64))


def _rewrite(src, dst, **changes):
    """A copy of an export with some metadata entries replaced (values JSON-encoded unless str)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    for k, v in changes.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_refusals(tmp_path):
    net = network()
    path = save(net, tmp_path / "n.safetensors")
    meta = read_metadata(path)
    with pytest.raises(ExportError, match="use a .safetensors file name"):
        save(net, tmp_path / "n.pt")
    with pytest.raises(ExportError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ExportError, match="not a readable .safetensors file"):
        load(tmp_path / "text.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ExportError, match="not a randlift_dist export"):
        load(tmp_path / "foreign.safetensors")
    with pytest.raises(ExportError, match="format version '2'"):
        load(_rewrite(path, tmp_path / "v2.safetensors", format_version="2"))
    # an edge list that does not hash as exported: the sampler would build another network
    edges = json.loads(json.dumps(meta["edges"]))
    edges["h1->h2"]["sha256"] = "0" * 64
    tensors = dict(meta["tensors"])
    tensors[edges["h1->h2"]["tensor"]] = {**tensors[edges["h1->h2"]["tensor"]], "keys_sha256": "0" * 64}
    with pytest.raises(ExportError, match="lifted edges of base edge h1->h2 drawn again"):
        load(_rewrite(path, tmp_path / "h.safetensors", edges=edges, tensors=tensors))
    # another lift seed in the metadata: the fingerprint does not match
    lift = dict(meta["lift"], seed=6)
    with pytest.raises(ExportError, match="fingerprint"):
        load(_rewrite(path, tmp_path / "s.safetensors", lift=lift))
    # ... and with a matching fingerprint, the edges drawn from seed 6 are not the exported ones
    from randlift_dist.export import lift_from_dict

    with pytest.raises(ExportError, match="drawn again from the lift's seed differ"):
        load(_rewrite(path, tmp_path / "s2.safetensors", lift=lift,
                      lift_fingerprint=lift_from_dict(lift).fingerprint()))
    with pytest.raises(ExportError, match="damaged metadata"):
        load(_rewrite(path, tmp_path / "j.safetensors", network="{not json"))
    # a tensor missing from the file
    t = load_file(path)
    t.pop("biases.v2")
    save_file(t, str(tmp_path / "m.safetensors"), metadata={k: v if isinstance(v, str) else json.dumps(v)
                                                            for k, v in meta.items()})
    with pytest.raises(ExportError, match="holds tensors"):
        load(tmp_path / "m.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
