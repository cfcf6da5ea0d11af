"""Published reference numbers: the shipped data, the label mapping and the comparison table."""

from __future__ import annotations

import importlib.resources
import math

import pandas as pd
import pytest

from kdbench.config import load_experiment, parse_ref
from kdbench.report.published import COMPARISON, architecture, compare, published, to_table

REPD = "RepDistiller README"
MD = "mdistiller README"


def number(teacher: str, student: str, method: str, source: str) -> float:
    table = published("cifar100")
    hit = table[(table.teacher_arch == teacher) & (table.student_arch == student)
                & (table.method == method) & (table.source == source)]
    assert len(hit) == 1, (teacher, student, method, source)
    return float(hit.top1.iloc[0])


def test_data_ships_in_the_package_folder():
    folder = importlib.resources.files("kdbench.report").joinpath("published")
    assert folder.joinpath("cifar100.csv").is_file()
    assert set(published()["dataset"]) == {"cifar100", "mnist1d"}


def test_data_is_well_formed():
    table = published("cifar100")
    assert len(table) > 200
    assert not table.duplicated(["teacher_arch", "student_arch", "method", "source"]).any()
    assert table.top1.between(0, 100).all() and table.top1.gt(0).all()
    assert (table.source != "").all() and table.url.str.startswith("https://").all()
    assert published("imagenet").empty


@pytest.mark.parametrize("teacher, student, method, source, top1", [
    ("resnet56", "resnet20", "kd", REPD, 70.66),
    ("resnet32x4", "resnet8x4", "crd", REPD, 75.51),
    ("wrn_40_2", "wrn_40_1", "fitnet", REPD, 72.24),
    ("vgg13", "vgg8", "scratch", REPD, 70.36),
    ("resnet110", "-", "teacher", REPD, 74.31),
    ("wrn_40_2", "ShuffleV1", "nst", REPD, 74.89),
    ("resnet110", "resnet32", "crd+kd", "CRD paper", 73.75),
    ("resnet32x4", "resnet8x4", "dkd", MD, 76.32),
    ("wrn_40_2", "wrn_16_2", "dkd", MD, 76.23),
])
def test_spot_checks_of_transcribed_numbers(teacher, student, method, source, top1):
    assert number(teacher, student, method, source) == top1


def test_fsp_placeholder_is_left_out():
    # The README prints 0.00 where FSP does not apply; that is not an accuracy.
    table = published("cifar100")
    assert table[(table.student_arch == "wrn_40_1") & (table.method == "fsp")].empty


def test_every_cifar100_crd_label_maps_to_a_published_architecture(plugins):
    experiment = load_experiment("cifar100-crd", plugins)
    known = set(published("cifar100").teacher_arch) | set(published("cifar100").student_arch)
    expected = {"resnet56": "resnet56", "resnet20": "resnet20", "resnet110": "resnet110",
                "resnet32": "resnet32", "resnet32x4": "resnet32x4", "resnet8x4": "resnet8x4",
                "wrn-40-2": "wrn_40_2", "wrn-16-2": "wrn_16_2", "wrn-40-1": "wrn_40_1",
                "vgg13": "vgg13", "vgg8": "vgg8"}
    labels = {c.labels()[role] for c in experiment.cells() for role in ("teacher", "student")}
    assert labels == set(expected)
    for label in labels:
        assert architecture(label) == expected[label]
        assert expected[label] in known


@pytest.mark.parametrize("spec, expected", [
    ({"name": "mobilenetv2"}, "MobileNetV2"),
    ({"name": "shufflenetv1"}, "ShuffleV1"),
    ({"name": "shufflenetv2"}, "ShuffleV2"),
    ({"name": "mobilenetv2", "width": 1.0}, None),
    ({"name": "wrn", "depth": 40, "widen": 2, "dropout": 0.3}, None),
    ({"name": "mlp"}, None),
])
def test_cross_architecture_and_non_reference_labels(plugins, spec, expected):
    assert architecture(parse_ref(plugins, "model", spec, "x").label()) == expected


