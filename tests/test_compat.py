"""What a task gives and a model family takes: declared by both, checked when the experiment is
parsed (before anything is written), shown by ``kdbench list``; and N:M pruning that leaves
the layers that cannot take its pattern dense and says so in the stored record."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest
from torch import nn

from kdbench import compat, hookimpl
from kdbench.cli import main
from kdbench.config import parse_experiment
from kdbench.contracts import ModelFamily, Task
from kdbench.errors import ConfigError, PluginError
from kdbench.scaffold import new_plugin
from kdbench.store import Store
from kdbench.testing import check_model, check_task

BBC_MLP = textwrap.dedent("""
    name: bbc-mlp
    tasks: [bbc-news]
    pairs:
      - teacher: {name: mlp, hidden: [32]}
        student: bow
    recipes:
      scratch: [train]
""")


def experiment(task, teacher, student="mlp"):
    return {"name": "x", "tasks": [task], "pairs": [{"teacher": teacher, "student": student}],
            "recipes": {"scratch": ["train"]}}


# ---------------------------------------------------------------- parse time
def test_mlp_on_token_ids_is_refused_by_kdbench_run_before_anything_is_written(tmp_path, capsys):
    path = tmp_path / "bbc-mlp.yaml"
    path.write_text(BBC_MLP)
    store = tmp_path / "results.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: pairs[0].teacher: model 'mlp' takes feature vectors, 1-D signals or images, " \
           "but task 'bbc-news' gives token ids" in err
    assert "families that fit task 'bbc-news': bow, minilm, text-transformer" in err
    assert not store.exists()


def test_a_family_that_predicts_per_position_is_refused_on_a_classification_task(plugins):
    with pytest.raises(ConfigError) as info:
        parse_experiment(experiment("bbc-news", "bow", {"name": "gpt", "context": 256}), plugins)
    assert info.value.where == "pairs[0].student"
    assert ("model 'gpt' predicts a label per position, but task 'bbc-news' has one label per "
            "example") in info.value.message
    with pytest.raises(ConfigError, match="families that fit task 'shakespeare-char': gpt, hf, "
                                          "llama, smollm2") as info:
        parse_experiment(experiment("shakespeare-char", "gpt", "text-transformer"), plugins)
    assert info.value.where == "pairs[0].student"


def test_image_only_families_are_refused_on_flat_features(plugins):
    with pytest.raises(ConfigError, match="model 'resnet' takes images, but task 'digits' gives "
                                          "feature vectors .*families that fit task 'digits': cnn, mlp"):
        parse_experiment(experiment("digits", "resnet"), plugins)


@pytest.mark.parametrize("task, teacher, student", [
    ("digits", "mlp", "cnn"), ("mnist5k", "cnn", "mlp"), ("mnist1d", "cnn", "mlp"),
    ("cifar100", "resnet", "mobilenetv2"), ("bbc-news", "text-transformer", "bow"),
    ("shakespeare-char", "gpt", "gpt"),
])
def test_compatible_experiments_parse(plugins, task, teacher, student):
    exp = parse_experiment(experiment(task, teacher, student), plugins)
    assert [p.student.name for p in exp.pairs] == [student]


def test_a_family_or_task_that_declares_nothing_is_not_checked(plugins):
    class Anything(ModelFamily):  # written before the declarations existed
        name = "anything"
        description = "declares no inputs"

        def build(self, data):
            return nn.Linear(1, 1)

    class Mystery(Task):
        name = "mystery"
        description = "declares no inputs"

    class Carrier:
        @hookimpl
        def kdbench_register_models(self, register):
            register(Anything)

        @hookimpl
        def kdbench_register_tasks(self, register):
            register(Mystery)

    with plugins.temporary(Carrier(), "undeclared"):
        assert parse_experiment(experiment("bbc-news", "anything", "bow"), plugins).pairs
        assert parse_experiment(experiment("mystery", "mlp", "gpt"), plugins).pairs
        # Undeclared families are never offered as fitting.
        with pytest.raises(ConfigError) as info:
            parse_experiment(experiment("bbc-news", "mlp"), plugins)
        assert "anything" not in info.value.message


def test_a_misspelt_declaration_is_a_plugin_error(plugins):
    class Typo(ModelFamily):
        name = "typo"
        description = "says token"
        inputs = ("token",)

    class Carrier:
        @hookimpl
        def kdbench_register_models(self, register):
            register(Typo)

    with plugins.temporary(Carrier(), "typo-plugin"):
        with pytest.raises(PluginError, match="model 'typo' \\(plugin 'typo-plugin'\\): inputs names "
                                              "'token'; did you mean 'tokens'"):
            parse_experiment(experiment("bbc-news", "typo", "bow"), plugins)
        # A broken declaration is never offered as a fit either.
        with pytest.raises(ConfigError) as info:
            parse_experiment(experiment("bbc-news", "mlp"), plugins)
        assert "typo" not in info.value.message


def test_every_builtin_task_and_family_declares_valid_names(plugins):
    for kind in ("task", "model"):
        for name, entry in plugins.entries[kind].items():
            if entry.cls.__module__.startswith("kdbench_plugins."):
                assert compat.declares(kind, entry.cls), f"{kind} {name} declares nothing"
                assert compat.declaration_problems(kind, entry.cls) == [], name


# ---------------------------------------------------------------- kdbench list
def test_list_shows_what_tasks_give_and_families_take(capsys):
    assert main(["list", "task"]) == 0
    out = capsys.readouterr().out
    assert "  bbc-news  (" in out and "      gives token ids; one label per example" in out
    assert "      gives 1-D signals; one label per example" in out  # mnist1d
    assert main(["list", "model"]) == 0
    out = capsys.readouterr().out
    assert "      takes feature vectors, 1-D signals or images; predicts one label per example" in out
    assert "      takes token ids; predicts a label per position" in out
    assert main(["list", "model", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["resnet"]["inputs"] == ["images"] and entries["gpt"]["targets"] == ["positions"]


# ---------------------------------------------------------------- nm in a real run
def test_nm_on_a_cnn_run_records_the_layer_it_left_dense(tmp_path):
    path = tmp_path / "nm.yaml"
    path.write_text(textwrap.dedent("""
        name: nm-cnn
        seeds: [0]
        tasks: [digits]
        pairs:
          - teacher: {name: cnn, channels: [8, 16], hidden: 16}
            student: {name: cnn, channels: [8, 16], hidden: 16}
        recipes:
          nm: [train, {prune: {name: nm, n: 2, m: 4}}]
        training: {epochs: 1, batch_size: 128}
        measure: {latency_repeats: 1, latency_warmup: 0, latency_batch_sizes: [1]}
    """))
    store = tmp_path / "results.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    with Store(store) as db:
        [record] = [r for r in db.records() if r.role == "student"]
    assert record.ok, record.error
    prune_stage = next(s for s in record.stages if s["op"] == "prune")
    report = prune_stage["report"]
    # digits' 64 features are seen as an 8x8 image: the first conv has 1 * 3 * 3 weights per output.
    assert report["skipped_layers"] == {"block1.0": "9 weights per output, not a multiple of 4"}
    assert report["layers"] == ["block2.0", "fc", "head"]
    assert report["weight_sparsity"] == pytest.approx(0.5)
    assert 0.4 < report["overall_sparsity"] < 0.5


# ---------------------------------------------------------------- new plugins
@pytest.mark.parametrize("kind, inputs, targets", [
    ("task", "features", "labels"), ("model", ("features", "signals", "images"), ("labels",))])
def test_generated_tasks_and_models_declare_what_they_give_and_take(tmp_path, monkeypatch, kind,
                                                                    inputs, targets):
    root = new_plugin(f"gen-{kind}", kind, tmp_path)
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(f"kdbench_gen_{kind}")
    cls = next(v for v in vars(module).values() if getattr(v, "name", "") == f"gen-{kind}")
    assert (cls.inputs, cls.targets) == (inputs, targets)
    if kind == "task":
        assert check_task(cls)["inputs"] == "features"  # true of the data it loads
    else:
        assert set(check_model(cls)["declared"]) == set(inputs)  # served, every one
