"""BaseGraph: parsing (all edge forms, builders), ordering, and validation messages."""

import re

import pytest

from randlift_dist import BaseGraph, Edge, GraphError, Vertex


def spec(vertices, edges):
    return {"vertices": vertices, "edges": edges}


X = {"name": "x", "dim": 2, "role": "input"}
Y = {"name": "y", "dim": 1, "role": "output"}


def hidden(name, dim=3, **kw):
    return {"name": name, "dim": dim, **kw}


# ---------------------------------------------------------------- parsing
def test_edge_forms_are_equivalent():
    vs = [X, hidden("h"), Y]
    a = BaseGraph.from_dict(spec(vs, [["x", "h"], ["h", "y"]]))
    b = BaseGraph.from_dict(spec(vs, ["x->h", "h -> y"]))
    c = BaseGraph.from_dict(spec(vs, [{"src": "x", "dst": "h"}, {"src": "h", "dst": "y"}]))
    d = BaseGraph.from_dict(spec(vs, [("x", "h"), ["h", "y", {"degree": 2}]]))
    assert [e.key for e in a.edges] == [e.key for e in b.edges] == [e.key for e in c.edges] \
        == [e.key for e in d.edges] == [("x", "h"), ("h", "y")]
    assert d.edge("h->y").degree == 2 and a.edge(("h", "y")).degree is None


def test_vertex_fields_and_defaults():
    g = BaseGraph.from_dict(spec(
        [X, hidden("h", 4, activation="tanh", bias=True), Y], [["x", "h"], ["h", "y"]]))
    assert g.vertices["h"] == Vertex("h", 4, "hidden", "tanh", True)
    assert g.vertices["y"] == Vertex("y", 1, "output", "identity", False)
    assert g.inputs == ["x"] and g.outputs == ["y"] and g.in_dim == 2
    assert g.dim("h") == 4


def test_edge_degree_forms():
    g = BaseGraph.from_dict(spec([X, hidden("h"), Y],
                                 [{"src": "x", "dst": "h", "degree": 3.5}, ["h", "y"]]))
    assert g.edge("x->h").degree == 3.5


def test_topological_order_and_edge_order():
    # declared out of topological order: b needs a, a needs x; two inputs keep declaration order
    vs = [hidden("b"), {"name": "x2", "dim": 1, "role": "input"}, hidden("a"), X,
          {"name": "y", "dim": 2, "role": "output"}]
    es = [["a", "b"], ["x", "a"], ["x2", "b"], ["b", "y"], ["x", "y"]]
    g = BaseGraph.from_dict(spec(vs, es))
    pos = {v: i for i, v in enumerate(g.order)}
    assert sorted(g.order) == sorted(v["name"] for v in vs)
    for e in g.edges:
        assert pos[e.src] < pos[e.dst]
    keys = [(pos[e.dst], pos[e.src]) for e in g.edges]
    assert keys == sorted(keys)
    assert g.inputs == ["x2", "x"]  # declaration order: the order of the columns of x
    assert g.in_dim == 3
    # Kahn's algorithm taking ready vertices in declaration order
    assert g.order == ["x2", "x", "a", "b", "y"]
    assert [e.key for e in g.in_edges("b")] == [("x2", "b"), ("a", "b")]


def test_to_dict_roundtrip():
    g = BaseGraph.from_dict(spec(
        [X, hidden("h", activation="gelu", bias=True), Y],
        [{"src": "x", "dst": "h", "degree": 2}, ["h", "y"], ["x", "y"]]))
    g2 = BaseGraph.from_dict(g.to_dict())
    assert g2.to_dict() == g.to_dict()
    assert g2.vertices == g.vertices and [(e.key, e.degree) for e in g2.edges] == \
        [(e.key, e.degree) for e in g.edges]


def test_mlp_builder():
    g = BaseGraph.mlp(3, [8, 5], 2, "tanh")
    assert g.order == ["x", "h1", "h2", "y"]
    assert [e.key for e in g.edges] == [("x", "h1"), ("h1", "h2"), ("h2", "y")]
    assert [g.dim(v) for v in g.order] == [3, 8, 5, 2]
    assert g.vertices["h1"].activation == "tanh" and g.vertices["y"].activation == "identity"
    assert g.inputs == ["x"] and g.outputs == ["y"]
    assert BaseGraph.from_dict({"builder": "mlp", "in_dim": 3, "hidden_dims": [8, 5], "out_dim": 2,
                                "activation": "tanh"}).to_dict() == g.to_dict()


