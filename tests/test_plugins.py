"""Plugin discovery, registration rules and the plugin listing."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest

from kdbench import hookimpl
from kdbench.cli import main
from kdbench.contracts import Distiller, Task
from kdbench.errors import ConfigError, PluginError
from kdbench.plugins import load_plugins

BUILT_INS = {"task": ["digits"], "model": ["mlp"], "distiller": ["hinton"], "pruner": ["magnitude"],
             "quantizer": ["dynamic-int8"], "decomposer": ["svd"], "executor": ["local"]}


def test_built_in_plugins_are_discovered_through_entry_points():
    plugins = load_plugins()
    for kind, names in BUILT_INS.items():
        for name in names:
            entry = plugins.get(kind, name)
            assert entry.plugin in plugins.versions
            assert entry.description


def write_distribution(root, module: str, body: str, version: str = "1.2.3"):
    """A real installed distribution on sys.path: a module plus its .dist-info."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kdbench]\n{module} = {module}\n")


THIRD_PARTY = """
    import dataclasses
    from kdbench import hookimpl
    from kdbench.contracts import Distiller

    class Zero(Distiller):
        name = "zero-kd"
        description = "a third-party test distiller"
        paper = "none"
        def loss(self, student, teacher, targets):
            return {"zero": student.logits.sum() * 0}

    @hookimpl
    def kdbench_register_distillers(register):
        register(Zero)
"""


def test_an_installed_third_party_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch, capsys):
    write_distribution(tmp_path, "kdbench_thirdparty_demo", THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    entry = plugins.get("distiller", "zero-kd")
    assert (entry.plugin, entry.version) == ("kdbench_thirdparty_demo", "1.2.3")
    sys.modules.pop("kdbench_thirdparty_demo", None)


def test_allow_list_and_block_list_choose_what_loads(monkeypatch):
    monkeypatch.setenv("KDBENCH_PLUGINS", "digits,mlp")
    allowed = load_plugins()
    assert set(allowed.versions) == {"digits", "mlp"}
    monkeypatch.delenv("KDBENCH_PLUGINS")
    monkeypatch.setenv("KDBENCH_BLOCK_PLUGINS", "distill-response")
    blocked = load_plugins()
    assert "distill-response" not in blocked.versions
    with pytest.raises(ConfigError, match="unknown distiller 'hinton'"):
        blocked.get("distiller", "hinton")


def test_a_misspelt_hook_fails_loudly():
    class Misspelt:
        @hookimpl
        def kdbench_register_distiller(self, register):  # missing the final 's'
            pass

    plugins = load_plugins()
    with pytest.raises(PluginError, match="kdbench_register_distiller"):
        plugins.register(Misspelt(), "misspelt")
    assert "misspelt" not in plugins.versions


def test_duplicate_names_name_both_plugins():
    class Again(Distiller):
        name = "hinton"
        description = "a second hinton"

    class Clash:
        @hookimpl
        def kdbench_register_distillers(self, register):
            register(Again)

    plugins = load_plugins()
    with pytest.raises(PluginError, match="'distill-response' and plugin 'clash'"):
        plugins.register(Clash(), "clash")
    assert plugins.get("distiller", "hinton").plugin == "distill-response"
    assert "clash" not in plugins.versions


def test_registering_the_wrong_kind_or_untyped_params_is_rejected():
    class NotATask:
        name = "x"

    class Bad:
        @hookimpl
        def kdbench_register_tasks(self, register):
            register(NotATask)

    class NoDataclass(Task):
        name = "no-dataclass"
        description = "params are not a dataclass"
        Params = dict

    class Bad2:
        @hookimpl
        def kdbench_register_tasks(self, register):
            register(NoDataclass)

    plugins = load_plugins()
    with pytest.raises(PluginError, match="not a subclass of kdbench.contracts.Task"):
        plugins.register(Bad(), "bad")
    with pytest.raises(PluginError, match="Params must be a dataclass"):
        plugins.register(Bad2(), "bad2")


def test_temporary_registration_is_undone(plugins):
    class Temp(Distiller):
        name = "temp-kd"
        description = "temporary"

        @dataclasses.dataclass(frozen=True)
        class Params:
            weight: float = 1.0

    class TempPlugin:
        @hookimpl
        def kdbench_register_distillers(self, register):
            register(Temp)

    with plugins.temporary(TempPlugin(), "temp-plugin"):
        assert plugins.get("distiller", "temp-kd").plugin == "temp-plugin"
    with pytest.raises(ConfigError):
        plugins.get("distiller", "temp-kd")


def test_plugins_command_lists_each_plugin_with_version_and_registrations(capsys):
    assert main(["plugins", "--json"]) == 0
    table = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert "hinton" in table["distill-response"]["registered"]["distiller"]
    assert table["distill-response"]["version"] == "0.1.0"
    assert "kdbench_register_distillers" in table["distill-response"]["hooks"]


def test_list_command_shows_parameters_and_defaults(capsys):
    assert main(["list", "pruner"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "sparsity: float (default 0.5)" in out
    assert main(["list", "prunr"]) == 2
    assert "did you mean 'pruner'" in capsys.readouterr().err
