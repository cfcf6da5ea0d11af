"""Recipes relate by construction: a compound recipe's parent is the recipe its stages begin
with, and ``controls: auto`` adds, for each compound whose added stages train, the parent
trained for exactly the same extra epochs with the same loss."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from kdbench import hookimpl
from kdbench.config import embedded_experiments, load_experiment, parse_experiment
from kdbench.contracts import FinetuneParams, Pruner
from kdbench.errors import ConfigError
from kdbench.recipes import TEACHER, parents

from conftest import TINY


def tiny(recipes: dict, controls: str | None = "auto") -> dict:
    raw = yaml.safe_load(TINY)
    raw["recipes"] = recipes
    if controls is not None:
        raw["controls"] = controls
    return raw


def test_a_compound_recipes_parent_is_the_longest_recipe_it_begins_with(plugins):
    exp = load_experiment("smoke", plugins, ["controls=none"])
    assert parents(exp.recipes) == {"scratch": None, "kd": None, "kd+prune": "kd", "kd+int8": "kd",
                                    "kd+svd": "kd", "teacher+prune": TEACHER}
    longer = parse_experiment(tiny({
        "kd": [{"distill": "hinton"}],
        "kd+ft2": [{"distill": "hinton"}, {"finetune": {"epochs": 2}}],
        "kd+ft2+int8": [{"distill": "hinton"}, {"finetune": {"epochs": 2}}, {"quantize": "dynamic-int8"}],
    }, None), plugins)
    assert parents(longer.recipes)["kd+ft2+int8"] == "kd+ft2"


def test_controls_auto_adds_the_parent_trained_as_long_with_the_same_loss(plugins):
    exp = load_experiment("smoke", plugins)
    # kd+prune and kd+svd add the same 3 epochs of cross-entropy: one control serves both.
    assert dict(exp.derived_controls) == {"kd+ft3": ("kd+prune", "kd+svd"),
                                          "teacher+ft3:hinton": ("teacher+prune",)}
    kd, ft3 = exp.recipes["kd+ft3"]
    assert kd == exp.recipes["kd"][0]
    # A finetune without a distiller stays without; one with keeps it.
    assert (ft3.op, ft3.ref, dict(ft3.training)) == ("finetune", None, {"epochs": 3})
    init, distilled = exp.recipes["teacher+ft3:hinton"]
    assert init.op == "init" and distilled.ref.name == "hinton" and dict(distilled.training) == {"epochs": 3}
    assert exp.recipes["teacher+ft3:hinton"][1] == exp.recipes["teacher+prune"][2]
    # Controls are ordinary cells of the grid, which say in their stored config what they are.
    cells = [c for c in exp.cells() if c.recipe == "kd+ft3"]
    assert len(cells) == len(exp.seeds)
    assert cells[0].config(plugins)["control_for"] == ["kd+prune", "kd+svd"]


def _resolved_epochs(stage, base) -> int:
    """Epochs a stage trains, read off its own parameters (not through kdbench.recipes)."""
    if stage.op in ("train", "distill", "finetune"):
        return stage.resolve_training(base).epochs
    params = stage.ref.params if stage.ref is not None else None
    if stage.ref is not None and stage.ref.name == "gradual":
        return params.steps * params.epochs_per_step
    if stage.ref is not None and stage.ref.name == "qat":
        return params.epochs
    return 0


@pytest.mark.parametrize("name", ["smoke", "mnist5k-compress", "shakespeare-compress"])
def test_a_derived_control_trains_exactly_the_extra_epochs_of_its_compounds(plugins, name):
    exp = load_experiment(name, plugins)
    assert exp.derived_controls, "the embedded compression experiments derive their controls"
    relations = parents({k: v for k, v in exp.recipes.items() if k not in exp.derived_controls})
    cell = exp.cells()[0]
    base = cell.student_training(plugins)
    for control, compounds in exp.derived_controls.items():
        for compound in compounds:
            parent = relations[compound]
            start = 1 if parent == TEACHER else len(exp.recipes[parent])
            added = sum(_resolved_epochs(s, base) for s in exp.recipes[compound][start:])
            matched = sum(_resolved_epochs(s, base) for s in exp.recipes[control][start:])
            assert added > 0 and matched == added, (compound, control)
            # The same learning rate and distiller, stage by stage: only the compression is gone.
            trained = [s for s in exp.recipes[control][start:]]
            assert all(s.op == "finetune" for s in trained)


def test_gradual_pruning_is_matched_call_by_call(plugins):
    exp = parse_experiment(tiny({
        "kd": [{"distill": "hinton"}],
        "kd+gradual": [{"distill": "hinton"}, {"prune": {"name": "gradual", "sparsity": 0.8, "steps": 2,
                                                         "epochs_per_step": 3, "distill": "hinton"}}],
        "kd+qat": [{"distill": "hinton"}, {"quantize": {"name": "qat", "epochs": 2}}],
    }), plugins)
    assert dict(exp.derived_controls) == {"kd+2xft3:hinton": ("kd+gradual",), "kd+ft2": ("kd+qat",)}
    calls = exp.recipes["kd+2xft3:hinton"][1:]
    assert [(s.op, s.ref.name, dict(s.training)) for s in calls] == [("finetune", "hinton", {"epochs": 3})] * 2
    assert exp.recipes["kd+ft2"][1].ref is None  # qat without a distiller trains on cross-entropy


def test_a_declared_control_is_used_and_none_is_derived(plugins):
    exp = parse_experiment(tiny({
        "kd": [{"distill": "hinton"}],
        "kd+prune": [{"distill": "hinton"}, {"prune": "magnitude"}, {"finetune": {"epochs": 2}}],
        "kd-longer": [{"distill": "hinton"}, {"finetune": {"epochs": 2}}],
    }), plugins)
    assert list(exp.recipes) == ["kd", "kd+prune", "kd-longer"] and not exp.derived_controls


def test_recipes_without_added_training_get_no_control(plugins):
    exp = parse_experiment(tiny({"kd": [{"distill": "hinton"}],
                                 "kd+int8": [{"distill": "hinton"}, {"quantize": "dynamic-int8"}]}), plugins)
    assert list(exp.recipes) == ["kd", "kd+int8"]


def test_controls_keep_the_cell_ids_of_every_declared_recipe(plugins):
    plain = load_experiment("smoke", plugins, ["controls=none"])
    auto = load_experiment("smoke", plugins)
    ids = {(c.recipe, c.seed): c.cell_id(plugins) for c in plain.cells()}
    assert {(c.recipe, c.seed): c.cell_id(plugins) for c in auto.cells() if c.recipe in plain.recipes} == ids
    assert len(auto.cells()) == len(plain.cells()) + 2 * len(auto.seeds)


@pytest.mark.parametrize("value", ["automatic", "yes", 1, ["auto"]])
def test_an_unknown_controls_value_names_the_allowed_ones(plugins, value):
    with pytest.raises(ConfigError) as err:
        parse_experiment(tiny({"scratch": ["train"]}, value), plugins)
    assert err.value.where == "controls" and "(allowed: auto, none)" in str(err.value)


def test_a_derived_name_taken_by_another_recipe_is_an_error(plugins):
    with pytest.raises(ConfigError, match="rename that recipe, or declare the control yourself") as err:
        parse_experiment(tiny({"kd": [{"distill": "hinton"}],
                               "kd+prune": [{"distill": "hinton"}, {"prune": "magnitude"}, {"finetune": {"epochs": 2}}],
                               "kd+ft2": ["train"]}), plugins)
    assert err.value.where == "recipes.kd+ft2"


def test_a_compressor_that_trains_without_declaring_how_stops_controls_auto(plugins):
    class Silent(Pruner):
        name = "silent-gradual"
        description = "fine-tunes inside apply, but does not say how"

        @dataclasses.dataclass(frozen=True)
        class Params(FinetuneParams):
            epochs: int = 2

    class Plugin:
        @hookimpl
        def kdbench_register_pruners(self, register):
            register(Silent)

    raw = tiny({"kd": [{"distill": "hinton"}], "kd+silent": [{"distill": "hinton"}, {"prune": "silent-gradual"}]})
    with plugins.temporary(Plugin(), "silent-plugin"):
        with pytest.raises(ConfigError, match="finetune_schedule") as err:
            parse_experiment(copy.deepcopy(raw), plugins)
        assert err.value.where == "recipes.kd+silent[1]"
        raw.pop("controls")
        assert "kd+silent" in parse_experiment(raw, plugins).recipes  # without controls: as before


def test_every_embedded_experiment_with_trained_compounds_declares_controls():
    for name, text in embedded_experiments().items():
        raw = yaml.safe_load(text)
        trains = any(isinstance(s, dict) and "finetune" in s for recipe in raw["recipes"].values()
                     for s in (recipe["stages"] if isinstance(recipe, dict) else recipe)[1:])
        assert not trains or raw.get("controls") == "auto", name
