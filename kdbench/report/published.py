"""Published reference results, shipped as data, and tables of published against reproduced.

The numbers live in ``kdbench/report/published/<dataset>.csv`` (columns ``dataset``,
``teacher_arch``, ``student_arch``, ``method``, ``top1``, ``source``, ``url``, ``note``), one row
per (pair, method, source), transcribed from:

- the CIFAR-100 tables of the RepDistiller README (github.com/HobbitLong/RepDistiller), the code
  of Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020: teacher,
  student alone (method ``scratch``) and 13 distillation methods for 7 same-architecture and 6
  cross-architecture pairs. The author states these are last-epoch accuracies (RepDistiller
  issue #16), although the code also saves the checkpoint of best test accuracy. The README's
  FSP entry for wrn_40_2 -> wrn_40_1 reads 0.00 (FSP does not apply to that pair): left out.
- the CRD+KD lines of the CRD paper's Tables 1 and 2, which the README lacks, as copied into
  the READMEs of alldbi/SuperMix and giakoumoglou/distillers (each row's ``note`` says which);
- the CIFAR-100 tables of the mdistiller README (github.com/megvii-research/mdistiller), the
  code of Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022: KD (the CRD paper's
  numbers again) and DKD, best test epoch averaged over 5 runs (mdistiller issues #30 and #42),
  plus the README's KD+DOT lines. Its column "ResNet32x4 -> MobileNet-V2" is left out: mdistiller
  has no such configuration (only res32x4_shuv2), and its KD number is the CRD paper's
  resnet32x4 -> ShuffleV2 one, so the label looks wrong and the pair is uncertain.

- the MNIST-1D baselines of Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D",
  ICML 2024 (arXiv:2011.14439): the README table of github.com/greydanus/mnist1d (logistic
  regression, MLP, CNN, GRU and a human expert, whole percent) and the test accuracies its
  notebook ``notebooks/mnist1d-classification.ipynb`` prints after the last of 6,000 steps
  (one run, seed 42). Each model was trained alone: ``teacher_arch`` is "-", ``method``
  ``scratch``, and the model is named as the reference code's class (``LinearBase``,
  ``MLPBase``, ``ConvBase``, ``GRUBase``). Such a row matches a kdbench row of that model
  trained alone, whichever teacher its pair names, and a teacher row of that model. Only a
  task that generates the paper's data maps to ``mnist1d`` (``num_samples`` and
  ``data_seed`` at their defaults); ``kdbench/experiments/mnist1d-paper.yaml`` is the
  paper's protocol.

CIFAR architectures are named as the reference code's model registry names them (``resnet56``,
``wrn_40_2``, ``vgg13``, ``ShuffleV1``, ``ShuffleV2``, ``ResNet50``; ``MobileNetV2`` is
RepDistiller's ``mobile_half``); teacher rows have ``student_arch`` "-" and method ``teacher``.
"""

from __future__ import annotations

import importlib.resources
import math
import re

import pandas as pd

from kdbench.report.document import Table
from kdbench.report.tables import interval_shown

COLUMNS = ["dataset", "teacher_arch", "student_arch", "method", "top1", "source", "url", "note"]
COMPARISON = ["task", "teacher", "student", "recipe", "source", "url", "published", "reproduced",
              "reproduced_ci95", "n", "difference", "within_ci"]

#: What each source's numbers are, for the note under a comparison table.
SOURCE_NOTES = {
    "RepDistiller README": "last-epoch test accuracy (the author, RepDistiller issue #16)",
    "CRD paper": "the CRD+KD lines of Tables 1 and 2, taken from copies in other repositories' "
                 "READMEs (the data's note column names them)",
    "mdistiller README": "DKD: best test accuracy over epochs, mean of 5 runs (mdistiller "
                         "issues #30, #42), optimistic by the bias of choosing the epoch on the "
                         "test set; its KD numbers are the CRD paper's; KD+DOT's selection is not "
                         "stated",
    "mnist1d README": "the MNIST-1D paper's baselines (Greydanus & Kobak, ICML 2024), whole "
                      "percent; last or best step and number of runs not stated",
    "mnist1d reference notebook": "test accuracy after the last of 6,000 Adam steps (lr 0.01, "
                                  "batch 100), one run with seed 42",
}
#: Sources whose numbers are MNIST-1D's (their own note under a comparison table).
MNIST1D_SOURCES = ("mnist1d README", "mnist1d reference notebook")