def test_residual_mlp_builder():
    g = BaseGraph.residual_mlp(3, 4, 3, 1, "relu")
    assert g.order == ["x", "h1", "h2", "h3", "y"]
    keys = {e.key for e in g.edges}
    chain = {("x", "h1"), ("h1", "h2"), ("h2", "h3"), ("h3", "y")}
    skips = {("x", "h2"), ("h1", "h3"), ("h2", "y")}
    assert keys == chain | skips
    assert BaseGraph.from_dict({"builder": "residual_mlp", "in_dim": 3, "width": 4, "depth": 3,
                                "out_dim": 1}).to_dict() == g.to_dict()


def test_edge_lookup():
    g = BaseGraph.mlp(2, [3], 1)
    assert g.edge("x->h1") is g.edge(("x", "h1")) is g.edge(Edge("x", "h1"))
    assert g.edge_id("h1->y") == 1
    with pytest.raises(GraphError, match="no edge y->x"):
        g.edge("y->x")


# ---------------------------------------------------------------- validation
def named_cycle(err: pytest.ExceptionInfo) -> list[str]:
    m = re.search(r"cycle (\w+(?: -> \w+)+)", str(err.value))
    assert m, str(err.value)
    return m.group(1).split(" -> ")


def test_cycle_is_named():
    vs = [X, hidden("b"), hidden("a"), hidden("c"), Y]
    es = [["x", "a"], ["a", "b"], ["b", "c"], ["c", "a"], ["c", "y"]]
    with pytest.raises(GraphError, match=r"cycle a -> b -> c -> a") as err:
        BaseGraph.from_dict(spec(vs, es))
    cyc = named_cycle(err)
    assert cyc[0] == cyc[-1] and all([u, v] in es for u, v in zip(cyc, cyc[1:]))


def test_cycle_with_vertices_downstream_of_it():
    # c sits downstream of the cycle a <-> b and has no out-edge inside the unordered set: the
    # message must still name the cycle (this used to escape as a bare StopIteration)
    vs = [X, hidden("c"), hidden("a"), hidden("b"), Y]
    with pytest.raises(GraphError, match=r"cycle a -> b -> a"):
        BaseGraph.from_dict(spec(vs, [["x", "a"], ["a", "b"], ["b", "a"], ["b", "c"], ["c", "y"]]))
    with pytest.raises(GraphError, match=r"cycle b -> c -> b"):
        BaseGraph.from_dict(spec([X, hidden("a", role="output"), hidden("b"), hidden("c")],
                                 [["x", "b"], ["b", "c"], ["c", "b"], ["c", "a"]]))
    # two cycles and a tail: whichever is named is a real cycle of the graph
    es = [["x", "a"], ["a", "b"], ["b", "a"], ["b", "c"], ["c", "d"], ["d", "c"], ["d", "y"]]
    with pytest.raises(GraphError, match="cycle") as err:
        BaseGraph.from_dict(spec([X, hidden("a"), hidden("b"), hidden("c"), hidden("d"), Y], es))
    cyc = named_cycle(err)
    assert cyc[0] == cyc[-1] and len(cyc) == 3 and all([u, v] in es for u, v in zip(cyc, cyc[1:]))


def test_self_loop():
    with pytest.raises(GraphError, match="h->h.*self-loop"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y], [["x", "h"], ["h", "h"], ["h", "y"]]))


def test_unknown_vertex_in_edge():
    with pytest.raises(GraphError, match="unknown vertex 'z'"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y], [["x", "h"], ["h", "z"], ["h", "y"]]))


def test_duplicate_names():
    with pytest.raises(GraphError, match="duplicate vertex name 'h'"):
        BaseGraph.from_dict(spec([X, hidden("h"), hidden("h"), Y], [["x", "h"], ["h", "y"]]))


def test_duplicate_edges():
    with pytest.raises(GraphError, match="duplicate edge x->h"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y], [["x", "h"], "x->h", ["h", "y"]]))


