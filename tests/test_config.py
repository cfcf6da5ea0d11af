"""The experiment file: the default parses, and every kind of mistake is caught before any
work with a message that names the file, the path in it and the fix."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from kdbench.cli import main
from kdbench.config import load_experiment, parse_experiment
from kdbench.errors import ConfigError

from conftest import TINY


def test_embedded_default_is_the_documented_grid(plugins):
    exp = load_experiment(None, plugins)
    assert exp.name == "quickstart"
    # Six declared recipes, then the two equal-budget controls that 'controls: auto' derives.
    assert list(exp.recipes) == ["scratch", "kd", "kd+int8", "kd+prune", "kd+svd", "teacher+prune",
                                 "kd+ft10", "teacher+ft10:hinton"]
    assert exp.tasks[0].name == "mnist1d" and exp.executor.name == "processes"
    assert len(exp.cells()) == 1 * 1 * 8 * 3
    kd = exp.recipes["kd"][0]
    assert (kd.op, kd.ref.name, kd.ref.params.temperature, kd.ref.params.alpha) == ("distill", "hinton", 16.0, 0.9)
    finetune = exp.recipes["teacher+prune"][2]
    assert finetune.ref.name == "hinton" and finetune.training == {"epochs": 10}


def test_cell_ids_are_stable_and_distinct(plugins):
    a = load_experiment(None, plugins).cells()
    b = load_experiment(None, plugins).cells()
    ids = [c.cell_id(plugins) for c in a]
    assert ids == [c.cell_id(plugins) for c in b]
    assert len(set(ids)) == len(ids)


def test_teachers_are_shared_across_recipes_but_not_seeds(plugins):
    cells = load_experiment(None, plugins).cells()
    keys = {c.teacher_job(plugins).teacher_key for c in cells}
    assert len(keys) == 3  # one per seed


def edit(mutate):
    raw = yaml.safe_load(TINY)
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, where, message", [
    (lambda r: r.update(recipies=r.pop("recipes")), "recipies", "did you mean 'recipes'"),
    (lambda r: r.pop("name"), "name", "missing required key 'name'"),
    (lambda r: r.update(tasks=["digit"]), "tasks[0]", "unknown task 'digit'; did you mean 'digits'"),
    (lambda r: r.update(seeds=[0, "one"]), "seeds", "non-empty list of integers"),
    (lambda r: r.update(seeds=[1, 1]), "seeds", "duplicates"),
    (lambda r: r["pairs"][0]["student"].update(hiden=[8]), "pairs[0].student.hiden", "did you mean 'hidden'"),
    (lambda r: r["pairs"][0]["student"].update(hidden=8), "pairs[0].student.hidden", "expected a list"),
    (lambda r: r["pairs"][0]["student"].update(hidden=[0]), "pairs[0].student", "hidden sizes must be positive"),
    (lambda r: r["pairs"][0].update(tacher=r["pairs"][0]["teacher"]), "pairs[0].tacher", "did you mean 'teacher'"),
    (lambda r: r["recipes"].update(kd=[{"distill": {"name": "hinton", "temprature": 2}}]),
     "recipes.kd[0].distill.temprature", "did you mean 'temperature'"),
    (lambda r: r["recipes"].update(kd=[{"distill": {"name": "hinton", "temperature": -1}}]),
     "recipes.kd[0].distill", "temperature must be positive"),
    (lambda r: r["recipes"].update(kd=[{"distil": "hinton"}]), "recipes.kd[0]", "unknown stage 'distil'; did you mean 'distill'"),
    (lambda r: r["recipes"].update(kd=[{"distill": "hintn"}]), "recipes.kd[0].distill", "did you mean 'hinton'"),
    (lambda r: r["recipes"].update(p=[{"prune": {"name": "magnitude", "sparsity": 0.5}}]),
     "recipes.p[0]", "must start with 'train', 'distill' or 'init: teacher'"),
    (lambda r: r["recipes"].update(p=["train", {"prune": {"name": "magnitude", "sparsity": 1.5}}]),
     "recipes.p[1].prune", "sparsity must be in [0, 1)"),
    (lambda r: r["recipes"].update(q=["train", {"quantize": "dynamic-int8"}, {"finetune": {"epochs": 1}}]),
     "recipes.q[2]", "cannot follow 'quantize: dynamic-int8'"),
    (lambda r: r["recipes"].update(i=["train", {"init": "teacher"}]), "recipes.i[1]", "'init' can only be the first stage"),
    (lambda r: r["recipes"].update(i=[{"init": "student"}]), "recipes.i[0].init", "'init' takes only 'teacher'"),
    (lambda r: r["recipes"].update(f=["train", {"finetune": {"epoch": 1}}]), "recipes.f[1].finetune.epoch", "did you mean 'epochs'"),
    (lambda r: r["training"].update(optimizer="adamm"), "training.optimizer", "did you mean 'adam'"),
    (lambda r: r["training"].update(epochs=2.5), "training.epochs", "expected an integer"),
    (lambda r: r.update(measure={"latency_repeat": 3}), "measure.latency_repeat", "did you mean 'latency_repeats'"),
    (lambda r: r.update(executor="lokal"), "executor", "did you mean 'local'"),
])
def test_every_mistake_is_reported_with_its_path(plugins, mutate, where, message):
    with pytest.raises(ConfigError) as info:
        parse_experiment(edit(mutate), plugins)
    assert info.value.where == where
    assert message in info.value.message


def test_error_names_the_file_and_exits_2_before_any_work(tiny_yaml, tmp_path, capsys):
    path = tiny_yaml(TINY.replace("name: hinton", "name: hintn"))
    store = tmp_path / "results.db"
    assert main(["run", str(path), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: recipes.kd[0].distill.name: unknown distiller 'hintn'; did you mean 'hinton'?" in err
    assert not store.exists()


def test_missing_file_and_broken_yaml_are_config_errors(plugins, tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml", plugins)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad, plugins)


def test_overrides_change_the_file_and_are_validated(plugins):
    from kdbench.config import load_experiment

    exp = load_experiment(None, plugins, ["training.epochs=1", "seeds=[7]", "pairs.0.student.hidden=[8]"])
    assert exp.training["epochs"] == 1 and exp.seeds == (7,)
    assert exp.pairs[0].student.params.hidden == (8,)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_experiment(None, plugins, ["training.epoch=1"])
    with pytest.raises(ConfigError, match="not an index"):
        load_experiment(None, plugins, ["pairs.3.student=mlp"])
    with pytest.raises(ConfigError, match="expects PATH=VALUE"):
        load_experiment(None, plugins, ["training.epochs"])


def test_a_pair_can_train_its_teacher_and_student_differently(plugins):
    from kdbench.config import load_experiment

    exp = load_experiment(None, plugins, ["pairs.0.teacher_training={epochs: 40}",
                                          "pairs.0.student_training={epochs: 5, optimizer: sgd, nesterov: true}"])
    cell = exp.cells()[0]
    assert cell.teacher_job(plugins).training.epochs == 40
    student = cell.student_training(plugins)
    assert (student.epochs, student.optimizer, student.nesterov, student.lr) == (5, "sgd", True, 0.003)
    assert cell.config(plugins)["stages"][0]["training"]["epochs"] == 5
    with pytest.raises(ConfigError, match="did you mean 'nesterov'"):
        load_experiment(None, plugins, ["pairs.0.student_training={nestrov: true}"])


def test_settings_added_later_keep_existing_cell_ids_at_their_default():
    from kdbench.config import Measure, measure_spec

    assert "probe" not in measure_spec(Measure())  # stores written before it keep resuming
    assert measure_spec(Measure(probe=True))["probe"] is True  # set: part of the id


def test_a_task_whose_data_changed_gets_new_cell_ids(plugins, monkeypatch):
    """A task's ``version`` is part of its cells' identity from version 2 on: rows of the old
    data are not taken as done, and version-1 tasks keep the ids their stores hold."""
    from kdbench.config import parse_experiment

    raw = yaml.safe_load(TINY)
    before = {c.cell_id(plugins) for c in parse_experiment(copy.deepcopy(raw), plugins).cells()}
    assert all("data_version" not in c.task.spec() for c in parse_experiment(copy.deepcopy(raw), plugins).cells())
    monkeypatch.setattr(plugins.get("task", "digits").cls, "version", "2")
    cells = parse_experiment(copy.deepcopy(raw), plugins).cells()
    assert cells[0].task.spec()["data_version"] == "2"
    assert not before & {c.cell_id(plugins) for c in cells}
    assert before.isdisjoint({c.teacher_job(plugins).cell_id for c in cells})


@pytest.mark.parametrize("written, value", [("1e-3", 1e-3), ("5e-4", 5e-4), ("1E3", 1000.0), (".5", 0.5),
                                            ("2.5e-2", 0.025), ("+1e+1", 10.0), ("0.001", 1e-3)])
def test_numbers_are_read_as_people_write_them_in_files_and_in_set(plugins, tiny_yaml, written, value):
    """YAML 1.1 reads 1e-3 as a string; experiment files and --set read it as the number it is."""
    text = TINY.replace("training: {epochs: 3, batch_size: 64}",
                        f"training: {{epochs: 3, batch_size: 64, lr: {written}}}")
    assert load_experiment(tiny_yaml(text), plugins).training["lr"] == value
    exp = load_experiment(tiny_yaml(), plugins, [f"training.lr={written}"])
    assert exp.cells()[0].student_training(plugins).lr == value
    exp = load_experiment(tiny_yaml(), plugins, [f"recipes.kd=[{{distill: {{name: hinton, alpha: {written}}}}}]"]
                          if value < 1 else [f"recipes.kd=[{{distill: {{name: hinton, temperature: {written}}}}}]"])
    params = exp.recipes["kd"][0].ref.params
    assert value in (params.alpha, params.temperature)


def test_integers_in_float_notation_and_numbers_as_strings(plugins):
    """``epochs: 1e2`` is 100 epochs; a float parameter handed the string '1e-3' (a config built
    with another YAML reader) takes the number; what is not a number is still refused."""
    exp = load_experiment(None, plugins, ["training.epochs=1e2", "training.weight_decay='5e-4'"])
    training = exp.cells()[0].student_training(plugins)
    assert (training.epochs, training.weight_decay) == (100, 5e-4)
    with pytest.raises(ConfigError, match="expected a number"):
        load_experiment(None, plugins, ["training.lr=fast"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_experiment(None, plugins, ["training.epochs=2.5"])


#: Cell ids, teacher row ids and teacher cache keys of a small grid (conftest's TINY, two
#: seeds) as kdbench computed them before ``Training`` gained its convergence settings and the
#: nested distillers, provenance and controls came: a store written then must resume as it is.
#: At their defaults, settings added later take no part in any id. (Ids change, on purpose,
#: with kdbench's version or a plugin's, which every id hashes.)
STORED_IDS = ["c9c07d386450058e", "dfb53dba6df7d313", "9ba58d69c2c7334b", "c76aa998c18578cd",
              "36642be74420ed47", "ad6cda53d610d47e"]
STORED_TEACHER_IDS = ["6ff114d1887976ff", "8ca63db6ced77354"]
STORED_TEACHER_KEYS = ["277b689114eeb111", "543e819756e62763"]


def test_cell_ids_of_stores_written_before_later_settings_are_unchanged(plugins):
    cells = parse_experiment(yaml.safe_load(TINY.replace("seeds: [0]", "seeds: [0, 1]")), plugins).cells()
    assert [c.cell_id(plugins) for c in cells] == STORED_IDS
    assert sorted({c.teacher_job(plugins).cell_id for c in cells}) == STORED_TEACHER_IDS
    assert sorted({c.teacher_job(plugins).teacher_key for c in cells}) == STORED_TEACHER_KEYS


def test_convergence_settings_are_validated_and_hashed_only_when_set(plugins):
    from kdbench.report.protocol import fingerprint, protocol
    from kdbench.store import Record

    with pytest.raises(ConfigError, match="converge_tolerance must be >= 0"):
        load_experiment(None, plugins, ["training.converge_tolerance=-0.1"])
    with pytest.raises(ConfigError, match="expected a boolean|expected true or false|bool"):
        load_experiment(None, plugins, ["training.require_converged=maybe"])
    strict = load_experiment(None, plugins, ["training.require_converged=true", "training.converge_tolerance=0"])
    cells, plain = strict.cells(), load_experiment(None, plugins).cells()
    training = cells[0].config(plugins)["stages"][0]["training"]
    assert training["require_converged"] is True and training["converge_tolerance"] == 0
    assert not {c.cell_id(plugins) for c in cells} & {c.cell_id(plugins) for c in plain}  # judged otherwise
    # The teacher's weights do not depend on how its training is judged: one cached teacher...
    assert ({c.teacher_job(plugins).teacher_key for c in cells}
            == {c.teacher_job(plugins).teacher_key for c in plain})
    # ...whose own row, judged otherwise, is another row.
    assert not ({c.teacher_job(plugins).cell_id for c in cells}
                & {c.teacher_job(plugins).cell_id for c in plain})

    # Judging is no part of the budget rows are compared under: one protocol, one table.
    def fp(cell):
        return fingerprint(protocol(Record("x", "e", "student", "t", "a", "b", "r", 0, "done", {},
                                           cell.config(plugins), [], {}, "", "")))
    assert fp(cells[0]) == fp(plain[0])


def test_a_recipe_may_declare_its_main_figure_in_the_mapping_form(plugins, tiny_yaml):
    text = TINY.replace("kd: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]",
                        "kd: {stages: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}], "
                        "report: teacher_agreement}")
    plain, mapped = load_experiment(tiny_yaml(), plugins), load_experiment(tiny_yaml(text), plugins)
    assert mapped.reports == {"kd": "teacher_agreement"} and plain.reports == {}
    assert mapped.recipes["kd"] == plain.recipes["kd"]
    ids = {c.recipe: c.cell_id(plugins) for c in plain.cells()}
    new = {c.recipe: c.cell_id(plugins) for c in mapped.cells()}
    # List-form recipes keep their ids; the declaration is part of the recipe's own.
    assert new["scratch"] == ids["scratch"] and new["kd+int8"] == ids["kd+int8"] and new["kd"] != ids["kd"]
    kd = next(c for c in mapped.cells() if c.recipe == "kd")
    assert kd.config(plugins)["report"] == "teacher_agreement"
    assert "report" not in next(c for c in mapped.cells() if c.recipe == "scratch").config(plugins)
    # A mapping without a declaration is the list form.
    bare = TINY.replace("scratch: [train]", "scratch: {stages: [train]}")
    assert {c.cell_id(plugins) for c in load_experiment(tiny_yaml(bare), plugins).cells()} == set(ids.values())


@pytest.mark.parametrize("recipe, message, where", [
    ("{stages: [train], reprot: probe_accuracy}", "unknown recipe key 'reprot'; did you mean 'report'", "recipes.scratch.reprot"),
    ("{report: teacher_agreement}", "needs 'stages'", "recipes.scratch"),
    ("{stages: [train], report: [probe_accuracy]}", "names one figure", "recipes.scratch.report"),
    ("{stages: [train], report: probe_acuracy}", "did you mean 'probe_accuracy'", "recipes.scratch.report"),
    ("{stages: [train], report: probe_accuracy}", "only with measure: {probe: true}", "recipes.scratch.report"),
    ("{stages: [prune: magnitude], report: teacher_agreement}", "must start with", "recipes.scratch.stages[0]"),
])
def test_a_bad_recipe_mapping_names_the_problem_and_the_fix(plugins, tiny_yaml, recipe, message, where):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_experiment(tiny_yaml(TINY.replace("scratch: [train]", f"scratch: {recipe}")), plugins)
    assert f"{where}:" in str(err.value)


def test_the_embedding_only_recipe_of_the_minilm_experiment_is_read_by_its_probe(plugins):
    experiment = load_experiment("bbc-news-minilm", plugins)
    assert experiment.reports == {"embed-cosine": "probe_accuracy"}
    assert experiment.measure.probe
