"""Typed plugin parameters: dataclasses checked against the user's mapping before any work.

A component declares ``Params`` as a dataclass whose fields carry type hints and defaults;
``__post_init__`` may raise ``ValueError`` for range checks. ``parse_params`` turns the
mapping from an experiment file into an instance, or a ``ConfigError`` that names the key.

A parameter may name another registered thing (the distiller a compressor fine-tunes with):
its type is ``Reference("distiller")`` (``kdbench.contracts.DistillerRef``). Such a value is
resolved exactly as a stage's reference is (a name or ``{name: ..., <params>}``, checked,
filled with defaults, versioned) by the ``resolve`` callback ``parse_params`` is given; the
parameters then hold the resolved reference, whose spec (name and every parameter) is part
of the outer one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from collections.abc import Callable
from typing import Annotated, Any

from .errors import ConfigError, unknown
from .yamlfile import parse_number


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For components that take no parameters."""


@dataclasses.dataclass(frozen=True)
class Nested:
    """Marks a type as a reference to a registered thing of ``kind`` (see ``Reference``)."""

    kind: str


def Reference(kind: str) -> Any:  # noqa: N802 - used as a type, like typing's own factories
    """The type of a parameter that names a registered ``kind`` (e.g. ``"distiller"``): in a
    file a name or ``{name: ..., <params>}``; once parsed, the resolved reference."""
    return Annotated[Any, Nested(kind)]


#: Field metadata key: the raw key whose mapping holds the parameters of a reference given by
#: name (``distill: hinton, distill_params: {temperature: 2}``). Read, never stored.
PARAMS_KEY = "params_key"

#: ``resolve(kind, raw, where, params, params_where)`` -> the resolved reference: ``raw`` a
#: name or a mapping, ``params`` the parameters given beside a name (``PARAMS_KEY``) or None.
Resolver = Callable[[str, Any, str, "Mapping[str, Any] | None", str], Any]


def reference_field(*, params_key: str = "", help: str = "") -> Any:
    """A ``dataclasses.field`` for an optional reference parameter (default None), whose
    parameters may also come beside it under ``params_key``."""
    return dataclasses.field(default=None, metadata={PARAMS_KEY: params_key, "help": help})


def nested_kind(tp: Any) -> str | None:
    """The kind a (possibly optional) reference type names, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = [nested_kind(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    if typing.get_origin(tp) is Annotated:
        return next((m.kind for m in tp.__metadata__ if isinstance(m, Nested)), None)
    return None


def _hints(params_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(params_cls, include_extras=True)


def field_specs(params_cls: type) -> list[dict[str, Any]]:
    """Name, type and default of every parameter, for ``kdbench list`` and docs."""
    hints = _hints(params_cls)
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
    kind = nested_kind(tp)
    if kind is not None:
        return f"{kind} (name or {{name: ..., <params>}})"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def parse_params(params_cls: type, raw: Mapping[str, Any] | None, where: str = "",
                 resolve: Resolver | None = None) -> Any:
    """Validate ``raw`` against ``params_cls`` and build it (defaults fill the gaps).
    ``resolve`` resolves reference parameters (``Reference``); without it they are refused."""
    raw = dict(raw or {})
    hints = _hints(params_cls)
    fields = dataclasses.fields(params_cls)
    names = [f.name for f in fields]
    # Parameters of a reference given beside its name: read with the reference, never stored.
    beside = {f.metadata[PARAMS_KEY]: f.name for f in fields if f.metadata.get(PARAMS_KEY)}
    kwargs = {}
    for key, value in raw.items():
        if key in beside:
            if beside[key] not in raw or raw[beside[key]] is None:
                raise ConfigError(f"{key} given without {beside[key]}: name the "
                                  f"{nested_kind(hints[beside[key]])} too", _join(where, key))
            continue
        if key not in names:
            raise ConfigError(unknown("parameter", key, names + list(beside)), _join(where, key))
        kind = nested_kind(hints[key])
        if kind is not None and value is not None:
            if resolve is None:
                raise ConfigError(f"'{key}' names a {kind}, which only the plugin registry can "
                                  "resolve: parse it with kdbench.config.parse_ref or Plugins.build",
                                  _join(where, key))
            params_key = next((k for k, name in beside.items() if name == key), "")
            kwargs[key] = resolve(kind, value, _join(where, key), raw.get(params_key) if params_key else None,
                                  _join(where, params_key) if params_key else "")
            continue
        kwargs[key] = coerce(value, hints[key], _join(where, key), resolve)
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
    """Plain, JSON-ready values (tuples become lists) for hashing and storing; a resolved
    reference becomes its spec (name and every parameter)."""
    return {f.name: _plain(getattr(params, f.name)) for f in dataclasses.fields(params)}


def _plain(value: Any) -> Any:
    if callable(getattr(value, "spec", None)):  # a resolved reference (kdbench.config.Ref)
        return value.spec()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def coerce(value: Any, tp: Any, where: str, resolve: Resolver | None = None) -> Any:
    """Check ``value`` against the type hint ``tp``; widen int to float; lists to tuples;
    resolve references (``Reference``) with ``resolve``."""
    kind = nested_kind(tp)
    if kind is not None and value is not None:
        if resolve is None:
            raise ConfigError(f"this parameter names a {kind}, which only the plugin registry can "
                              "resolve: parse it with kdbench.config.parse_ref or Plugins.build", where)
        return resolve(kind, value, where, None, "")
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
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
                return coerce(value, arg, where, resolve)
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
        return tuple(coerce(v, item, f"{where}[{i}]", resolve) for i, v in enumerate(value))
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
