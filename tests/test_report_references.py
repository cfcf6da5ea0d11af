"""Each leaderboard row is compared with the right reference and says what it is: compound
recipes against their parent or their equal-budget control, extra training never hidden, the
resolved stages of every row, and two configurations under one recipe name as two labelled rows.

The records are those a run stores (real cells' configs and stage logs) with made-up figures,
so every difference below is known exactly."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import yaml

from kdbench.cli import main
from kdbench.config import load_experiment, parse_experiment
from kdbench.report import render, stats
from kdbench.report.document import Table
from kdbench.report.folder import findings
from kdbench.report.summary import frame, summarize
from kdbench.report.tables import leaderboard_blocks
from kdbench.report.terminal import terminal_view
from kdbench.runner import cell_labels
from kdbench.store import Record, Store

from conftest import TINY

SEEDS = (0, 1, 2)
#: Test accuracy per recipe and seed: each recipe's own offsets, so that the paired
#: differences (and their p-values) differ from one comparison to another.
ACCURACY = {
    "teacher": [0.97, 0.975, 0.98],
    "scratch": [0.90, 0.91, 0.92],
    "kd": [0.88, 0.895, 0.90],
    "kd+prune": [0.89, 0.90, 0.915],
    "kd+int8": [0.87, 0.89, 0.895],
    "kd+svd": [0.86, 0.875, 0.89],
    "teacher+prune": [0.95, 0.96, 0.958],
    "kd+ft3": [0.92, 0.93, 0.937],
    "teacher+ft3:hinton": [0.975, 0.977, 0.985],
}


def stored(experiment, plugins, accuracy=ACCURACY, finished: str = "2026-01-01T00:00:00") -> list[Record]:
    """The records a run of ``experiment`` stores, with the given test accuracies."""
    env = {"cpu": "Test CPU", "threads": 1}
    out, teachers = [], {}
    for cell in experiment.cells():
        job = cell.teacher_job(plugins)
        teachers[job.cell_id] = Record(
            job.cell_id, experiment.name, "teacher", status="done", config=job.config(),
            metrics={"test_accuracy": accuracy["teacher"][cell.seed], "size_bytes": 8000.0, "materialized": True},
            stages=[], environment=env, started_at=finished, finished_at=finished, **job.labels())
        log = []
        for stage in cell.stages:
            epochs = stage.resolve_training(cell.student_training(plugins)).epochs if stage.op in (
                "train", "distill", "finetune") else 0
            log.append({"op": stage.op, "history": [{"epoch": e + 1} for e in range(epochs)]})
        out.append(Record(cell.cell_id(plugins), experiment.name, "student", status="done",
                          config=cell.config(plugins), stages=log, environment=env,
                          metrics={"test_accuracy": accuracy[cell.recipe][cell.seed], "size_bytes": 1000.0,
                                   "materialized": True},
                          started_at=finished, finished_at=finished, **cell_labels(cell)))
    return list(teachers.values()) + out


def row(summary, label):
    hit = summary[summary["label"] == label]
    assert len(hit) == 1, (label, list(summary["label"]))
    return hit.iloc[0]


@pytest.fixture
def quickstart(plugins):
    return summarize(frame(stored(load_experiment("smoke", plugins), plugins), plugins))


def test_compound_recipes_are_compared_with_their_parent_or_their_control(quickstart):
    s = quickstart
    expect = {"scratch": "scratch", "kd": "scratch", "kd+int8": "kd", "kd+ft3": "kd", "kd+prune": "kd+ft3",
              "kd+svd": "kd+ft3", "teacher+ft3:hinton": "teacher", "teacher+prune": "teacher+ft3:hinton"}
    assert {label: row(s, label).reference_label for label in expect} == expect
    # kd+int8 measures the cost of int8 (against kd), not KD's shortfall against scratch.
    assert row(s, "kd+int8").delta_mean == pytest.approx(sum(a - b for a, b in zip(
        ACCURACY["kd+int8"], ACCURACY["kd"], strict=True)) / 3)
    assert row(s, "kd+prune").delta_mean == pytest.approx(sum(a - b for a, b in zip(
        ACCURACY["kd+prune"], ACCURACY["kd+ft3"], strict=True)) / 3)
    assert row(s, "kd+prune").parent == "kd" and row(s, "kd+prune").control == "kd+ft3"
    assert row(s, "kd+prune").extra_epochs == 3 and row(s, "kd+ft3").extra_epochs == 3
    assert row(s, "teacher+prune").parent == "teacher"
    assert row(s, "kd+ft3").derived and not row(s, "kd+prune").derived
    # The report's findings name each row's own reference.
    text = " ".join(p.text for p in findings(s)[2:])
    assert "better than its reference: `kd+ft3` vs `kd` (+3.73 points)" in text
    assert "`kd+prune` vs `kd+ft3` (-2.73 points)" in text


def test_holm_families_follow_the_references(quickstart):
    s = quickstart
    for reference, members in (("kd", ["kd+int8", "kd+ft3"]), ("kd+ft3", ["kd+prune", "kd+svd"]),
                               ("scratch", ["kd"])):
        p = [row(s, m).p_value for m in members]
        assert [row(s, m).p_holm for m in members] == pytest.approx(stats.holm(p)), reference


def test_extra_training_without_a_control_is_not_compared(plugins):
    exp = load_experiment("smoke", plugins, ["controls=none"])
    s = summarize(frame(stored(exp, plugins), plugins))
    prune = row(s, "kd+prune")
    assert prune.uncontrolled and prune.reference_label == "kd" and prune.extra_epochs == 3
    assert math.isnan(prune.delta_mean) and prune.significant is None
    assert row(s, "teacher+prune").uncontrolled and row(s, "teacher+prune").reference_label == "teacher"
    assert not row(s, "kd+int8").uncontrolled and row(s, "kd+int8").significant is not None
    table = next(b for b in leaderboard_blocks(s) if isinstance(b, Table))
    cells = next(r for r in table.rows if r[1].startswith("kd+prune"))
    assert "untested +3 ep" in cells and any("untested +N ep" in n for n in table.notes)
    assert "untested +3 ep" in terminal_view(s)
    text = " ".join(p.text for p in findings(s)[2:])
    assert "not compared, for training more than their parent" in text and "`kd+prune`" in text


def test_the_command_line_reference_still_overrides(plugins):
    s = summarize(frame(stored(load_experiment("smoke", plugins), plugins), plugins), reference="scratch")
    students = s[~s.is_teacher & (s.student == "mlp(hidden=[32])")]
    assert set(students.reference_label) == {"scratch"}
    assert row(s, "kd+int8").delta_mean == pytest.approx(sum(a - b for a, b in zip(
        ACCURACY["kd+int8"], ACCURACY["scratch"], strict=True)) / 3)


def test_every_table_shows_each_rows_reference_and_resolved_stages(quickstart):
    blocks = leaderboard_blocks(quickstart)
    board, recipes = [b for b in blocks if isinstance(b, Table)]
    assert "reference" in board.columns and "Δ vs reference [95% CI]" in board.columns
    at = board.columns.index("reference")
    refs = {r[1].split()[0]: r[at] for r in board.rows}
    assert refs["kd+int8"] == "kd" and refs["kd+prune"] == "kd+ft3" and refs["kd+ft3"] == "kd"
    assert next(r for r in board.rows if r[1].startswith("kd+ft3"))[1].endswith("§")  # derived
    assert any(n.startswith("§ equal-budget control derived by kdbench") for n in board.notes)
    # The footnote: each row's resolved stages, what it is compared with and why.
    assert recipes.columns == ["recipe", "resolved stages", "compared with", "why"]
    listed = {r[0]: r for r in recipes.rows}
    assert listed["kd+prune"][1:] == ["distill:hinton(temperature=4) > prune:magnitude(sparsity=0.5) > finetune(3)",
                                      "kd+ft3", "equal-budget control (+3 ep)"]
    assert listed["kd+int8"][1:] == ["distill:hinton(temperature=4) > quantize:dynamic-int8", "kd", "parent"]
    assert listed["kd+ft3 §"][1] == "distill:hinton(temperature=4) > finetune(3)"
    assert listed["teacher+prune"][1] == ("init:teacher > prune:magnitude(sparsity=0.9) > "
                                          "finetune(3, distill:hinton(temperature=4))")
    assert listed["kd"][2:] == ["scratch", "default (scratch)"]
    md = render.to_markdown(blocks)
    assert "**Recipes of the table above: resolved stages and references**" in md


def test_the_terminal_view_groups_rows_by_reference_and_lists_their_stages(quickstart):
    lines = terminal_view(quickstart).splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    headings = [line for line in lines if line.startswith("mlp(")]
    assert headings == ["mlp(hidden=[32]) (Δ vs scratch)", "mlp(hidden=[32]) (Δ vs kd)",
                        "mlp(hidden=[32]) (Δ vs kd+ft3)", "mlp(hidden=[512,512]) (Δ vs teacher)",
                        "mlp(hidden=[512,512]) (Δ vs teacher+ft3:hinton)"]
    under = lines.index("mlp(hidden=[32]) (Δ vs kd+ft3)")
    assert lines[under + 1].split()[0] == "kd+prune" and lines[under + 2].split()[0] == "kd+svd"
    assert "  kd+prune: distill:hinton(temperature=4) > prune:magnitude(sparsity=0.5) > finetune(3)" in lines
    assert any(line.startswith("§ equal-budget control derived by kdbench") for line in lines)


T8 = {"kd-t8": [{"distill": {"name": "hinton", "temperature": 8}}],
      "kd-t8+int8": [{"distill": {"name": "hinton", "temperature": 8}}, {"quantize": "dynamic-int8"}],
      "scratch": ["train"]}


def t8_store(plugins, tiny_raw) -> list[Record]:
    """``kd-t8`` run at temperature 8, then (the file edited) at temperature 6."""
    old = parse_experiment({**tiny_raw, "recipes": T8, "seeds": list(SEEDS)}, plugins)
    edited = dict(T8, **{"kd-t8": [{"distill": {"name": "hinton", "temperature": 6}}]})
    new = parse_experiment({**tiny_raw, "recipes": edited, "seeds": list(SEEDS)}, plugins)
    accuracy = {"teacher": [0.97] * 3, "scratch": [0.9, 0.91, 0.92], "kd-t8": [0.8, 0.81, 0.83],
                "kd-t8+int8": [0.79, 0.8, 0.815]}
    later = {**accuracy, "kd-t8": [0.93, 0.94, 0.95]}
    first = stored(old, plugins, accuracy, "2026-01-01T00:00:00")
    second = [r for r in stored(new, plugins, later, "2026-02-01T00:00:00") if r.recipe == "kd-t8"]
    return first + second


@pytest.fixture
def tiny_raw():
    return yaml.safe_load(TINY)


def test_two_configurations_under_one_name_are_two_labelled_rows(plugins, tiny_raw):
    s = summarize(frame(t8_store(plugins, tiny_raw), plugins))
    t6, t8 = row(s, "kd-t8 [temperature=6]"), row(s, "kd-t8 [temperature=8]")
    assert t6.test_accuracy_mean == pytest.approx(0.94) and t8.test_accuracy_mean == pytest.approx(0.8133, abs=1e-4)
    assert t6.n == t8.n == 3 and t6.stages == "distill:hinton(temperature=6)"
    # The compound's parent is the configuration its stages begin with.
    assert row(s, "kd-t8+int8").reference_label == "kd-t8 [temperature=8]"
    table, recipes = [b for b in leaderboard_blocks(s) if isinstance(b, Table)]
    assert {"kd-t8 [temperature=6]", "kd-t8 [temperature=8]"} <= {r[0].rstrip(" ◆") for r in table.rows}
    assert ["kd-t8 [temperature=8]", "distill:hinton(temperature=8)", "scratch", "default (scratch)"] in recipes.rows
    text = terminal_view(s)
    assert "kd-t8 [temperature=6]" in text and "kd-t8 [temperature=8]" in text


def test_latest_only_keeps_the_newest_configuration_and_says_so(plugins, tiny_raw, tmp_path, capsys):
    db = tmp_path / "t8.db"
    with Store(db) as store:
        for r in t8_store(plugins, tiny_raw):
            store.put(r)
    assert main(["leaderboard", "--store", str(db), "--format", "csv"]) == 0
    both = capsys.readouterr()
    labels = list(pd.read_csv(io.StringIO(both.out))["label"])
    assert {"kd-t8 [temperature=6]", "kd-t8 [temperature=8]"} <= set(labels) and not both.err
    assert main(["leaderboard", "--store", str(db), "--format", "csv", "--latest-only"]) == 0
    latest = capsys.readouterr()
    table = pd.read_csv(io.StringIO(latest.out)).set_index("label")
    assert list(table.index).count("kd-t8") == 1 and table.loc["kd-t8", "stages"] == "distill:hinton(temperature=6)"
    assert "left out 3 result(s) of an earlier configuration" in latest.err


def test_students_of_a_teacher_trained_differently_are_another_configuration(plugins, tiny_raw):
    records = []
    for epochs, finished, accuracy in ((3, "2026-01-01T00:00:00", 0.8), (5, "2026-02-01T00:00:00", 0.9)):
        raw = {**tiny_raw, "seeds": list(SEEDS), "recipes": {"kd": [{"distill": "hinton"}]}}
        raw["pairs"] = [{**tiny_raw["pairs"][0], "teacher_training": {"epochs": epochs}}]
        exp = parse_experiment(raw, plugins)
        records += stored(exp, plugins, {"teacher": [0.97] * 3, "kd": [accuracy] * 3}, finished)
    s = summarize(frame(records, plugins))
    assert row(s, "kd [teacher_training.epochs=3]").test_accuracy_mean == pytest.approx(0.8)
    assert row(s, "kd [teacher_training.epochs=5]").test_accuracy_mean == pytest.approx(0.9)
    assert set(s.loc[s.is_teacher, "label"]) == {"teacher [training.epochs=3]", "teacher [training.epochs=5]"}
    # Each is compared with (and relative to) its own teacher.
    assert row(s, "kd [teacher_training.epochs=5]").reference_label == "teacher [training.epochs=5]"


def test_the_method_figure_names_each_rows_reference(quickstart, tmp_path):
    from kdbench.report import figures

    pair = quickstart[quickstart.is_teacher | (quickstart.student == "mlp(hidden=[32])")]
    dots = dict(figures.method_bars(pair, tmp_path / "bars", "digits"))
    assert "kd+int8 vs kd" in dots and "kd vs scratch" in dots
    assert "kd+prune vs kd+ft3" in dots and dots["scratch"] == figures.REFERENCE
