"""What each leaderboard row is, and what it is compared with.

Every row carries its resolved stages (``distill:hinton(temperature=6) > prune:magnitude(sparsity=0.5)
> finetune(3)``) and the id of its configuration: a store that ran one recipe name under two
configurations (an experiment file edited between runs) has two rows, each labelled with
what differs (``kd-t8 [temperature=6]``), never one average of both.

Each row's reference is chosen by construction (see ``kdbench/recipes.py``): a compound recipe
is compared with its parent, or with its equal-budget control when its added stages train; a
compound whose extra training has no control is not compared (its Δ says why); the control is
compared with the parent; a recipe that starts from the teacher, with the teacher's row; any
other with ``scratch``, else ``dense``, else the teacher's row. ``--reference`` overrides.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..config import digest
from ..recipes import INIT_TEACHER_SPEC, TEACHER, plain, spec_training, stages_text, training_epochs, value_text
from ..store import Record

#: Default references of recipes without a parent, in order; then the teacher's row.
DEFAULT_REFERENCES = ("scratch", "dense")
#: Parts of a cell's config that differ between the seeds of one configuration, or that were
#: recorded only from some version on (``provenance``) and so do not make another one.
PER_SEED = ("seed", "teacher_key", "provenance")
#: What two rows share when they ran together (one kdbench, one budget, one teacher).
CONTEXT = ("kdbench", "experiment", "task", "teacher", "measure", "budget", "teacher_cache")
#: Columns the summary needs while it is built and drops after.
INTERNAL = ["_stages_spec", "_training_spec", "_context", "_variant", "_ref", "_teacher", "teacher_key",
            "finished_at"]
#: Row facts that are the same for every seed of a row.
FIRST = ["stages", "derived", "_stages_spec", "_training_spec", "_context", "_variant"]
#: A variant label longer than this, or naming more differences, falls back to the config id.
MAX_TAG, MAX_DIFFERENCES = 40, 3


def variant_config(record: Record) -> dict[str, Any]:
    """A cell's config without what differs from seed to seed: equal for all the seeds of one
    configuration of a recipe."""
    return {k: v for k, v in record.config.items() if k not in PER_SEED}


def config_id(record: Record, teachers: dict[str, Any] | None = None) -> str:
    return digest(_variant(record, teachers))[:8]


def teacher_trainings(records: Sequence[Record]) -> dict[str, Any]:
    """The training of each stored teacher, by the key its students record (``teacher_key``)."""
    return {digest(r.config): r.config.get("training") for r in records if r.role == "teacher"}


def _variant(record: Record, teachers: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`variant_config`, with the training of the student's teacher where the store holds
    it: a student's config names its teacher only by a per-seed key, and students of a teacher
    trained longer are another configuration."""
    out = variant_config(record)
    key = record.config.get("teacher_key")
    if record.role == "student" and teachers and key in teachers:
        out["teacher_training"] = teachers[key]
    return out


def budget_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The base student training of a cell (rows stored before it was recorded: that of their
    first train or distill stage)."""
    budget = config.get("budget")
    if budget is None:
        budget = next((s.get("training") for s in config.get("stages", [])
                       if s.get("op") in ("train", "distill") and s.get("training")), None)
    return plain(budget) if budget is not None else None


def record_facts(record: Record, plugins=None, teachers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The columns ``frame`` adds to a record's row: its configuration id and resolved stages,
    whether it is a derived control, and what finding its parent and control needs.
    ``teachers``: :func:`teacher_trainings` of the records."""
    config = record.config
    if record.role == "teacher":
        specs: list[dict] = [INIT_TEACHER_SPEC]
        text = stages_text([{"op": "train", "training": config.get("training") or {}}], None, plugins)
        training: list = [[]]
        teacher_key = digest(config)
    else:
        specs = plain(config.get("stages") or [])
        budget = budget_of(config)
        text = stages_text(specs, budget, plugins)
        logs = record.stages or []
        training = [spec_training(spec, budget, plugins, bool(i < len(logs) and logs[i].get("history")))
                    for i, spec in enumerate(specs)]
        teacher_key = config.get("teacher_key")
    variant = _variant(record, teachers)
    return {"config_id": digest(variant)[:8], "stages": text, "derived": bool(config.get("control_for")),
            "finished_at": record.finished_at, "teacher_key": teacher_key,
            "_stages_spec": json.dumps(specs, sort_keys=True), "_training_spec": json.dumps(training, sort_keys=True),
            "_context": digest({k: config.get(k) for k in CONTEXT}),
            "_variant": json.dumps(variant, sort_keys=True, default=str)}


