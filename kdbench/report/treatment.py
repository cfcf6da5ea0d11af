"""Same treatment: compressors compared in one table skip the same layers and get the same
fine-tuning after compression, or the table says which rows differ and how.

Each student row that compresses is described, from its stored stage configs and run log, by
what it compressed (the stages before the first compressor: the teacher for ``init:
teacher``, a distilled student ...), the layers its compressors left alone (a compressor
report's ``skipped_layers`` where it gives one, else the ``skip`` parameter) and the training
after compression (training stages, and the epochs a compressor fine-tuned inside itself, as
``gradual`` and ``qat`` do). Rows compressed from the same model whose descriptions differ are
named in a note under the table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pandas as pd

from ..config import COMPRESSOR_KIND, TRAINING_OPS, digest
from ..store import Record

#: Summary column holding each row's treatment (JSON), read by ``treatment_note``.
COLUMN = "treatment"


def treatment(record: Record) -> dict[str, Any] | None:
    """What a compressed row's compressors skipped and what training followed compression;
    None for a row that compresses nothing (or a teacher row)."""
    specs = record.config.get("stages") or []
    log = record.stages or []
    first = next((i for i, s in enumerate(specs) if s.get("op") in COMPRESSOR_KIND), None)
    if record.role != "student" or first is None:
        return None
    skipped: set[str] = set()
    training: list[str] = []
    for i, spec in enumerate(specs[first:], start=first):
        op = spec.get("op")
        entry = log[i] if i < len(log) and isinstance(log[i], dict) else {}
        if op in COMPRESSOR_KIND:
            ref = spec.get(COMPRESSOR_KIND[op]) or {}
            report = entry.get("report") if isinstance(entry.get("report"), dict) else {}
            layers = report.get("skipped_layers")
            skipped |= set(map(str, layers if isinstance(layers, (dict, list)) else ref.get("skip") or []))
            inside = len(entry.get("history") or []) or report.get("finetune_epochs") or 0
            if inside:
                training.append(f"{_epochs(inside)} inside {ref.get('name')}{_with(ref.get('distill'))}")
        elif op in TRAINING_OPS:
            settings = spec.get("training") or {}
            training.append(f"{op} {_epochs(settings.get('epochs'))}, lr {settings.get('lr')}"
                            f"{_with(spec.get('distiller'))}")
    return {"from": _source(specs[:first]), "from_key": digest(specs[:first]),
            "skipped": sorted(skipped), "training": training}


def _epochs(n: Any) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _with(distiller: Any) -> str:
    name = distiller.get("name") if isinstance(distiller, dict) else distiller
    return f" with {name}" if name else ""


def _source(stages: list[dict]) -> str:
    """``init: teacher`` or ``distill: hinton``: the stages that made the compressed model."""
    parts = []
    for spec in stages:
        op = spec.get("op")
        ref = next((spec[k] for k in ("distiller", "pruner", "quantizer", "decomposer") if isinstance(spec.get(k), dict)), None)
        detail = spec.get("source") or (ref or {}).get("name")
        parts.append(f"{op}: {detail}" if detail else str(op))
    return ", ".join(parts) or "nothing"


def treatment_note(rows: pd.DataFrame) -> str | None:
    """One sentence per group of rows compressed from the same model (same teacher, student
    and stages before compression) whose skipped layers or post-compression training differ;
    None when every such group treats its rows alike."""
    if COLUMN not in rows:
        return None
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for row in rows.to_dict("records"):
        text = row.get(COLUMN)
        if not isinstance(text, str):
            continue
        told = json.loads(text)
        groups.setdefault((row["teacher"], row["student"], told["from_key"]), []).append((row["recipe"], told))
    sentences = []
    several_pairs = len({key[:2] for key in groups}) > 1
    for (teacher, student, _), members in groups.items():
        if len(members) < 2:
            continue
        parts = []
        layers = _split(members, lambda t: ", ".join(t["skipped"]) or "none")
        if len(layers) > 1:
            parts.append("layers left uncompressed — " + _listing(layers))
        training = _split(members, lambda t: "; then ".join(t["training"]) or "none")
        if len(training) > 1:
            parts.append("training after compression — " + _listing(training))
        if parts:
            pair = f"{teacher} → {student}, " if several_pairs else ""
            sentences.append(f"Rows compressed from the same model ({pair}{members[0][1]['from']}) are not "
                             "treated alike: " + "; ".join(parts) + ".")
    if not sentences:
        return None
    return " ".join(sentences) + " Their differences in quality mix the methods with these differences."


def _split(members: Iterable[tuple[str, dict]], key) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for recipe, told in members:
        out.setdefault(key(told), []).append(recipe)
    return out


def _listing(split: dict[str, list[str]]) -> str:
    return " | ".join(f"{value}: {', '.join(recipes)}" for value, recipes in split.items())
