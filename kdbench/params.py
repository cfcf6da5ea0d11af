"""Typed plugin parameters: dataclasses checked against the user's mapping before any work.

A component declares ``Params`` as a dataclass whose fields carry type hints and defaults;
``__post_init__`` may raise ``ValueError`` for range checks. ``parse_params`` turns the
mapping from an experiment file into an instance, or a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, unknown
from .yamlfile import parse_number


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For components that take no parameters."""


def field_specs(params_cls: type) -> list[dict[str, Any]]:
    """Name, type and default of every parameter, for ``kdbench list`` and docs."""
    hints = typing.get_type_hints(params_cls)
    specs = []
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        specs.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                      "required": f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING,
                      "help": f.metadata.get("help", "")})
    return specs


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def parse_params(params_cls: type, raw: Mapping[str, Any] | None, where: str = "") -> Any:
    """Validate ``raw`` against ``params_cls`` and build it (defaults fill the gaps)."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(params_cls)
    names = [f.name for f in dataclasses.fields(params_cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(unknown("parameter", key, names), _join(where, key))
        kwargs[key] = coerce(value, hints[key], _join(where, key))
    missing = [s["name"] for s in field_specs(params_cls) if s["required"] and s["name"] not in raw]
    if missing:
        raise ConfigError(f"missing required parameter(s): {', '.join(missing)}", where)
    try:
        return params_cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc), where) from None


def defaults(params_cls: type) -> dict[str, Any]:
    """The default of every parameter that has one."""
    return {s["name"]: _plain(s["default"]) for s in field_specs(params_cls) if not s["required"]}


def as_dict(params: Any) -> dict[str, Any]:
    """Plain, JSON-ready values (tuples become lists) for hashing and storing."""
    return _plain(dataclasses.asdict(params))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; widen int to float; lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"expected {type_name(tp)}, got {value!r}", where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(unknown("value", value, [str(a) for a in args]), where)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", where)
        item = args[0] if args else Any
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", where)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", where)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 or 2.0: an integer in a float's notation
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", where)
        return value
    if tp is float:
        if isinstance(value, str) and parse_number(value) is not None:
            return parse_number(value)  # '1e-3' from a YAML 1.1 reader
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number (e.g. 0.001 or 1e-3), got {value!r}", where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", where)
        return value
    return value