def summary(rows: list[dict]) -> pd.DataFrame:
    base = {"experiment": "e", "task": "cifar100", "is_teacher": False, "materialized": True,
            "metric": "accuracy", "higher_is_better": True, "fingerprint": "f"}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_compare_matches_pairs_recipes_and_teachers():
    frame = summary([
        {"teacher": "resnet56", "student": "resnet20", "recipe": "kd", "n": 3,
         "test_accuracy_mean": 0.7024, "test_accuracy_ci95": 0.0030},
        {"teacher": "resnet56", "student": "resnet20", "recipe": "my-new-method", "n": 3,
         "test_accuracy_mean": 0.71, "test_accuracy_ci95": 0.01},
        {"teacher": "resnet56", "student": "-", "recipe": "teacher", "is_teacher": True, "n": 1,
         "test_accuracy_mean": 0.7300, "test_accuracy_ci95": math.nan},
        {"teacher": "resnet56", "student": "resnet20", "recipe": "kd", "n": 3, "task": "digits",
         "test_accuracy_mean": 0.70, "test_accuracy_ci95": 0.01},
    ])
    out = compare(frame)
    assert list(out.columns) == COMPARISON
    kd = out[out.recipe == "kd"].set_index("source")
    # RepDistiller and mdistiller both list KD for this pair (the same number).
    assert set(kd.index) == {REPD, MD}
    assert kd.loc[REPD, "published"] == 70.66
    assert kd.loc[REPD, "reproduced"] == pytest.approx(70.24)
    assert kd.loc[REPD, "reproduced_ci95"] == pytest.approx(0.30)
    assert kd.loc[REPD, "difference"] == pytest.approx(-0.42)
    assert kd.loc[REPD, "within_ci"] is False  # 70.66 is outside 70.24 ± 0.30
    teacher = out[out.recipe == "teacher"].iloc[0]
    assert teacher.published == 72.34 and teacher.difference == pytest.approx(0.66)
    assert teacher.within_ci is None  # one seed: no interval
    assert len(out) == 3  # the new recipe and the digits task have no published number


def test_within_ci_true_and_task_mapping():
    frame = summary([{"task": "cifar100(root=/data)", "teacher": "wrn-40-2",
                      "student": "wrn-16-2", "recipe": "dkd", "n": 5,
                      "test_accuracy_mean": 0.7600, "test_accuracy_ci95": 0.0030}])
    out = compare(frame)
    assert len(out) == 1 and out.within_ci.iloc[0] is True  # 76.23 in 76.00 ± 0.30
    assert compare(frame, {"cifar100(root=/data)": "imagenet"}).empty


def test_two_seeds_give_no_interval_and_no_in_interval_verdict():
    frame = summary([{"teacher": "resnet56", "student": "resnet20", "recipe": "kd", "n": 2,
                      "test_accuracy_mean": 0.7024, "test_accuracy_ci95": 0.0500}])
    out = compare(frame)
    assert (out.within_ci.isna()).all()  # 70.66 lies in 70.24 ± 5.00, which says nothing
    assert out.reproduced_ci95.iloc[0] == pytest.approx(5.0)  # kept in the data
    row = to_table(out).rows[0]
    assert row[7:9] == ["–", "2"] and row[10] == "–"


def test_compare_with_nothing_matching_is_empty_with_columns():
    frame = summary([{"teacher": "mlp", "student": "mlp(hidden=[16])", "recipe": "kd", "n": 3,
                      "test_accuracy_mean": 0.9, "test_accuracy_ci95": 0.01}])
    out = compare(frame)
    assert out.empty and list(out.columns) == COMPARISON
    table = to_table(out)
    assert table.rows == [] and "No published number" in table.notes[0]


def test_table_formats_cells_and_names_sources():
    frame = summary([{"teacher": "resnet56", "student": "resnet20", "recipe": "kd", "n": 3,
                      "test_accuracy_mean": 0.7024, "test_accuracy_ci95": 0.0030}])
    table = to_table(compare(frame))
    rows = {row[4]: row for row in table.rows}
    row = rows[REPD]
    assert row[5:] == ["70.66", "70.24", "0.30", "3", "\u22120.42", "no"]
    assert table.numbers[0][:5] == [None] * 5 and len(table.numbers[0]) == len(table.columns)
    text = " ".join(table.notes)
    assert "https://github.com/HobbitLong/RepDistiller" in text
    assert "https://github.com/megvii-research/mdistiller" in text
    assert "validation split" in text and "best test" in text
