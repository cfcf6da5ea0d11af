"""Plugin discovery and the registry of named things.

Plugins are modules (or objects) with ``@hookimpl`` functions, found through the entry-point
group ``kdbench``; built-in plugins are found the same way. Two environment variables choose
what loads: ``KDBENCH_PLUGINS`` (a comma-separated allow-list of plugin names) and
``KDBENCH_BLOCK_PLUGINS`` (names never to load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from typing import Any

import pluggy

from . import compat, hookspecs
from .contracts import KINDS, Component
from .errors import ConfigError, PluginError, unknown
from .params import field_specs, parse_params

ENTRY_POINT_GROUP = "kdbench"
TRACE_ENV = "KDBENCH_TRACE"  # print every hook call (see enable_trace)
ALLOW_ENV = "KDBENCH_PLUGINS"
BLOCK_ENV = "KDBENCH_BLOCK_PLUGINS"

REGISTER_HOOKS = {
    "task": "kdbench_register_tasks",
    "model": "kdbench_register_models",
    "distiller": "kdbench_register_distillers",
    "pruner": "kdbench_register_pruners",
    "quantizer": "kdbench_register_quantizers",
    "decomposer": "kdbench_register_decomposers",
    "executor": "kdbench_register_executors",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered thing and the plugin that provided it."""

    kind: str
    name: str
    cls: type[Component]
    plugin: str
    version: str

    @property
    def description(self) -> str:
        return self.cls.description

    def build(self, params: Any = None) -> Any:
        return self.cls(params)

    def to_json(self) -> dict[str, Any]:
        info = {"kind": self.kind, "name": self.name, "description": self.description,
                "plugin": self.plugin, "version": self.version,
                "params": field_specs(self.cls.Params)}
        for attr in ("category", "paper", "materialized", "metric"):
            if hasattr(self.cls, attr):
                info[attr] = getattr(self.cls, attr)
        return {**info, **compat.entry_io(self)}  # a task's or family's inputs and targets

    @property
    def io(self) -> str:
        """What a task gives or a family takes and predicts, in words ('' if undeclared)."""
        return compat.describe(self.kind, self.cls)