def aggregate(grouped) -> pd.DataFrame:
    """Per row (a groupby of the frame): the facts of :func:`record_facts`."""
    out = grouped[FIRST].first()
    out["finished_at"] = grouped["finished_at"].max()
    out["teacher_key"] = grouped["teacher_key"].agg(lambda s: tuple(sorted({str(v) for v in s.dropna()})))
    return out


# ------------------------------------------------------------------ labels
def labels(out: pd.DataFrame) -> pd.Series:
    """Each row's label: its recipe, plus what differs where one table holds the recipe under
    several configurations (``kd-t8 [temperature=6]``, or ``kd-t8 (config a1b2c3)`` when the
    difference does not fit a short label)."""
    label = out["recipe"].astype(str).copy()
    if "config_id" not in out:
        return label
    keys = ["experiment", "task", "teacher", "student", "recipe", "fingerprint"]
    for _, g in out.groupby(keys, sort=False, dropna=False):
        if g["config_id"].nunique() < 2:
            continue
        tags = variant_tags([json.loads(v) for v in g["_variant"]], list(g["config_id"]))
        for i, tag in zip(g.index, tags, strict=True):
            label[i] = f"{g.at[i, 'recipe']} {tag}"
    return label


def _flatten(value: Any, path: tuple = ()) -> dict[tuple, Any]:
    if isinstance(value, dict):
        out: dict[tuple, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, (*path, str(k))))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, (*path, str(i))))
        return out
    return {path: value}


_MISSING = object()


def variant_tags(configs: Sequence[dict], ids: Sequence[str]) -> list[str]:
    """``[temperature=6]`` / ``[temperature=8]``: per configuration, the settings in which the
    configurations differ, each named by the shortest unique end of its path; a setting that
    appears in several places with the same values (every stage's epochs) is named once."""
    flats = [_flatten(c) for c in configs]
    paths = sorted(set().union(*flats))
    found: dict[tuple, tuple] = {}  # (last name, values) -> the first path with them
    for path in paths:
        values = tuple(value_text(f[path]) if path in f else "-" for f in flats)
        if len(set(values)) > 1:
            found.setdefault((path[-1], values), path)
    names = _unique_suffixes(list(found.values()))
    parts: list[list[str]] = [[] for _ in configs]
    for (_, values), path in found.items():
        for i, value in enumerate(values):
            parts[i].append(f"{names[path]}={value}")
    tags = ["[" + ", ".join(p) + "]" for p in parts]
    if (not found or len(found) > MAX_DIFFERENCES or any(len(t) > MAX_TAG for t in tags)
            or len(set(tags)) < len(tags)):
        return [f"(config {i[:6]})" for i in ids]
    return tags


def _unique_suffixes(paths: list[tuple]) -> dict[tuple, str]:
    """A stage's parameter by its name (``temperature``), anything else with its parent
    (``teacher_training.epochs``), longer where that is not unique."""
    out = {}
    for path in paths:
        for n in range(1 if path[0] == "stages" else min(2, len(path)), len(path) + 1):
            if sum(p[-n:] == path[-n:] for p in paths) == 1 or n == len(path):
                out[path] = ".".join(path[-n:])
                break
    return out