def test_input_with_in_edges():
    x2 = {"name": "x2", "dim": 1, "role": "input"}
    with pytest.raises(GraphError, match="input vertex 'x2' has in-edges"):
        BaseGraph.from_dict(spec([X, x2, hidden("h"), Y], [["x", "h"], ["h", "x2"], ["h", "y"]]))


def test_hidden_without_in_edges():
    with pytest.raises(GraphError, match="vertex 'g' has no in-edges"):
        BaseGraph.from_dict(spec([X, hidden("h"), hidden("g"), Y], [["x", "h"], ["h", "y"], ["g", "y"]]))


def test_no_output():
    with pytest.raises(GraphError, match="no output vertex"):
        BaseGraph.from_dict(spec([X, hidden("h")], [["x", "h"]]))


def test_no_input():
    # a DAG always has a source; without role: input it is reported as a vertex with no in-edges,
    # and a graph with only outputs and inputs missing is reported as having no input
    with pytest.raises(GraphError, match="'h' has no in-edges"):
        BaseGraph.from_dict(spec([hidden("h"), Y], [["h", "y"]]))
    with pytest.raises(GraphError, match="no input vertex"):
        BaseGraph.from_dict({"vertices": [], "edges": []})


@pytest.mark.parametrize("dim", [0, -2, 1.5, "3", True])
def test_non_positive_or_non_integer_dim(dim):
    with pytest.raises(GraphError, match=f"dim {dim!r}".replace("(", r"\(")):
        BaseGraph.from_dict(spec([X, hidden("h", dim), Y], [["x", "h"], ["h", "y"]]))


def test_unknown_activation():
    with pytest.raises(GraphError, match="unknown activation 'swish'"):
        BaseGraph.from_dict(spec([X, hidden("h", activation="swish"), Y], [["x", "h"], ["h", "y"]]))


def test_unknown_role():
    with pytest.raises(GraphError, match="role 'latent'"):
        BaseGraph.from_dict(spec([X, hidden("h", role="latent"), Y], [["x", "h"], ["h", "y"]]))


def test_malformed_specs():
    with pytest.raises(GraphError, match="mapping"):
        BaseGraph.from_dict([X])
    with pytest.raises(GraphError, match=r"unknown keys \['nodes'\]"):
        BaseGraph.from_dict({"nodes": [], "vertices": [], "edges": []})
    with pytest.raises(GraphError, match="needs a list under 'edges'"):
        BaseGraph.from_dict({"vertices": [X]})
    with pytest.raises(GraphError, match=r"vertices\[1\].*needs both 'name' and 'dim'"):
        BaseGraph.from_dict(spec([X, {"name": "h"}, Y], [["x", "h"], ["h", "y"]]))
    with pytest.raises(GraphError, match=r"unknown keys \['width'\]"):
        BaseGraph.from_dict(spec([X, {"name": "h", "dim": 2, "width": 3}, Y], [["x", "h"], ["h", "y"]]))
    with pytest.raises(GraphError, match="bias 'yes'"):
        BaseGraph.from_dict(spec([X, hidden("h", bias="yes"), Y], [["x", "h"], ["h", "y"]]))
    with pytest.raises(GraphError, match=r"edges\[0\] = 42"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y], [42, ["h", "y"]]))
    with pytest.raises(GraphError, match="'xh'"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y], ["xh", ["h", "y"]]))


@pytest.mark.parametrize("degree", [0, -1, True, "2"])
def test_bad_edge_degree(degree):
    with pytest.raises(GraphError, match=f"degree {degree!r}"):
        BaseGraph.from_dict(spec([X, hidden("h"), Y],
                                 [{"src": "x", "dst": "h", "degree": degree}, ["h", "y"]]))


def test_bad_builders():
    with pytest.raises(GraphError, match="unknown builder 'cnn'"):
        BaseGraph.from_dict({"builder": "cnn"})
    with pytest.raises(GraphError, match="builder 'mlp'.*widths"):
        BaseGraph.from_dict({"builder": "mlp", "in_dim": 3, "widths": [4], "out_dim": 1})
    with pytest.raises(GraphError, match="depth 0"):
        BaseGraph.residual_mlp(3, 4, 0, 1)
    with pytest.raises(GraphError, match="dim 0"):
        BaseGraph.mlp(3, [4, 0], 1)
