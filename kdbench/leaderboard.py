"""Leaderboard tables from the results store: one row per (task, pair, recipe), mean +- std
over seeds of every measured figure, the teacher's own row first."""

from __future__ import annotations

import json

import math
from collections.abc import Sequence

import pandas as pd

from .store import Record

GROUP = ["experiment", "task", "teacher", "student", "recipe"]
#: Figures shown in the Markdown table, in order, with how to print them.
#: ``pct``: fractions shown as percentages; ``int``: counts; ``kib``: bytes in KiB.
FIGURES: list[tuple[str, str, str]] = [
    ("teacher_agreement", "agree %", "pct"),
    ("params", "params", "int"),
    ("nonzero_params", "non-zero", "int"),
    ("size_bytes", "file KiB", "kib"),
    ("weight_bytes", "weights KiB", "kib"),
    ("flops", "FLOPs", "int"),
    ("latency_b1_ms", "b1 ms", "ms"),
    ("latency_b256_ms", "b256 ms", "ms"),
    ("speedup_b256", "× teacher b256", "x"),
    ("train_seconds", "train s", "s"),
]


def latest_configs(records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """Per leaderboard row (experiment, task, pair, recipe), the records of the configuration
    that finished last, and a note for each row whose older results were left out.

    A store keeps every cell it ever ran; after an experiment file changes (a longer budget,
    another temperature) the same row name has results of two configurations, and averaging
    them would report a number that no configuration produced.
    """
    def variant(r: Record) -> str:
        # The seed, and the teacher's cache key that hashes it, differ within one configuration.
        per_seed = {"seed", "teacher_key"}
        return json.dumps({k: v for k, v in r.config.items() if k not in per_seed}, sort_keys=True, default=str)

    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(tuple(getattr(r, k) for k in GROUP + ["role"]), []).append(r)
    kept, notes = [], []
    for key, members in groups.items():
        newest = max(members, key=lambda r: r.finished_at)
        current = [r for r in members if variant(r) == variant(newest)]
        kept += current
        if len(current) < len(members):
            notes.append(f"{key[0]} | {key[1]} | {key[2]} -> {key[3]} | {key[4]}: left out "
                         f"{len(members) - len(current)} result(s) of an earlier configuration")
    order = {id(r): i for i, r in enumerate(records)}
    return sorted(kept, key=lambda r: order[id(r)]), notes


def frame(records: Sequence[Record]) -> pd.DataFrame:
    """One row per finished cell: its labels and every figure the harness measured."""
    rows = [{**{k: getattr(r, k) for k in GROUP + ["seed", "role", "cell_id"]}, **r.metrics}
            for r in records if r.ok]
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n over seeds per (task, pair, recipe); numeric figures only."""
    if df.empty:
        return df
    figures = [c for c in df.columns if c not in GROUP + ["seed", "role", "cell_id"]
               and pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool]
    order = {key: i for i, key in enumerate(df[GROUP].apply(tuple, axis=1).drop_duplicates())}
    grouped = df.groupby(GROUP, sort=False)
    out = grouped[figures].agg(["mean", "std"])
    out.columns = [f"{fig}_{stat}" for fig, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out["is_teacher"] = grouped["role"].first() == "teacher"
    if "materialized" in df:
        out["materialized"] = grouped["materialized"].apply(lambda s: bool(s.fillna(True).all()))
    out = out.reset_index()
    # Teacher rows first within each (task, teacher); then recipes in the experiment's order.
    out["_order"] = [order[tuple(r)] for r in out[GROUP].itertuples(index=False)]
    out = out.sort_values(["experiment", "task", "teacher", "is_teacher", "_order"],
                          ascending=[True, True, True, False, True], kind="stable")
    return out.drop(columns="_order").reset_index(drop=True)


def _fmt(mean: float, std: float, style: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    std = 0.0 if std is None or (isinstance(std, float) and math.isnan(std)) else std
    if style == "pct":
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    if style == "kib":
        return f"{mean / 1024:.1f}" + (f" ± {std / 1024:.1f}" if std else "")
    if style == "int":
        return f"{mean:,.0f}" + (f" ± {std:,.0f}" if std else "")
    if style == "ms":
        return f"{mean:.3f} ± {std:.3f}"
    if style == "s":
        return f"{mean:.1f} ± {std:.1f}"
    if style == "x":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def metric_columns(summary: pd.DataFrame) -> list[str]:
    """The task metrics (``test_*``) present, e.g. ``test_accuracy``."""
    return sorted({c[:-5] for c in summary.columns if c.startswith("test_") and c.endswith("_mean")})


def to_markdown(summary: pd.DataFrame, records: Sequence[Record] = ()) -> str:
    if summary.empty:
        return "No finished cells in the store yet.\n"
    tasks_metrics = metric_columns(summary)
    show_experiment = summary["experiment"].nunique() > 1
    header = (["experiment"] if show_experiment else []) + ["task", "teacher", "student", "recipe", "n"]
    header += [m.removeprefix("test_") + (" %" if _is_fraction(m) else "") for m in tasks_metrics]
    figures = [f for f in FIGURES if f"{f[0]}_mean" in summary]
    header += [label for _, label, _ in figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in summary.to_dict("records"):
        recipe = row["recipe"] + ("" if row.get("materialized", True) else " †")
        recipe += " ‡" if row.get("sparse_tensors_mean", 0) > 0 else ""
        cells = ([row["experiment"]] if show_experiment else []) + [
            row["task"], row["teacher"], row["student"], f"**{recipe}**" if row["is_teacher"] else recipe,
            str(row["n"])]
        cells += [_fmt(row.get(f"{m}_mean"), row.get(f"{m}_std"), "pct" if _is_fraction(m) else "num")
                  for m in tasks_metrics]
        cells += [_fmt(row[f"{key}_mean"], row[f"{key}_std"], style) for key, _, style in figures]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Mean ± standard deviation over n seeds; test split; latency is the median of "
             "interleaved repeats on the CPU, batch 1 and 256; × teacher b256 is the median "
             "ratio of teacher to model time, the two timed back to back; FLOPs (a multiply-add is 2) from "
             "torch.utils.flop_counter, plus int8 kernels counted from their layer shapes."]
    if not summary.get("materialized", pd.Series([True])).all():
        notes.append("† simulated compression (masks, fake quantization): dense kernels still run "
                     "the full computation, so it is not faster.")
    if (summary.get("sparse_tensors_mean", pd.Series([0])) > 0).any():
        notes.append("‡ the file stores its sparse weight matrices in CSR form (int32 indices), "
                     "where that is smaller than dense.")
    env = next((r.environment for r in records if r.ok), None)
    if env:
        # A store filled over several runs can mix revisions: name them all.
        revisions = list(dict.fromkeys(r.environment.get("git_revision") or "n/a" for r in records if r.ok))
        notes.append(f"Measured with kdbench {env.get('kdbench')}, torch {env.get('torch')}, "
                     f"Python {env.get('python')} on {env.get('cpu')} ({env.get('threads')} threads, "
                     f"quantized engine {env.get('quantized_engine')}), git {', '.join(revisions)}.")
    return "\n".join(lines + notes) + "\n"


def _is_fraction(metric: str) -> bool:
    return metric.endswith("accuracy") or metric.endswith("agreement")


def to_csv(summary: pd.DataFrame) -> str:
    return summary.to_csv(index=False)