class Plugins:
    """The loaded plugins and everything they registered, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("kdbench")
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
            enable_trace(self.pm)
        self.versions: dict[str, str] = {}
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    # ------------------------------------------------------------ loading
    def load_entry_points(self, allow: set[str] | None = None, block: set[str] = frozenset()) -> None:
        versions: dict[int, str] = {}  # each read of a distribution's version parses its metadata
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in block or (allow is not None and ep.name not in allow):
                continue
            if self.pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to import: {exc}") from exc
            if ep.dist is not None and id(ep.dist) not in versions:
                versions[id(ep.dist)] = ep.dist.version
            version = versions[id(ep.dist)] if ep.dist is not None else "0"
            self.register(plugin, ep.name, version)

    def register(self, plugin: Any, name: str, version: str = "0") -> None:
        """Add one plugin and collect what it registers; reject misspelt hooks and clashes."""
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin '{name}': {exc} (hooks are listed in kdbench/hookspecs.py)") from None
        self.versions[name] = version
        try:
            for kind, hook in REGISTER_HOOKS.items():
                # Call this plugin's implementation alone, so every name is attributed to it.
                caller = self.pm.subset_hook_caller(hook, remove_plugins=self._others(name))
                caller(register=lambda cls, kind=kind: self._add(kind, cls, name, version))
        except Exception:
            self.unregister(name)
            raise

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.versions.pop(name, None)
        for by_name in self.entries.values():
            for key in [k for k, e in by_name.items() if e.plugin == name]:
                del by_name[key]

    def _others(self, name: str) -> list[Any]:
        return [p for n, p in self.pm.list_name_plugin() if n != name]

    def _add(self, kind: str, cls: Any, plugin: str, version: str) -> Entry:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin '{plugin}' registered {cls!r} as a {kind}, "
                              f"but it is not a subclass of kdbench.contracts.{base.__name__}")
        if not cls.name or not cls.description:
            raise PluginError(f"plugin '{plugin}': {cls.__name__} needs a non-empty 'name' and 'description'")
        if not dataclasses.is_dataclass(cls.Params):
            raise PluginError(f"plugin '{plugin}': {cls.__name__}.Params must be a dataclass")
        if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
            print(f"kdbench trace:   plugin '{plugin}' {version} registers {kind} '{cls.name}' "
                  f"({cls.__module__}.{cls.__qualname__})", file=sys.stderr, flush=True)
        existing = self.entries[kind].get(cls.name)
        if existing is not None:
            raise PluginError(f"{kind} '{cls.name}' is registered by both plugin "
                              f"'{existing.plugin}' and plugin '{plugin}'; block one of them "
                              f"with {BLOCK_ENV}={plugin}")
        entry = Entry(kind, cls.name, cls, plugin, version)
        self.entries[kind][cls.name] = entry
        return entry

    # ------------------------------------------------------------ lookup
    def get(self, kind: str, name: str, where: str = "") -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise ConfigError(unknown(kind, name, self.entries[kind]), where) from None

    def build(self, kind: str, name: str, raw_params: dict | None = None, where: str = "") -> Any:
        entry = self.get(kind, name, where)
        return entry.build(parse_params(entry.cls.Params, raw_params, where, resolve=self.resolve))

    def resolve(self, kind: str, raw: Any, where: str, params: Any = None, params_where: str = "") -> Any:
        """A reference inside another's parameters (a compressor's distiller), resolved as the
        experiment file resolves every reference (``kdbench.config.parse_ref``)."""
        from .config import parse_ref  # config builds on this module

        return parse_ref(self, kind, raw, where, params, params_where)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def plugin_table(self) -> list[dict[str, Any]]:
        """Each plugin, its version, and what it registered by kind (``kdbench plugins``)."""
        rows = []
        for name, _ in sorted(self.pm.list_name_plugin()):
            registered = {kind: sorted(e.name for e in by_name.values() if e.plugin == name)
                          for kind, by_name in self.entries.items()}
            hooks = sorted(h.name for h in self.pm.get_hookcallers(self.pm.get_plugin(name)) or [])
            rows.append({"name": name, "version": self.versions.get(name, "0"), "hooks": hooks,
                         "registered": {k: v for k, v in registered.items() if v}})
        return rows

    @contextlib.contextmanager
    def temporary(self, plugin: Any, name: str, version: str = "0") -> Iterator[None]:
        """Register a plugin for the duration of a block (tests, notebooks)."""
        self.register(plugin, name, version)
        try:
            yield
        finally:
            self.unregister(name)


def _env_set(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def enable_trace(pm: pluggy.PluginManager, stream=None) -> None:
    """Print every hook call, with its arguments, the plugins it reaches and its results, to
    standard error (``KDBENCH_TRACE=1``): pluggy's tracer, with the plugin that implements each
    call shown, for debugging a plugin that does not register or observe what it should."""
    out = stream or sys.stderr

    def before(hook_name, implementations, kwargs):
        if not implementations:  # a registration hook the plugin being loaded does not implement
            return
        names = ", ".join(impl.plugin_name for impl in implementations)
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print(f"kdbench trace: {hook_name}({args}) -> plugins [{names}]", file=out, flush=True)

    def after(outcome, hook_name, implementations, kwargs):
        if not implementations:
            return
        try:
            result = outcome.get_result()
        except BaseException as exc:  # the hook raised: show it, the caller still sees it
            print(f"kdbench trace: {hook_name} raised {type(exc).__name__}: {exc}", file=out, flush=True)
            return
        print(f"kdbench trace: {hook_name} returned {result!r}", file=out, flush=True)

    pm.add_hookcall_monitoring(before, after)


def load_plugins() -> Plugins:
    """A fresh ``Plugins`` loaded from entry points, honouring the allow- and block-lists."""
    plugins = Plugins()
    plugins.load_entry_points(allow=_env_set(ALLOW_ENV), block=_env_set(BLOCK_ENV) or set())
    return plugins


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded
