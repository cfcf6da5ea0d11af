"""From stored cells to the summary frame every table, figure and format is made of.

One row per (experiment, task, teacher, student, recipe, protocol fingerprint, configuration):
for every figure the mean, standard deviation and 95% t interval over seeds; the paired
comparison with the row's reference (its parent, its equal-budget control, scratch or the
teacher: see :mod:`kdbench.report.references`); figures relative to the teacher and to the
reference; ranks and Pareto flags computed only among rows that share a fingerprint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..store import Record
from . import references, stats
from .protocol import fingerprint, protocol
from .treatment import COLUMN as TREATMENT
from .treatment import treatment

GROUP = ["experiment", "task", "teacher", "student", "recipe"]
#: Where a pair's comparisons are made: same models, same protocol.
PAIR = ["task", "teacher", "student", "fingerprint"]
#: Default references of recipes without a parent, in order; else the teacher's own row.
DEFAULT_REFERENCES = references.DEFAULT_REFERENCES
#: Direction of figures other than the task metric (True: higher is better).
HIGHER_IS_BETTER = {"teacher_agreement": True, "teacher_kl": False, "params": False,
                    "nonzero_params": False, "size_bytes": False, "weight_bytes": False,
                    "flops": False, "train_seconds": False}
LOWER_IS_BETTER_METRICS = ("bpc", "perplexity", "loss", "error", "mse", "mae")


def latest_configs(records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """Per leaderboard row (experiment, task, pair, recipe), the records of the configuration
    that finished last, and a note for each row whose older results were left out
    (``--latest-only``).

    A store keeps every cell it ever ran; after an experiment file changes (a longer budget,
    another temperature) the same recipe name has results of two configurations. By default
    the summary shows each as its own labelled row; this keeps only the newest.
    """
    def variant(r: Record) -> str:
        return json.dumps(references.variant_config(r), sort_keys=True, default=str)

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


def task_metric(record: Record, plugins=None) -> tuple[str, bool]:
    """The task's metric and its direction: from the registered task when installed, else
    read off the row (its one ``test_*`` figure; lower is better for bpc, perplexity...)."""
    name = record.config.get("task", {}).get("name")
    if plugins is not None and name in plugins.entries.get("task", {}):
        cls = plugins.get("task", name).cls
        return cls.metric, cls.higher_is_better
    tests = [k[5:] for k in record.metrics if k.startswith("test_")]
    metric = next((m for m in tests if m in ("accuracy", "bpc", "perplexity")), tests[0] if tests else "accuracy")
    return metric, not metric.endswith(LOWER_IS_BETTER_METRICS)


def frame(records: Sequence[Record], plugins=None) -> pd.DataFrame:
    """One row per finished cell: labels, fingerprint, metric and every measured figure.

    Teacher rows take the fingerprint of their experiment's students (one copy per
    fingerprint), since a teacher is the reference point of every table its students are in.
    """
    rows = []
    teachers = references.teacher_trainings([r for r in records if r.ok])
    for r in records:
        if not r.ok:
            continue
        metric, higher = task_metric(r, plugins)
        metrics = dict(r.metrics)
        if r.stages and r.stages[-1].get("op") not in ("train", "distill", "finetune"):
            # Epoch figures describe the model before the final compression, not the one measured.
            for key in [k for k in metrics if k.startswith(("last_epoch_", "chosen_epoch"))]:
                del metrics[key]
        told = treatment(r)
        rows.append({**{k: getattr(r, k) for k in GROUP + ["seed", "role", "cell_id"]},
                     "fingerprint": fingerprint(protocol(r, plugins)) if r.role == "student" else None,
                     "protocol": json.dumps(protocol(r, plugins), sort_keys=True, default=str),
                     TREATMENT: json.dumps(told, sort_keys=True) if told else None,
                     "metric": metric, "higher_is_better": higher,
                     # The recipe's declared main figure (``report:``), where its task metric does not apply.
                     "main_figure": r.config.get("report"), **metrics,
                     **references.record_facts(r, plugins, teachers)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    students = df[df.role == "student"]
    prints = students.groupby(["experiment", "task", "teacher"])["fingerprint"].unique().to_dict()
    protocols = dict(zip(students["fingerprint"], students["protocol"], strict=False))
    teachers = []
    for _, t in df[df.role == "teacher"].iterrows():
        for fp in prints.get((t.experiment, t.task, t.teacher), [fingerprint(json.loads(t.protocol))]):
            teachers.append({**t.to_dict(), "fingerprint": fp, "protocol": protocols.get(fp, t.protocol)})
    return pd.concat([pd.DataFrame(teachers), students], ignore_index=True) if teachers else students


def figure_columns(df: pd.DataFrame) -> list[str]:
    skip = set(GROUP) | {"seed", "role", "cell_id", "fingerprint", "protocol", "metric", "higher_is_better",
                         "main_figure"}
    return [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
            and df[c].dtype != bool]


def direction(figure: str, metric: str, higher_is_better: bool) -> bool:
    """True when higher is better for ``figure`` (the task metric's direction for its
    variants, e.g. ``last_epoch_test_accuracy``)."""
    if figure.endswith(f"test_{metric}"):
        return higher_is_better
    if figure.startswith(("latency_", "speedup_")):
        return figure.startswith("speedup_")
    return HIGHER_IS_BETTER.get(figure, True)


def summarize(df: pd.DataFrame, reference: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """The summary frame (see the module docstring). ``reference`` names the recipe every row
    is compared with (default: scratch, else dense, else the teacher's row); ``metric`` the
    figure compared and ranked (default: the task's test metric)."""
    if df.empty:
        return pd.DataFrame()
    figures = figure_columns(df)
    keys = GROUP + ["fingerprint", "config_id"]  # two configurations of a recipe: two rows
    order = {key: i for i, key in enumerate(df[keys].apply(tuple, axis=1).drop_duplicates())}
    grouped = df.groupby(keys, sort=False, dropna=False)
    out = grouped[figures].agg(["mean", "std"])
    out.columns = [f"{fig}_{stat}" for fig, stat in out.columns]
    for fig in figures:
        out[f"{fig}_ci95"] = grouped[fig].agg(lambda s: stats.t_halfwidth(s.tolist()))
    out.insert(0, "n", grouped.size())
    if "latency_load" in df and "cpu_count" in df:
        # Not averaged: one seed timed on a busy machine is enough to doubt the row's speed.
        per_core = (df["latency_load"] / df["cpu_count"]).groupby([df[k] for k in keys], sort=False, dropna=False)
        out["latency_load_max"] = grouped["latency_load"].max()
        out["latency_load_per_core_max"] = per_core.max()
    first = grouped[["role", "metric", "higher_is_better", "protocol"]].first()
    out["is_teacher"] = first["role"] == "teacher"
    out["metric"] = first["metric"]
    out["higher_is_better"] = first["higher_is_better"].astype(bool)
    out["protocol"] = first["protocol"]
    if TREATMENT in df:  # what the compressors skipped and the training after them
        out[TREATMENT] = grouped[TREATMENT].first()
    out["materialized"] = (grouped["materialized"].apply(lambda s: bool(s.fillna(True).all()))
                           if "materialized" in df else True)
    out = out.join(_row_verdicts(df, grouped)).join(references.aggregate(grouped))
    seeds = {key: dict(zip(g["seed"], g.to_dict("records"), strict=True)) for key, g in grouped}
    out = out.reset_index()
    out["label"] = references.labels(out)
    out["_order"] = [order[tuple(r)] for r in out[keys].itertuples(index=False)]
    out = _compare(out, _task_metric_withheld(out, seeds, metric), reference, metric)
    out = _relative(out)
    out.loc[~out.metric_applies, "retained_pct"] = math.nan  # a share of a metric that does not apply
    out = _rank_and_front(out)
    # Teacher rows first within each (task, teacher); then recipes in the experiment's order.
    out = out.sort_values(["experiment", "task", "teacher", "fingerprint", "is_teacher", "_order"],
                          ascending=[True, True, True, True, False, True], kind="stable")
    return out.drop(columns=["_order", *references.INTERNAL], errors="ignore").reset_index(drop=True)


def compared_figure(row: dict[str, Any], metric: str | None) -> str:
    return metric or f"test_{row['metric']}"


def _row_verdicts(df: pd.DataFrame, grouped) -> pd.DataFrame:
    """Per row, from its seeds: ``still_improving`` (a seed's training had not converged, see
    kdbench/convergence.py), ``head_untrained`` (a seed's training never changed the module
    that produces the logits), ``main_figure`` (the recipe's declared one) and
    ``metric_applies`` (neither of the last two: the row is ranked and tested on the task metric)."""
    def any_zero(column: str) -> pd.Series:
        if column not in df:
            return pd.Series(False, index=grouped.size().index)
        return grouped[column].apply(lambda s: bool((s == 0).any()))

    out = pd.DataFrame({"still_improving": any_zero("converged"), "head_untrained": any_zero("head_trained")})
    out["main_figure"] = (grouped["main_figure"].first() if "main_figure" in df
                          else pd.Series(None, index=out.index, dtype=object))
    out["main_figure"] = out["main_figure"].astype(object).where(out["main_figure"].notna(), None)
    out["metric_applies"] = ~out["head_untrained"] & out["main_figure"].isna()
    return out


def _on_task_metric(figure: str, metric: str) -> bool:
    """Whether ``figure`` is the task metric or one of its variants (``last_epoch_test_...``)."""
    return figure.endswith(f"test_{metric}")


def _task_metric_withheld(out: pd.DataFrame, seeds: dict, metric: str | None) -> dict:
    """The per-seed figures the paired tests read, without the task metric of rows it does not
    apply to: they are tested on it with no one and count in no Holm family."""
    keys = GROUP + ["fingerprint", "config_id"]  # as _compare reads them
    seeds = dict(seeds)
    for _, row in out[~out.metric_applies].iterrows():
        figure = compared_figure(row, metric)
        if _on_task_metric(figure, row.metric):
            key = tuple(row[keys])
            seeds[key] = {s: {**v, figure: math.nan} for s, v in seeds[key].items()}
    return seeds


def _compare(out: pd.DataFrame, seeds: dict, reference: str | None, metric: str | None) -> pd.DataFrame:
    """The paired comparison of each row with its reference (``references.choose``); none for
    the reference itself and for extra training that has no equal-budget control."""
    keys = GROUP + ["fingerprint", "config_id"]
    chosen = references.choose(out, reference)
    results = []
    for i, row in out.iterrows():
        at = chosen.at[i, "_ref"]
        ref = None if pd.isna(at) else out.loc[int(at)]
        figure = compared_figure(row, metric)
        if (ref is None or int(at) == i or chosen.at[i, "uncontrolled"]
                or f"{figure}_mean" not in out):
            results.append({"reference": None if ref is None else ref.recipe, "compared": figure,
                            "delta_mean": math.nan, "delta_ci95": math.nan, "p_value": math.nan,
                            "significant": None, "pairs": 0})
            continue
        mine = {s: v.get(figure, math.nan) for s, v in seeds[tuple(row[keys])].items()}
        theirs = {s: v.get(figure, math.nan) for s, v in seeds[tuple(ref[keys])].items()}
        test = stats.paired({s: _num(v) for s, v in mine.items()}, {s: _num(v) for s, v in theirs.items()})
        results.append({"reference": ref.recipe, "compared": figure, "delta_mean": test.mean,
                        "delta_ci95": test.ci95, "p_value": test.p_value, "significant": None,
                        "pairs": test.n})
    cmp = pd.DataFrame(results, index=out.index)
    # Holm within each family: every row compared with the same reference row in one pair group.
    cmp["p_holm"] = math.nan
    families = out.assign(_ref=chosen["_ref"]).groupby(PAIR + ["experiment", "_ref"], dropna=True).groups
    for index in families.values():
        index = list(index)
        adjusted = stats.holm(cmp.loc[index, "p_value"].tolist())
        cmp.loc[index, "p_holm"] = adjusted
    for i in cmp.index:
        n = cmp.at[i, "pairs"]
        if n >= stats.MIN_PAIRS and not math.isnan(cmp.at[i, "p_holm"]):
            cmp.at[i, "significant"] = bool(cmp.at[i, "p_holm"] < 1 - stats.CONFIDENCE)
    return pd.concat([out, cmp, chosen.drop(columns="reference")], axis=1)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ratio(a: Any, b: Any) -> float:
    a, b = _num(a), _num(b)
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _relative(out: pd.DataFrame) -> pd.DataFrame:
    """% of the teacher's quality retained; compression ratios and speed-ups against the
    teacher and against the reference (the uncompressed student)."""
    latency = [c[:-5] for c in out.columns if c.startswith("latency_b") and c.endswith("_ms_mean")
               and "_iqr_" not in c]
    extra: dict[str, list[float]] = {k: [] for k in ["retained_pct", "bytes_ratio_teacher", "params_ratio_teacher",
                                                    "bytes_ratio_reference", "params_ratio_reference"]}
    for lat in latency:
        extra[f"speedup_reference_{lat.split('_')[1]}"] = []
    for _, row in out.iterrows():
        t = None if pd.isna(row["_teacher"]) else out.loc[int(row["_teacher"])]  # its own teacher
        q = f"test_{row.metric}_mean"
        if t is not None and q in out:
            ratio = _ratio(row[q], t[q]) if row.higher_is_better else _ratio(t[q], row[q])
            extra["retained_pct"].append(100 * ratio)
        else:
            extra["retained_pct"].append(math.nan)
        extra["bytes_ratio_teacher"].append(_ratio(t["size_bytes_mean"], row.get("size_bytes_mean"))
                                            if t is not None and "size_bytes_mean" in out else math.nan)
        extra["params_ratio_teacher"].append(_ratio(t["params_mean"], row.get("params_mean"))
                                             if t is not None and "params_mean" in out else math.nan)
        r = None if pd.isna(row["_ref"]) else out.loc[int(row["_ref"])]
        extra["bytes_ratio_reference"].append(_ratio(r["size_bytes_mean"], row.get("size_bytes_mean"))
                                              if r is not None and "size_bytes_mean" in out else math.nan)
        extra["params_ratio_reference"].append(_ratio(r["params_mean"], row.get("params_mean"))
                                               if r is not None and "params_mean" in out else math.nan)
        for lat in latency:
            # Medians of two cells timed apart: a ratio of medians, not a paired ratio.
            extra[f"speedup_reference_{lat.split('_')[1]}"].append(
                _ratio(r[f"{lat}_mean"], row[f"{lat}_mean"]) if r is not None else math.nan)
    # One concat, not a column at a time: a wide summary would be fragmented (pandas warns).
    added = pd.DataFrame(extra, index=out.index)
    return pd.concat([out.drop(columns=[c for c in added if c in out]), added], axis=1)


def _rank_and_front(out: pd.DataFrame) -> pd.DataFrame:
    """Ranks per pair and Pareto fronts per (task, protocol). Rows whose task metric does not
    apply get no rank on it and stay off both fronts (whose quality axis is the task metric). Simulated rows (masks, fake quantization) take the pooled latency of the dense
    model they simulate and are never on the latency front, nor push a row off it."""
    out = out.copy()
    out["rank"] = math.nan
    for _, g in out[~out.is_teacher].groupby(PAIR):
        figure = g.iloc[0]["compared"]
        col = f"{figure}_mean"
        if col not in g:
            continue
        higher = direction(figure, g.iloc[0]["metric"], bool(g.iloc[0]["higher_is_better"]))
        values = g[col] if not _on_task_metric(figure, g.iloc[0]["metric"]) else g[col].where(g.metric_applies)
        out.loc[g.index, "rank"] = stats.ranks(values.tolist(), higher)
    simulated = ~out["materialized"].astype(bool)
    if "latency_b1_ms_mean" in out:
        # One latency per architecture: the median over the rows that ship it. On a machine
        # whose load drifts the same network times differently from cell to cell; the pooled
        # value is the better estimate of what it costs, and is what the front is drawn at.
        out["latency_b1_ms_pooled"] = out["latency_b1_ms_mean"]
        for _, g in out.groupby(["task", "fingerprint"]):
            keys = pd.Series(architecture_keys(g), index=g.index, dtype=object)
            known = keys.dropna()
            pooled = g.loc[known.index, "latency_b1_ms_mean"].groupby(known.map(str)).transform("median")
            out.loc[pooled.index, "latency_b1_ms_pooled"] = pooled
            for i in g.index[simulated[g.index]]:
                out.loc[i, "latency_b1_ms_pooled"] = dense_latency(out.loc[g.index], i)
    for cost in ("size_bytes", "latency_b1_ms"):
        out[f"pareto_{cost}"] = False
        for _, g in out.groupby(["task", "fingerprint"]):
            q = f"test_{g.iloc[0]['metric']}_mean"
            if q in g and f"{cost}_mean" in g:
                quality = g[q].where(g.metric_applies)
                costs = g[f"{cost}_mean"]
                if cost.startswith("latency"):
                    costs = costs.where(~simulated[g.index])  # the dense model's speed: no gain to show
                out.loc[g.index, f"pareto_{cost}"] = stats.pareto_mask(
                    quality.tolist(), costs.tolist(), bool(g.iloc[0]["higher_is_better"]),
                    architecture_keys(g) if cost.startswith("latency") else None)
    return out


def dense_latency(rows: pd.DataFrame, index: Any) -> float:
    """The batch-1 latency of the dense model that the simulated row ``index`` simulates: the
    pooled latency of the materialized rows with its parameters and FLOPs, and among those
    (an int8 row counts the same) the ones with the most weight bytes, i.e. uncompressed.
    NaN when no such row was measured: a simulated row has no speed of its own to show."""
    if not {"params_mean", "flops_mean", "latency_b1_ms_pooled"} <= set(rows.columns):
        return math.nan
    row = rows.loc[index]
    params, flops = _num(row["params_mean"]), _num(row["flops_mean"])
    if math.isnan(params) or math.isnan(flops):
        return math.nan
    same = rows[rows["materialized"].astype(bool) & (rows["params_mean"].round() == round(params))
                & (rows["flops_mean"].round() == round(flops))]
    size = next((c for c in ("weight_bytes_mean", "size_bytes_mean") if c in same and same[c].notna().any()), None)
    if size is not None:
        same = same[same[size] == same[size].max()]
    return float(same["latency_b1_ms_pooled"].median()) if len(same) else math.nan


def architecture_keys(rows: pd.DataFrame) -> list[tuple | None]:
    """What a row ships, as far as speed goes: parameters, non-zeros, bytes and FLOPs. Rows
    with equal keys run the same computation; their latencies differ only by noise."""
    columns = [f"{c}_mean" for c in ("params", "nonzero_params", "size_bytes", "flops")]
    if not all(c in rows for c in columns):
        return [None] * len(rows)
    return [None if any(pd.isna(v) for v in values) else tuple(round(float(v)) for v in values)
            for values in rows[columns].itertuples(index=False)]


def aggregate_ranks(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean rank of each recipe over the (task, pair, fingerprint) groups it was ranked in,
    as MTEB aggregates across tasks. A recipe missing from some groups gets no mean rank
    (a mean over fewer, perhaps easier, groups would flatter it); ``groups`` says how many."""
    students = summary[~summary.is_teacher & summary["rank"].notna()]
    if students.empty:
        return pd.DataFrame(columns=["recipe", "mean_rank", "groups", "of", "ranks"])
    total = students.groupby(PAIR).ngroups
    rows = []
    for recipe, g in students.groupby("label" if "label" in students else "recipe", sort=False):
        ranks = g["rank"].tolist()
        rows.append({"recipe": recipe, "groups": len(ranks), "of": total,
                     "mean_rank": float(np.mean(ranks)) if len(ranks) == total else math.nan,
                     "ranks": ", ".join(f"{r:g}" for r in ranks)})
    return pd.DataFrame(rows).sort_values(["mean_rank", "recipe"], na_position="last").reset_index(drop=True)
