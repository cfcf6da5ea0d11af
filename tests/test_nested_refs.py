"""A distiller inside a compressor's parameters is a reference like a stage's: parsed, checked,
filled with defaults and versioned, and part of the cell id."""

from __future__ import annotations

import dataclasses
import types

import pytest

from kdbench import hookimpl
from kdbench.config import Ref, parse_experiment
from kdbench.contracts import Pruner
from kdbench.errors import ConfigError
from kdbench.params import Reference
from kdbench.plugins import load_plugins

GRADUAL = {"name": "gradual", "sparsity": 0.5, "steps": 2, "epochs_per_step": 1, "distill": "hinton"}
QAT = {"name": "qat", "epochs": 1, "distill": "hinton"}


def experiment(plugins, recipes: dict):
    return parse_experiment({"name": "nested", "tasks": ["digits"],
                             "pairs": [{"teacher": {"name": "mlp", "hidden": [32]},
                                        "student": {"name": "mlp", "hidden": [8]}}],
                             "recipes": recipes}, plugins)


def cell(plugins, op: str, compressor: dict):
    recipes = {"c": [{"distill": "hinton"}, {op: compressor}], "scratch": ["train"]}
    return {c.recipe: c for c in experiment(plugins, recipes).cells()}


def hinton_with_temperature(plugins, monkeypatch, default: float) -> None:
    """Hinton's default temperature changed, as a new release of its plugin might."""
    cls = plugins.get("distiller", "hinton").cls

    @dataclasses.dataclass(frozen=True)
    class Params(cls.Params):
        temperature: float = default

    monkeypatch.setattr(cls, "Params", Params)


@pytest.mark.parametrize("op, compressor", [("prune", GRADUAL), ("quantize", QAT)])
def test_a_nested_distillers_defaults_are_part_of_the_cell_id(plugins, monkeypatch, op, compressor):
    before = {name: c.cell_id(plugins) for name, c in cell(plugins, op, compressor).items()}
    hinton_with_temperature(plugins, monkeypatch, 7.0)
    cells = cell(plugins, op, compressor)
    after = {name: c.cell_id(plugins) for name, c in cells.items()}
    assert after["c"] != before["c"]
    assert after["scratch"] == before["scratch"]  # no distiller: unchanged
    kind = {"prune": "pruner", "quantize": "quantizer"}[op]
    nested = cells["c"].config(plugins)["stages"][1][kind]["distill"]
    assert nested == {"name": "hinton", "temperature": 7.0, "alpha": 0.9}


def test_every_way_of_writing_it_is_the_same_reference(plugins):
    ways = [{**GRADUAL, "distill": "hinton", "distill_params": {"temperature": 2}},
            {**GRADUAL, "distill": {"name": "hinton", "temperature": 2}},
            {**GRADUAL, "distill": {"name": "hinton", "temperature": 2.0, "alpha": 0.9}}]
    ids = {cell(plugins, "prune", way)["c"].cell_id(plugins) for way in ways}
    assert len(ids) == 1
    ref = experiment(plugins, {"c": [{"distill": "hinton"}, {"prune": ways[0]}]}).recipes["c"][1].ref
    assert isinstance(ref.params.distill, Ref) and ref.params.distill.params.temperature == 2.0
    assert ref.spec()["distill"] == {"name": "hinton", "temperature": 2.0, "alpha": 0.9}
    assert ref.label() == "gradual(distill=hinton(temperature=2.0),sparsity=0.5,steps=2)"
    # Without a distiller the spec says so, and nothing else is recorded for it.
    plain = experiment(plugins, {"c": [{"distill": "hinton"}, {"prune": {"name": "gradual"}}]})
    assert plain.recipes["c"][1].ref.spec()["distill"] is None
    assert "distill_params" not in plain.recipes["c"][1].ref.spec()


@pytest.mark.parametrize("compressor, where, message", [
    ({**GRADUAL, "distill": "hintn"}, "recipes.c[1].prune.distill", "did you mean 'hinton'"),
    ({**GRADUAL, "distill": {"name": "hintn"}}, "recipes.c[1].prune.distill.name", "did you mean 'hinton'"),
    ({**GRADUAL, "distill_params": {"temprature": 2}}, "recipes.c[1].prune.distill_params.temprature",
     "did you mean 'temperature'"),
    ({**GRADUAL, "distill": {"name": "hinton", "temprature": 2}}, "recipes.c[1].prune.distill.temprature",
     "did you mean 'temperature'"),
    ({**GRADUAL, "distill": {"name": "hinton", "temperature": -1}}, "recipes.c[1].prune.distill",
     "temperature"),
    ({"name": "gradual", "distill_params": {"temperature": 2}}, "recipes.c[1].prune.distill_params",
     "without distill"),
    ({**GRADUAL, "distill": {"name": "hinton"}, "distill_params": {"temperature": 2}},
     "recipes.c[1].prune.distill_params", "given twice"),
    ({**GRADUAL, "distill": 3}, "recipes.c[1].prune.distill", "a name or a mapping"),
])
def test_a_bad_nested_distiller_is_a_config_error_at_parse_time(plugins, compressor, where, message):
    with pytest.raises(ConfigError, match=message) as err:
        experiment(plugins, {"c": [{"distill": "hinton"}, {"prune": compressor}]})
    assert err.value.where == where


