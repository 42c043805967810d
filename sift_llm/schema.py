"""Typed configuration sections: dataclasses validated when they are built from YAML.

A section is a plain ``@dataclass`` whose fields are declared with :func:`option`. :func:`build` turns a
mapping (parsed YAML) into that dataclass and fails with a :class:`ConfigError` that names the dotted key
and what was expected: an unknown key suggests the nearest valid one, a wrong type names the type, an
out-of-range value names the range. Any subpackage can declare a section this way without knowing the
experiment config that embeds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from sift_llm.errors import UserError

_MISSING = dataclasses.MISSING


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, missing, mistyped or out of range."""


def option(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    help: str = "",
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
) -> Any:
    """Declare a config field with a help text and an optional numeric range."""
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Return ``value`` checked against the annotation ``tp``; raise ConfigError naming ``where``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(arm, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, where): _coerce(val_tp, v, _join(where, str(k))) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: got {value!r}, expected null")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r} in a config section")


def _check_range(field: dataclasses.Field, value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = field.metadata.get("min"), field.metadata.get("max")
    exclusive = field.metadata.get("min_exclusive", False)
    below = lo is not None and (value <= lo if exclusive else value < lo)
    above = hi is not None and value > hi
    if below or above:
        left = "(" if exclusive else "["
        lo_text = "-inf" if lo is None else f"{lo:g}"
        hi_text = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{where}: {value!r} is out of range, allowed {left}{lo_text}, {hi_text}]")


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build the dataclass ``cls`` from ``data`` (a mapping), validating every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {_join(where, near[0])!r}?" if near else ""
            valid = ", ".join(known)
            raise ConfigError(f"unknown key {_join(where, str(key))!r}{hint} (valid keys: {valid})")
    kwargs = {}
    for name, field in known.items():
        key = _join(where, name)
        if name not in data:
            if field.default is _MISSING and field.default_factory is _MISSING:
                raise ConfigError(f"missing required key {key!r}")
            continue
        value = _coerce(hints[name], data[name], key)
        _check_range(field, value, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if where and not str(err).startswith(where):
            raise ConfigError(f"{where}: {err}") from None
        raise


def to_dict(section: Any) -> dict:
    """A plain dict (YAML-ready) of a built section."""
    return dataclasses.asdict(section)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping, in place."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        node = raw
        *parents, leaf = path.split(".")
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])!r} is not a section")
            node = child
        node[leaf] = value
    return raw


def describe(cls: type, where: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field of ``cls`` and its nested sections."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = _join(where, field.name)
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if field.default is not _MISSING:
            default = field.default
        elif field.default_factory is not _MISSING:
            default = field.default_factory()
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, field.metadata.get("help", "")))
    return rows
