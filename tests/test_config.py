"""Config schema: YAML + dotted overrides, unknown keys, types, choices, cross-field validation."""

import pytest

from randlift_dist.config import Config, ConfigError, describe_fields, load_config
from randlift_dist.config_parse import parse_override


def test_default_equals_configs_tiny():
    assert load_config("configs/tiny.yaml").to_dict() == load_config(None).to_dict()


def test_shipped_configs_load():
    for name in ("teacher_mlp", "gpu_100m", "gpu_1b"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.lift.size > 0


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.steps=7", "model.lift.degree=2.5", "wandb.mode=disabled",
                             "model.base.hidden_dims=[3, 5]", "train.stop_at=null"])
    assert cfg.train.steps == 7 and cfg.model.lift.degree == 2.5 and cfg.wandb.mode == "disabled"
    assert cfg.model.base["hidden_dims"] == [3, 5] and cfg.train.stop_at is None
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("parallel.engine=jax", "parallel.engine"),
    ("parallel.zero_stage=3", "parallel.zero_stage"),
    ("model.lift.size=-4", "size"),
    ("model.lift.law=poisson", "model.lift.law"),
    ("model.lift.degree=0", "degree"),
    ("parallel.lift_parallel=0", "parallel.lift_parallel"),
    ("data.kind=file", "data.path"),
    ("train.resume=/no/such/dir", "train.resume"),
    ("parallel.offload_optimizer=true", "offload_optimizer"),
    ("train.steps", "key.path=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_base_network_is_reported_under_model_base(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  base:\n    vertices: [{name: x, dim: 2, role: input}, {name: y, dim: 1, role: output},"
                 " {name: h, dim: 2}]\n    edges: [[x, h], [h, y], [y, h]]\n")
    with pytest.raises(ConfigError, match="model.base: .*cycle"):
        load_config(p)


def test_unknown_section_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_doc():
    lines = describe_fields(Config)
    assert len(lines) > 40
    assert all(line.split(": ", 1)[1].strip() for line in lines), [l for l in lines if not l.split(": ", 1)[1]]