def kd_plugin(version_tag: str):
    from kdbench_plugins.distill.response import Hinton

    class Mine(Hinton):
        name = "my-kd"
        description = f"Hinton's loss under another name ({version_tag})"

    module = types.ModuleType("my_kd_plugin")
    module.kdbench_register_distillers = hookimpl(lambda register: register(Mine))
    return module


@pytest.mark.parametrize("op, compressor", [("prune", {**GRADUAL, "distill": "my-kd"}),
                                            ("quantize", {**QAT, "distill": {"name": "my-kd", "alpha": 0.5}})])
def test_the_nested_distillers_plugin_and_version_are_recorded(op, compressor):
    """Resolved with the registry the experiment is parsed with, not a process-wide one: a
    distiller only this registry knows is found, and its plugin's version is in the id."""
    ids = []
    for version in ("1.0", "2.0"):
        plugins = load_plugins()
        plugins.register(kd_plugin(version), "my-kd-plugin", version)
        c = cell(plugins, op, compressor)["c"]
        assert c.config(plugins)["plugins"]["my-kd-plugin"] == version
        ids.append(c.cell_id(plugins))
    assert ids[0] != ids[1]


def test_plugins_build_resolves_nested_distillers_too(plugins):
    pruner = plugins.build("pruner", "gradual", {"distill": "hinton", "distill_params": {"alpha": 0.5}})
    assert pruner.params.distill.spec() == {"name": "hinton", "temperature": 4.0, "alpha": 0.5}
    with pytest.raises(ConfigError, match="did you mean 'hinton'"):
        plugins.build("quantizer", "qat", {"distill": "hintn"})


def test_compressor_parameters_never_reach_for_the_process_wide_registry(monkeypatch):
    """contracts.py is below the registry: building FinetuneParams calls no get_plugins()."""
    import kdbench.plugins
    from kdbench_plugins.prune.gradual import Gradual

    monkeypatch.setattr(kdbench.plugins, "get_plugins", lambda: pytest.fail("get_plugins() called"))
    assert Gradual.Params(sparsity=0.5).distill is None
    plugins = load_plugins()
    assert plugins.build("pruner", "gradual", {"distill": "hinton"}).params.distill.name == "hinton"


def test_any_compressor_can_take_references_even_a_list_of_them():
    """The mechanism is the parameter type, not gradual or qat: a new compressor with a tuple
    of distillers gets them resolved, in its spec and its cell's plugin versions."""
    class Ensemble(Pruner):
        name = "ensemble-prune"
        description = "prunes, then fine-tunes with each distiller in turn"

        @dataclasses.dataclass(frozen=True)
        class Params:
            distillers: tuple[Reference("distiller"), ...] = ()

    module = types.ModuleType("ensemble_plugin")
    module.kdbench_register_pruners = hookimpl(lambda register: register(Ensemble))
    plugins = load_plugins()
    plugins.register(module, "ensemble-plugin", "3.0")
    plugins.register(kd_plugin("1.0"), "my-kd-plugin", "1.5")
    compressor = {"name": "ensemble-prune", "distillers": ["hinton", {"name": "my-kd", "temperature": 2}]}
    c = cell(plugins, "prune", compressor)["c"]
    spec = c.config(plugins)["stages"][1]["pruner"]
    assert spec["distillers"] == [{"name": "hinton", "temperature": 4.0, "alpha": 0.9},
                                  {"name": "my-kd", "temperature": 2.0, "alpha": 0.9}]
    assert c.config(plugins)["plugins"]["my-kd-plugin"] == "1.5"
    with pytest.raises(ConfigError, match="did you mean 'hinton'") as err:
        cell(plugins, "prune", {"name": "ensemble-prune", "distillers": ["hinton", "hintn"]})
    assert err.value.where == "recipes.c[1].prune.distillers[1]"
