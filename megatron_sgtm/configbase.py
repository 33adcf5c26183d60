"""Typed dataclass configs loaded from YAML with ``key=value`` overrides.

Every problem (unknown key, wrong type, value out of range) is collected and reported in one
``ConfigError`` so a user fixes a config in one pass instead of one error per run.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used. The message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _shape(tp: Any) -> Any:
    """The Python container a YAML value of type ``tp`` arrives as (None: a scalar)."""
    origin = get_origin(tp)
    if origin in (list, tuple):
        return (list, tuple)
    if origin is dict or dataclasses.is_dataclass(tp):
        return dict
    return None


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, option, where, trial)
            if not trial:
                return out
        # A value shaped like exactly one option (a mapping, a list) gets that option's own,
        # precise problems rather than a bare "is not X or Y".
        shaped = [o for o in options if _shape(o) is not None and isinstance(value, _shape(o))]
        if len(shaped) == 1:
            return _coerce(value, shaped[0], where, problems)
        problems.append(f"{where}: {value!r} is not {' or '.join(_type_name(o) for o in options)}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return value
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where} key {k!r}", problems):
                _coerce({} if v is None and dataclasses.is_dataclass(value_tp) else v,
                        value_tp, f"{where}.{k}", problems)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
            return tp()
        return _build(tp, value, f"{where}.", problems)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("3e-4", common in overrides) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict, prefix: str, problems: list[str]) -> T:
    first_problem = len(problems)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{where}: unknown key (known keys: {known})")
            continue
        kwargs[key] = _coerce(value, hints[key], where, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # only reachable when problems were already recorded
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {exc}")
        return None  # type: ignore[return-value]
    validate = getattr(obj, "problems", None)
    if callable(validate) and len(problems) == first_problem:
        problems.extend(f"{prefix}{p}" for p in validate())
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    if problems:
        raise ConfigError(problems)
    return out


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(cls: type[T], data: dict) -> T:
    problems: list[str] = []
    obj = _build(cls, data or {}, "", problems)
    if problems:
        raise ConfigError(problems)
    return obj


def read_yaml(path: Path) -> dict:
    """A YAML file whose top level is a mapping, or one ConfigError saying why not."""
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) plus ``key=value`` overrides; validate everything."""
    data = read_yaml(Path(path)) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(cls, data)


def config_to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "deep_merge",
    "load_config",
    "parse_overrides",
    "read_yaml",
]