# ------------------------------------------------------------------ references
def choose(out: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """Per row of the summary: the row it is compared with (``_ref``, an index of ``out``) and
    why, its parent and control, the epochs it trains beyond its parent, and whether that extra
    training lacks a control (then no comparison is made); ``_teacher``: its teacher's row."""
    recs = out.to_dict("index")
    specs = {i: json.loads(r["_stages_spec"]) for i, r in recs.items()}
    training = {i: json.loads(r["_training_spec"]) for i, r in recs.items()}
    groups: dict[tuple, list] = defaultdict(list)
    for i, r in recs.items():
        groups[_where(r)].append(i)

    def best(candidates: list, row: dict) -> Any:
        """Of rows alike (one recipe's configurations), the one run with ``row``: same
        context, then most shared teachers, then the latest."""
        if not candidates:
            return None
        return max(candidates, key=lambda j: (recs[j]["_context"] == row["_context"],
                                              len(set(recs[j]["teacher_key"]) & set(row["teacher_key"])),
                                              str(recs[j]["finished_at"])))

    results = {}
    for i, row in recs.items():
        same = groups[_where(row)]
        teacher = best([j for j in same if recs[j]["is_teacher"]], row)
        result = {"_ref": None, "_teacher": teacher, "reference_why": None, "parent": None, "control": None,
                  "extra_epochs": math.nan, "uncontrolled": False}
        results[i] = result
        if row["is_teacher"]:
            result["_teacher"] = i
            continue
        peers = [j for j in same if not recs[j]["is_teacher"] and recs[j]["student"] == row["student"]]
        relation = _relation(i, recs, specs, training, peers, teacher, best)
        result.update({k: v for k, v in relation.items() if k != "_ref"})
        if reference is not None:
            chosen = teacher if reference == TEACHER else best([j for j in peers if recs[j]["recipe"] == reference], row)
            result.update(_ref=chosen, reference_why="chosen with --reference", uncontrolled=False)
        else:
            result["_ref"] = relation["_ref"]
        if result["_ref"] is None and result["reference_why"] and not result["uncontrolled"]:
            result["reference_why"] = None
    frame = pd.DataFrame.from_dict(results, orient="index").reindex(out.index)
    label = out["label"] if "label" in out else out["recipe"]
    frame["reference"] = [None if pd.isna(j) else out.at[int(j), "recipe"] for j in frame["_ref"]]
    frame["reference_label"] = [None if pd.isna(j) else label[int(j)] for j in frame["_ref"]]
    for column in ("parent", "control"):
        frame[column] = [None if j is None or pd.isna(j) else label[int(j)] for j in frame[column]]
    return frame


def _where(row: dict) -> tuple:
    return row["experiment"], row["task"], row["teacher"], str(row["fingerprint"])


def _relation(i, recs: dict, specs: dict, training: dict, peers: list, teacher, best) -> dict[str, Any]:
    """The reference that the relations of row ``i`` give (see the module docstring)."""
    row, stages = recs[i], specs[i]
    prefixes = [j for j in peers if j != i and 0 < len(specs[j]) < len(stages) and stages[:len(specs[j])] == specs[j]]
    starts_from_teacher = bool(stages) and stages[0] == INIT_TEACHER_SPEC
    if prefixes:
        size = max(len(specs[j]) for j in prefixes)
        parent, parent_size, why = best([j for j in prefixes if len(specs[j]) == size], row), size, "parent"
    elif starts_from_teacher and len(stages) > 1:
        parent, parent_size, why = teacher, 1, "parent (the teacher it starts from)"
    elif starts_from_teacher:
        return {"_ref": teacher, "reference_why": "the teacher (its own weights)"}
    else:
        for name in DEFAULT_REFERENCES:
            hit = best([j for j in peers if recs[j]["recipe"] == name], row)
            if hit is not None:
                return {"_ref": hit, "reference_why": f"default ({name})"}
        return {"_ref": teacher, "reference_why": "default (the teacher: no scratch or dense row)"}

    added = training[i][parent_size:]
    base = {"_ref": parent, "parent": parent, "reference_why": why}
    if any(t is None for t in added):
        return {**base, "uncontrolled": True,
                "reference_why": "not compared: trains beyond its parent by an amount its plugin does not declare"}
    extra = [s for t in added for s in t]
    epochs = training_epochs(extra)
    base["extra_epochs"] = epochs
    if not extra:
        return base
    control = stages[:parent_size] + extra
    if control == stages:
        return base  # it only trains more: it is a control itself
    found = best([j for j in peers if specs[j] == control], row)
    if found is None:
        return {**base, "uncontrolled": True,
                "reference_why": f"not compared: {epochs} more epochs than its parent and no equal-budget "
                                 "control (add 'controls: auto' to the experiment)"}
    return {**base, "_ref": found, "control": found, "reference_why": f"equal-budget control (+{epochs} ep)"}

