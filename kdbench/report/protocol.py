"""Protocol fingerprints: what must be equal for two rows' numbers to be comparable.

A leaderboard that ranks a 20-epoch student beside a 60-epoch one, or a latency taken on
one CPU beside one taken on another, publishes an ordering no experiment produced. Each row
gets a short hash of its protocol; rows are ranked, compared and plotted together only when
the hashes match.

The machine's load while a row was timed is recorded with its figures but is no part of the
protocol: it is a condition of one measurement, not a choice of the experiment, so rows timed
at different loads stay in one table, and the load is shown beside the protocol instead.

Where the weights of a pretrained model come from (its checkpoint and its own quantization) is
named in the protocol line but not fingerprinted: it follows from the model's spec, which the
rows' labels already keep apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import digest
from ..store import Record

#: The parts of a protocol, in the order a report explains a difference.
PARTS = ("task", "task_version", "budget", "calibration_size", "eval_batch_size", "latency")
#: Parts shown in the protocol line but left out of the fingerprint.
DISCLOSED = ("provenance",)


def protocol(record: Record, plugins=None) -> dict[str, Any]:
    """The protocol of a student row, from its stored config and environment.

    ``budget`` is the base student training of the experiment (recorded since the report
    came in); rows stored earlier fall back to the training of their first train or distill
    stage, which equals it unless that stage overrides it.
    """
    config, env = record.config, record.environment
    measure = config.get("measure", {})
    task_plugin = config.get("task_plugin")
    name = config.get("task", {}).get("name")
    if task_plugin is None and plugins is not None and name in plugins.entries.get("task", {}):
        task_plugin = plugins.get("task", name).plugin  # rows stored before it was recorded
    budget = config.get("budget")
    if budget is None:
        budget = next((s["training"] for s in config.get("stages", [])
                       if s.get("op") in ("train", "distill") and "training" in s), None)
    precision = env.get("precision", "fp32")
    return {
        # Mixed-precision training is another protocol; fp32 rows keep their fingerprint.
        **({"training_precision": precision} if precision != "fp32" else {}),
        "task": config.get("task"),
        "task_version": config.get("plugins", {}).get(task_plugin) if task_plugin else None,
        "budget": budget,
        "calibration_size": measure.get("calibration_size"),
        "eval_batch_size": measure.get("eval_batch_size"),
        "latency": {"cpu": env.get("cpu"), "threads": env.get("threads"),
                    "batch_sizes": measure.get("latency_batch_sizes"),
                    "repeats": measure.get("latency_repeats")},
        **({"provenance": weights} if (weights := provenance(record, plugins)) else {}),
    }


def provenance(record: Record, plugins=None) -> dict[str, str]:
    """Where the row's pretrained models come from, by model label (``smollm2: SmolLM2-135M-
    Instruct ..., dequantized to fp32``): as stored with the row, else (rows stored before
    kdbench recorded it) as the installed model family states it."""
    stored = record.config.get("provenance")
    if stored is None and plugins is not None:
        stored = _stated_provenance(record, plugins)
    labels = {"teacher": record.teacher, "student": record.student}
    return {str(labels[role]): text for role, text in (stored or {}).items() if role in labels and text}


def _stated_provenance(record: Record, plugins) -> dict[str, str]:
    from ..config import model_provenance, parse_ref
    from ..errors import KdbenchError

    config, out = record.config, {}
    for role in ("teacher", "student"):
        spec = config.get("teacher" if role == "student" and _starts_from_teacher(config) else role)
        try:
            text = model_provenance(plugins, parse_ref(plugins, "model", spec, role)) if spec else ""
        except KdbenchError:  # a family no longer installed, or whose parameters changed
            text = ""
        if text:
            out[role] = text
    return out


def _starts_from_teacher(config: dict[str, Any]) -> bool:
    stages = config.get("stages") or [{}]
    return stages[0].get("op") == "init"


def fingerprint(proto: dict[str, Any]) -> str:
    return digest({k: v for k, v in proto.items() if k not in DISCLOSED})[:8]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable parts where two protocols differ, e.g. ``budget.epochs: 20 vs 60``."""
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else str(key))
        elif x != y:
            out.append(f"{path}: {x} vs {y}")

    for part in PARTS:
        walk(a.get(part), b.get(part), part)
    return out


def describe(proto: dict[str, Any]) -> str:
    """One line a reader can check: the split, budget, calibration, evaluation and timing."""
    task = proto.get("task") or {}
    splits = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name")
    budget = proto.get("budget") or {}
    lat = proto.get("latency") or {}
    budget_text = (f"{budget.get('epochs')} epochs, {budget.get('optimizer')} lr {budget.get('lr')}, "
                   f"batch {budget.get('batch_size')}") if budget else "no student training"
    weights = proto.get("provenance") or {}
    return (f"task {task.get('name')} v{proto.get('task_version') or '?'} ({splits}); "
            f"budget {budget_text}; calibration {proto.get('calibration_size')}; "
            f"evaluation batch {proto.get('eval_batch_size')}; latency on {lat.get('cpu')}, "
            f"{lat.get('threads')} threads, batches {lat.get('batch_sizes')}"
            + "".join(f"; pretrained {label}: {text}" for label, text in sorted(weights.items())))


def describe_load(max_load: float | None, cores: Sequence[float]) -> str:
    """``load during timing: max 3.1 on 2 cores``, from the highest load average any row was
    timed at and the core counts of the rows; empty when no row recorded a load (rows stored
    before kdbench recorded it)."""
    counts = sorted({int(c) for c in cores if c == c})  # NaN: rows without the figure
    if max_load is None or max_load != max_load or not counts:
        return ""
    on = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"load during timing: max {max_load:.1f} on {on} cores"