_RESNETS = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
            "resnet8x4", "resnet32x4"}
_VGGS = {"vgg8", "vgg11", "vgg13", "vgg16", "vgg19"}
#: kdbench's defaults for these families are the CRD tables' students (see their docstrings);
#: any changed parameter shows in the label and so maps to nothing.
_DEFAULT_LABELS = {"mobilenetv2": "MobileNetV2", "shufflenetv1": "ShuffleV1",
                   "shufflenetv2": "ShuffleV2"}
#: The MNIST-1D paper's models as kdbench labels them (the parameters of
#: ``kdbench/experiments/mnist1d-paper.yaml``; tests/test_mnist1d_paper.py keeps them in step).
_MNIST1D_LABELS = {
    "mlp(hidden=[])": "LinearBase",
    "mlp(hidden=[100,100],residual=True)": "MLPBase",
    "cnn(channels=[25,25,25],hidden=0,batch_norm=False,kernel_sizes=[5,3,3],stride=2,padding=1,"
    "pool=False)": "ConvBase",
    "gru": "GRUBase",
}
#: Task parameters that change the data a published number was measured on: a task label
#: that sets one maps to no published dataset.
_DATA_PARAMS = {"mnist1d": ("num_samples", "data_seed")}


def published(dataset: str | None = None) -> pd.DataFrame:
    """Every published number shipped with kdbench (one dataset's with ``dataset``)."""
    folder = importlib.resources.files("kdbench.report").joinpath("published")
    frames = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".csv"):
            with entry.open("r", encoding="utf-8") as handle:
                # keep_default_na off: "-" and empty notes are text, not missing values.
                frames.append(pd.read_csv(handle, dtype=str, keep_default_na=False))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    table = table[COLUMNS].astype({"top1": float})
    if dataset is not None:
        table = table[table["dataset"] == dataset].reset_index(drop=True)
    return table


def architecture(label: str) -> str | None:
    """The published architecture name of a kdbench model label (``wrn-40-2`` -> ``wrn_40_2``),
    or None when the reference code has no such model."""
    label = label.strip()
    if label in _RESNETS or label in _VGGS:
        return label
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", label)  # with dropout the label has "(dropout=...)"
    if wrn:
        return f"wrn_{wrn[1]}_{wrn[2]}"
    return _DEFAULT_LABELS.get(label) or _MNIST1D_LABELS.get(label)


def _dataset(task: str, mapping: dict[str, str] | None, known: set[str]) -> str | None:
    if mapping and task in mapping:
        return mapping[task]
    # "cifar100(root=/data)" is still CIFAR-100: the label lists non-default parameters.
    base, _, params = task.partition("(")
    if any(re.search(rf"(^|,){name}=", params) for name in _DATA_PARAMS.get(base, ())):
        return None  # other data than the published number's
    return base if base in known else None


def _is_teacher(row: pd.Series) -> bool:
    flag = row.get("is_teacher")
    return bool(flag) if flag is not None and not pd.isna(flag) else row["recipe"] == "teacher"


def _keys(row: pd.Series) -> list[tuple[str | None, str | None, str]]:
    """The published (teacher, student, method) keys a summary row answers: its pair's, and,
    for a model trained alone (a teacher, or a student from scratch), the teacherless key of
    that model ("-", model, method)."""
    teacher = architecture(str(row["teacher"]))
    if _is_teacher(row):
        return [(teacher, "-", "teacher"), ("-", teacher, "scratch")]
    student, method = architecture(str(row["student"])), str(row["recipe"]).lower()
    return [(teacher, student, method), ("-", student, method)]


