"""The generic half of the configuration: typed dataclasses from mappings, dotted overrides, and the
field listing of `--help-config`. The schema itself (the sections and their checks) is `config.py`.

- `build(cls, data, prefix)`: a dataclass tree from a mapping; unknown keys and values of the wrong
  type are refused with a `ConfigError` naming the dotted key, the value and, in plain words, the
  type wanted (`an integer`, `an integer or null`, `one of 'a', 'b'`), never a Python repr.
- `apply_overrides(data, overrides, cls)`: `key.path=value` strings (values parsed as YAML scalars;
  `1e-3` is a number) merged into the mapping; a key that is not in the schema is refused.
- `describe_fields(cls)`: one line per field: `key [type] = default: doc`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with its one-line documentation in the metadata."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          type(None): "null"}


def _union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float, '1e-3' -> 0.001) a value against a field type."""
    if tp is Any:
        return True, value
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp), value
    if _union(tp):
        for arg in typing.get_args(tp):
            ok, v = type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e6 as a string
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    return isinstance(value, tp), value


def describe(tp: Any) -> str:
    """The type in plain words: `an integer`, `a number or null`, `one of 'a', 'b'`, `any value`."""
    if tp is Any:
        return "any value"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _union(tp):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def build(cls: type, data: Any, prefix: str = ""):
    """The dataclass `cls` from a mapping (nested dataclass fields from nested mappings)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(f'{prefix}.{k}'.lstrip('.') for k in unknown)} in {where}; "
                          f"known keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}".lstrip(".")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key)
            continue
        ok, value = type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {describe(tp)}")
        kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursively, except the base network (`base:`), which is replaced whole."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "base":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write key.path=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str], root: type) -> dict:
    """`data` with each `key.path=value` applied; keys are checked against the dataclass `root`."""
    data = merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        cls: Any = root
        for i, part in enumerate(path):
            fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
            if fields is not None and part not in fields:
                raise ConfigError(f"override {text!r}: unknown key {'.'.join(path[:i + 1])}; "
                                  f"known keys here: {', '.join(sorted(fields))}")
            if i == len(path) - 1:
                node[part] = value
                break
            hint = typing.get_type_hints(cls)[part] if fields is not None else None
            if not isinstance(node.get(part), dict):
                # a mapping-valued field (model.base) starts from its default, so one key can change
                fdef = {f.name: f for f in dataclasses.fields(cls)}[part] if fields is not None else None
                start = fdef.default_factory() if fdef is not None and hint is dict else {}
                node[part] = start if isinstance(start, dict) else {}
            cls = hint if hint is not None and dataclasses.is_dataclass(hint) else None
            node = node[part]
    return data


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    """`key [type] = default: doc` lines for every field (used by `--help-config`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe_fields(hints[f.name], key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = "null" if f.default is None else yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("\n...").strip()
        else:
            default = yaml.safe_dump(f.default_factory(), default_flow_style=True, width=10**6).strip()
        lines.append(f"{key} [{describe(hints[f.name])}] = {default}: {f.metadata.get('doc', '')}")
    return lines