def _number(value) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def compare(summary: pd.DataFrame, dataset_of_task: dict[str, str] | None = None) -> pd.DataFrame:
    """Published against reproduced: one row per (summary row, source) with a published number.

    ``dataset_of_task`` maps task labels to published datasets; by default a task maps to the
    dataset of its name (``cifar100``). Accuracies are in percent, ``difference`` is reproduced
    minus published in points, and ``within_ci`` says whether the published number lies in
    the reproduction's 95% interval (None with fewer seeds than an interval needs, see
    ``tables.MIN_INTERVAL_SEEDS``).
    """
    table = published()
    rows = []
    if "test_accuracy_mean" not in summary.columns:
        return pd.DataFrame(columns=COMPARISON)
    for _, row in summary.iterrows():
        dataset = _dataset(str(row["task"]), dataset_of_task, set(table["dataset"]))
        if dataset is None or row.get("metric", "accuracy") != "accuracy":
            continue
        keys = [key for key in _keys(row) if None not in key]
        match = table[(table["dataset"] == dataset) & pd.Series(
            [key in keys for key in zip(table["teacher_arch"], table["student_arch"], table["method"])],
            index=table.index, dtype=bool)]
        reproduced = 100 * _number(row["test_accuracy_mean"])
        ci = 100 * _number(row.get("test_accuracy_ci95"))
        n = int(row["n"])
        for _, ref in match.iterrows():
            within = None if not interval_shown(n) or math.isnan(ci) else bool(abs(reproduced - ref["top1"]) <= ci)
            rows.append([row["task"], row["teacher"], row["student"], row["recipe"], ref["source"],
                         ref["url"], ref["top1"], reproduced, ci, n, reproduced - ref["top1"],
                         within])
    frame = pd.DataFrame(rows, columns=COMPARISON)
    frame["within_ci"] = frame["within_ci"].astype(object)  # keep None apart from False
    return frame


def _fixed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def _signed(value: float) -> str:
    if math.isnan(value):
        return "–"
    text = f"{value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text.replace("-", "\u2212")


def to_table(comparison: pd.DataFrame) -> Table:
    """The comparison as a report table, with notes naming every source and what was selected."""
    columns = ["Task", "Teacher", "Student", "Recipe", "Source", "Published (%)", "kdbench (%)",
               "95% CI (±)", "n", "Difference (points)", "Published in CI"]
    rows, numbers = [], []
    for _, r in comparison.iterrows():
        within = {True: "yes", False: "no"}.get(r["within_ci"], "–")
        rows.append([str(r["task"]), str(r["teacher"]), str(r["student"]), str(r["recipe"]),
                     str(r["source"]), _fixed(r["published"]), _fixed(r["reproduced"]),
                     _fixed(r["reproduced_ci95"]) if interval_shown(r["n"]) else "–",
                     str(int(r["n"])), _signed(r["difference"]),
                     within])
        numbers.append([None] * 5 + [float(r["published"]), float(r["reproduced"]),
                                     float(r["reproduced_ci95"]), float(r["n"]),
                                     float(r["difference"]), None])
    notes = [f"{source} ({url}): {SOURCE_NOTES.get(source, 'see the source')}."
             for source, url in dict(zip(comparison["source"], comparison["url"])).items()]
    sources = set(comparison["source"])
    if not sources or sources - set(MNIST1D_SOURCES):
        notes.append("kdbench never selects on the test split: it reports the test accuracy of "
                     "the epoch chosen on a validation split held out of the training set (5,000 "
                     "images by default), so it also trains on fewer images than the reference "
                     "code, while reference code that keeps the best test epoch reports a number "
                     "optimistic by that selection. Difference = kdbench − published, in points.")
    if sources & set(MNIST1D_SOURCES):
        notes.append("MNIST-1D: the experiment mnist1d-paper follows the paper's protocol (its "
                     "header lists every difference): all 4,000 training signals, validation "
                     "signals drawn from a second generated set, 150 epochs of batch 100 (6,000 "
                     "steps), each model taken after its last epoch as in the reference code. "
                     "Difference = kdbench − published, in points.")
    if not rows:
        notes.insert(0, "No published number matches these rows.")
    return Table(columns, rows, caption="Published top-1 accuracy against kdbench's reproduction",
                 notes=notes, numbers=numbers)
