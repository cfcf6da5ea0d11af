"""The summary frame as tables a reader can take in: one table per (group, protocol), figures
printed with their spread, the paired comparison spelled out, notes for every mark."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd

from . import stats
from .document import Block, Paragraph, Table
from .protocol import describe, describe_load, differences
from .treatment import treatment_note

#: Figures shown after the task metric and comparison, in order: (column, label, style).
#: ``pct``: fractions as percentages; ``int``: counts; ``kib``: bytes in KiB; ``x``: ratios.
FIGURES: list[tuple[str, str, str]] = [
    ("teacher_agreement", "agree %", "pct"),
    ("params", "params", "int"),
    ("nonzero_params", "non-zero", "int"),
    ("size_bytes", "file KiB", "kib"),
    ("flops", "FLOPs", "int"),
    ("latency_b1_ms", "b1 ms", "ms"),
    ("latency_b256_ms", "b256 ms", "ms"),
    ("speedup_b1", "× teacher b1", "x"),
    ("speedup_b256", "× teacher b256", "x"),
    ("train_seconds", "train s", "s"),
]
def figure_list(rows: pd.DataFrame) -> list[tuple[str, str, str]]:
    """FIGURES, with the latency, speed-up and throughput columns of whatever batch sizes the
    protocol timed (1 and 256 by default; 1 and 8 for a language model), and the probe figures
    of embedding models."""
    batches = sorted({int(m.group(1)) for c in rows.columns
                      if (m := re.fullmatch(r"latency_b(\d+)_ms_mean", c))})
    timed = ([(f"latency_b{b}_ms", f"b{b} ms", "ms") for b in batches]
             + [(f"speedup_b{b}", f"× teacher b{b}", "x") for b in batches]
             + [(f"tokens_per_s_b{b}", f"tokens/s b{b}", "int") for b in batches])
    fixed = [f for f in FIGURES if not f[0].startswith(("latency_b", "speedup_b"))]
    at = next(i for i, f in enumerate(fixed) if f[0] == "train_seconds")
    probe = [("probe_accuracy", "probe %", "pct"), ("teacher_cosine", "cos teacher", "num"),
             ("teacher_cka", "CKA teacher", "num")]
    return probe + fixed[:at] + timed + fixed[at:]


#: Single-valued relative figures (from means), shown after the measured ones.
RELATIVE: list[tuple[str, str]] = [
    ("retained_pct", "% of teacher"),
    ("bytes_ratio_teacher", "teacher/file"),
]


#: Fewest seeds (or seed pairs) whose t interval is shown. With 2 the t distribution has one
#: degree of freedom and a 95% interval is ±12.7 standard errors: a number that looks precise
#: and says nothing. The CSV and JSON keep the computed half-widths (``*_ci95``,
#: ``delta_ci95``) beside ``n`` and ``pairs``; the tables and figures show "-" instead.
MIN_INTERVAL_SEEDS = stats.MIN_PAIRS


def interval_shown(n: Any) -> bool:
    """Whether an interval over ``n`` seeds (or seed pairs) is worth printing."""
    try:
        return int(n) >= MIN_INTERVAL_SEEDS
    except (TypeError, ValueError):
        return False


def is_fraction(metric: str) -> bool:
    return metric.endswith(("accuracy", "agreement"))


def fmt(mean: Any, std: Any, style: str) -> str:
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


def _signed(value: float, scale: float, digits: int) -> str:
    return f"{value * scale:+.{digits}f}".replace("-", "−")


def row_label(row: dict[str, Any]) -> str:
    """The row's recipe, with what tells apart two configurations of it (``kd [temperature=6]``)."""
    label = row.get("label")
    return label if isinstance(label, str) else str(row["recipe"])


def is_own_reference(row: dict[str, Any]) -> bool:
    reference = row.get("reference_label", row.get("reference"))
    return isinstance(reference, str) and reference == (row_label(row) if "reference_label" in row else row.get("recipe"))


def uncontrolled_text(row: dict[str, Any]) -> str:
    """``untested +3 ep``: the row trained more than its reference and no equal-budget control
    matches it, so no comparison is made (the protocol's rule of equal budgets)."""
    epochs = finite_or_none(row.get("extra_epochs"))
    return f"untested +{epochs:g} ep" if epochs is not None else "untested +? ep"


def delta_cell(row: dict[str, Any]) -> str:
    """``+0.87 [−0.30, +2.04] ✓``: paired mean difference, its 95% interval (from
    ``MIN_INTERVAL_SEEDS`` seed pairs on), and a mark when the Holm-adjusted p is below 0.05
    with at least ``MIN_PAIRS`` seeds."""
    if row.get("uncontrolled") is True:
        return uncontrolled_text(row)
    if row.get("reference") is None or (isinstance(row.get("delta_mean"), float) and math.isnan(row["delta_mean"])):
        return "(reference)" if is_own_reference(row) else "-"
    figure = row["compared"]
    scale, digits = (100, 2) if is_fraction(figure) else (1, 3)
    text = _signed(row["delta_mean"], scale, digits)
    if not math.isnan(row["delta_ci95"]) and interval_shown(row.get("pairs")):
        lo, hi = row["delta_mean"] - row["delta_ci95"], row["delta_mean"] + row["delta_ci95"]
        text += f" [{_signed(lo, scale, digits)}, {_signed(hi, scale, digits)}]"
    return text + mark(row)


def mark(row: dict[str, Any]) -> str:
    sig = row.get("significant")
    if sig is None or (isinstance(sig, float) and math.isnan(sig)):
        return f" (n={int(row.get('pairs') or 0)})"
    return " ✓" if sig else ""


def p_cell(row: dict[str, Any]) -> str:
    p = row.get("p_value")
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _metric_cells(row: dict[str, Any], figure: str) -> tuple[str, str]:
    style = "pct" if is_fraction(figure) else "num"
    mean, std, ci = row.get(f"{figure}_mean"), row.get(f"{figure}_std"), row.get(f"{figure}_ci95")
    if (ci is None or (isinstance(ci, float) and math.isnan(ci)) or mean is None or math.isnan(mean)
            or not interval_shown(row.get("n"))):
        interval = "-"
    elif style == "pct":
        interval = f"[{100 * (mean - ci):.2f}, {100 * (mean + ci):.2f}]"
    else:
        interval = f"[{mean - ci:.3f}, {mean + ci:.3f}]"
    return fmt(mean, std, style), interval


def leaderboard_table(rows: pd.DataFrame, caption: str = "") -> Table:
    """One protocol's rows (teacher first) as a table."""
    first = rows.iloc[0]
    figure = first["compared"] if "compared" in rows else f"test_{first['metric']}"
    metric = figure.removeprefix("test_")
    label = metric + (" %" if is_fraction(metric) else "")
    direction = "↑" if stats_direction(rows, figure) else "↓"
    references = row_references(rows)
    # One reference: named in the header; several: a column says which one each row uses.
    ref_label = references[0] if len(references) == 1 else "reference"
    multi_student = rows.loc[~rows.is_teacher, "student"].nunique() > 1
    multi_teacher = rows["teacher"].nunique() > 1
    # A figure with a block-bootstrap interval over test windows (perplexity): shown beside it.
    windows = f"{figure}_ci95_low_mean" in rows and rows[f"{figure}_ci95_low_mean"].notna().any()
    columns = (["teacher"] if multi_teacher else []) + (["student"] if multi_student else []) + [
        "recipe", "n", f"{label} {direction}", "95% CI"] + ([WINDOWS_CI] if windows else []) + (
        ["reference"] if len(references) > 1 else []) + [
        f"Δ vs {ref_label} [95% CI]", "p", "rank"]
    last = f"last_epoch_{figure}"
    figures = ([(last, "last epoch", "pct" if is_fraction(metric) else "num")]
               if f"{last}_mean" in rows and figure.startswith("test_") else [])
    relabel = f"{label} {direction}"
    figures += [f for f in figure_list(rows) if f"{f[0]}_mean" in rows and rows[f"{f[0]}_mean"].notna().any()]
    relative = [f for f in RELATIVE if f[0] in rows and rows[f[0]].notna().any()]
    if _differs_from_teacher(rows):
        # Compressed students of a student: their size and speed against the uncompressed one.
        relative += [("bytes_ratio_reference", "ref/file")]
        # Not timed beside the row: its label says so, beside the paired "× teacher" columns.
        relative += [(c, f"× ref {c.rsplit('_', 1)[1]} (unpaired)") for c in ("speedup_reference_b1",) if c in rows]
    columns += [lab for _, lab, _ in figures] + [lab for _, lab in relative]
    cells, numbers = [], []
    for row in rows.to_dict("records"):
        # The teacher's row needs no markup: its recipe cell says "teacher" and it comes first.
        recipe = row_label(row) + main_label(row, figure) + ("" if row.get("materialized", True) else " †")
        recipe += " ‡" if (row.get("sparse_tensors_mean") or 0) > 0 else ""
        recipe += " ◆" if row.get("pareto_size_bytes") or row.get("pareto_latency_b1_ms") else ""
        recipe += f" {STILL_IMPROVING}" if still_improving(row) else ""
        recipe += f" {BUSY}" if busy(row) else ""
        recipe += f" {DERIVED}" if row.get("derived") is True else ""
        shown = shown_figure(row, figure)
        value, interval = _metric_cells(row, shown) if shown else ("-", "-")
        reference = [] if len(references) < 2 else [
            "-" if row["is_teacher"] or not isinstance(row.get("reference_label"), str) else row["reference_label"]]
        line = ([row["teacher"]] if multi_teacher else []) + ([row["student"]] if multi_student else []) + [
            recipe, str(row["n"]), value, interval] + ([window_interval(row, figure)] if windows else []) + [
            *reference,
            "-" if row["is_teacher"] else delta_cell(row), "-" if row["is_teacher"] else p_cell(row),
            "-" if math.isnan(row.get("rank", math.nan)) else f"{row['rank']:g}"]
        line += [fmt(row[f"{key}_mean"], row[f"{key}_std"], style) if shown == figure or key != last else "-"
                 for key, _, style in figures]
        line += [_relative(row[key], key) for key, _ in relative]
        cells.append(line)
        nums: list[float | None] = [None] * (len(line) - len(figures) - len(relative))
        nums[columns.index("n")] = row["n"]
        nums[columns.index(relabel)] = finite_or_none(row.get(f"{shown}_mean")) if shown else None
        nums[columns.index(f"Δ vs {ref_label} [95% CI]")] = finite_or_none(row.get("delta_mean"))
        nums[columns.index("p")] = finite_or_none(row.get("p_value"))
        nums[columns.index("rank")] = finite_or_none(row.get("rank"))
        numbers.append(nums + [finite_or_none(row[f"{key}_mean"]) if shown == figure or key != last else None
                               for key, _, _ in figures]
                       + [finite_or_none(row[key]) for key, _ in relative])
    notes = table_notes(rows, figure)
    if windows:
        notes.insert(1, WINDOWS_NOTE)
    return Table(columns=columns, rows=cells, caption=caption, notes=notes, numbers=numbers)


#: The column of a figure's block-bootstrap interval over test windows (``kdbench/bootstrap.py``).
WINDOWS_CI = "test windows 95% CI"
WINDOWS_NOTE = (f"{WINDOWS_CI}: the 2.5th to 97.5th percentile of the figure over 2,000 seeded "
                "resamples of whole test windows (a block bootstrap; tokens of a window stay together), "
                "computed for each seed's model and averaged over the seeds: how far another test "
                "sample of this size from the same text could move a row's figure, even one of a "
                "single seed or of a deterministic method. It does not cover seed-to-seed variation (the "
                "95% CI does), and overlapping intervals of two rows do not make their paired difference "
                "insignificant.")


def window_interval(row: dict[str, Any], figure: str) -> str:
    """``[61.20, 71.83]``: the row's block-bootstrap interval over test windows, or "-"."""
    low, high = (finite_or_none(row.get(f"{figure}_ci95_{end}_mean")) for end in ("low", "high"))
    if low is None or high is None:
        return "-"
    scale = 100 if is_fraction(figure) else 1
    digits = 2 if scale == 100 else 3
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def row_references(rows: pd.DataFrame) -> list[str]:
    """The references the student rows of a table are compared with, in order of appearance."""
    column = "reference_label" if "reference_label" in rows else "reference"
    if column not in rows:
        return []
    return list(dict.fromkeys(r for r in rows.loc[~rows.is_teacher, column] if isinstance(r, str)))


#: Marks an equal-budget control that kdbench derived (``controls: auto``).
DERIVED = "§"
DERIVED_NOTE = (f"{DERIVED} equal-budget control derived by kdbench (controls: auto): the parent recipe trained "
                "for the same extra epochs, with the same loss, as the compound rows compared with it.")
UNCONTROLLED_NOTE = ("untested +N ep: the row trains N epochs more than its parent and no equal-budget control "
                     "(the parent trained as long) is in the table, so it is not compared; add 'controls: auto' "
                     "to the experiment.")


def recipes_table(rows: pd.DataFrame) -> Table:
    """The footnote table of a leaderboard table: each row's resolved stages and parameters,
    and what it is compared with, and why."""
    body = []
    for row in rows.to_dict("records"):
        stages = row.get("stages") if isinstance(row.get("stages"), str) else "-"
        if row["is_teacher"]:
            body.append([row_label(row), stages, "-", "the teacher's own row"])
            continue
        reference = row.get("reference_label", row.get("reference"))
        why = row.get("reference_why")
        body.append([row_label(row) + (f" {DERIVED}" if row.get("derived") is True else ""), stages,
                     reference if isinstance(reference, str) else "-", why if isinstance(why, str) else "-"])
    return Table(columns=["recipe", "resolved stages", "compared with", "why"], rows=body,
                 caption="Recipes of the table above: resolved stages and references",
                 notes=["Parameters shown: each plugin's first (key) one and those that differ from its "
                        "defaults; a training stage's settings in brackets where they differ from the "
                        "budget. A compound recipe (one that begins with all the stages of another, its "
                        "parent) is compared with its parent, or with its equal-budget control when its "
                        "added stages train; recipes that start from the teacher, with the teacher."])


def _differs_from_teacher(rows: pd.DataFrame) -> bool:
    """Whether the reference-relative sizes say something the teacher-relative ones do not."""
    if "bytes_ratio_reference" not in rows:
        return False
    ref, teacher = rows["bytes_ratio_reference"], rows["bytes_ratio_teacher"]
    known = ref.notna()
    return bool(known.any() and ((ref[known] - 1).abs() > 1e-6).any()
                and ((ref[known] - teacher[known]).abs() > 1e-6).any())


def stats_direction(rows: pd.DataFrame, figure: str) -> bool:
    from .summary import direction
    first = rows.iloc[0]
    return direction(figure, first["metric"], bool(first["higher_is_better"]))


def finite_or_none(value: Any) -> float | None:
    """A number as a float, or None for NaN and what is not a number (table cells)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _relative(value: Any, key: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}" if key == "retained_pct" else f"{value:.2f}×"  # ratios


def table_notes(rows: pd.DataFrame, figure: str) -> list[str]:
    notes = [
        "Mean ± standard deviation over n seeds, test split; 95% CI: Student-t interval of the mean. "
        "Δ: mean of the per-seed differences to the row's reference (paired by seed; a compound "
        "recipe's parent, or its equal-budget control when it trains more: see the recipes table) "
        "with its 95% t interval; p: two-sided paired t-test; ✓: significant at 0.05 after Holm's "
        f"correction over the rows compared with the same reference; (n=k): fewer than "
        f"{stats.MIN_PAIRS} seed pairs, too few to test. Intervals need at least "
        f"{MIN_INTERVAL_SEEDS} seeds ({MIN_INTERVAL_SEEDS} seed pairs for Δ); with fewer they show "
        "\"-\": a 2-seed t interval is ±12.7 standard errors wide. Rank 1 is best on "
        f"{figure}, among rows of the same pair and protocol; ties share the mean rank.",
        "Latency: median of interleaved repeats on the CPU; × teacher: median ratio of teacher to "
        "model time, the two timed back to back. FLOPs count a multiply-add as 2. % of teacher: "
        "the task metric as a share of the teacher's (teacher / model for lower-is-better metrics); "
        "teacher/file: the teacher's file size over the model's; ref/file and × ref b1 (unpaired): "
        "the same against the reference row (a ratio of medians of cells timed apart, not paired); last "
        "epoch: the test metric of the last epoch, where the main column is that of the epoch "
        "the validation split chose.",
    ]
    if "materialized" in rows and not rows["materialized"].all():
        notes.append("† simulated compression (masks, fake quantization): dense kernels still run "
                     "the full computation, so it is not faster; it is never on the latency front, "
                     "and the latency figure draws it at the dense model's.")
    if "sparse_tensors_mean" in rows and (rows["sparse_tensors_mean"].fillna(0) > 0).any():
        notes.append("‡ the file stores its sparse weight matrices in CSR form (int32 indices), "
                     "where that is smaller than dense.")
    if any(rows.get("pareto_size_bytes", [])) or any(rows.get("pareto_latency_b1_ms", [])):
        notes.append("◆ on the Pareto front of quality against file size or batch-1 latency "
                     "(no other row of this protocol is at least as good and as cheap).")
    records = rows.to_dict("records")
    if any(still_improving(row) for row in records):
        notes.append(STILL_IMPROVING_NOTE)
    notes += main_figure_notes(records, figure)
    if any(busy(row) for row in records):
        notes.append(BUSY_NOTE)
    if "derived" in rows and (rows["derived"] == True).any():  # noqa: E712
        notes.append(DERIVED_NOTE)
    if "uncontrolled" in rows and (rows["uncontrolled"] == True).any():  # noqa: E712
        notes.append(UNCONTROLLED_NOTE)
    if (unequal := treatment_note(rows)) is not None:
        notes.append(unequal)
    return notes


#: Rows a seed of which was still improving when its training ended (kdbench/convergence.py).
STILL_IMPROVING = "↗"
STILL_IMPROVING_NOTE = (f"{STILL_IMPROVING} still improving: in at least one seed a training stage (or the "
                        "teacher's training) gained more than its tolerance (0.5 % of the earlier best by "
                        "default) in the best validation metric of its last 20 % of epochs; the row reports "
                        "a number its method had not reached. Give it more epochs before comparing it.")


def still_improving(row: dict[str, Any]) -> bool:
    """Whether a seed of the row had not converged (rows stored before it was measured: never)."""
    value = row.get("still_improving")
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(value)


def metric_applies(row: dict[str, Any]) -> bool:
    """Whether the task metric means something for the row (not: an untrained head, or a
    recipe that declares another main figure)."""
    value = row.get("metric_applies")
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(value)


def shown_figure(row: dict[str, Any], figure: str) -> str | None:
    """The figure in a row's main cell: ``figure``, except that a row whose task metric does
    not apply shows its declared main figure instead (None: it declared none)."""
    if metric_applies(row) or not figure.endswith(f"test_{row['metric']}"):
        return figure
    return row.get("main_figure") or None


def main_label(row: dict[str, Any], figure: str) -> str:
    """`` [probe_accuracy]`` after the recipe of a row that shows its main figure, or
    `` [untrained head]`` when it has none to show."""
    if shown_figure(row, figure) == figure:
        return ""
    return f" [{row['main_figure']}]" if row.get("main_figure") else " [untrained head]"


def main_figure_notes(records: list[dict[str, Any]], figure: str) -> list[str]:
    """Why some rows show another figure than ``figure`` and are not ranked on it."""
    notes = []
    for row in records:
        if shown_figure(row, figure) == figure:
            continue
        why = ("training never updated its head, the module that produces the logits"
               if row.get("head_untrained") else "the recipe declares its main figure")
        metric = figure.removeprefix("test_")
        shown = (f"its main cell shows {row['main_figure']} instead" if row.get("main_figure") else
                 "nothing is shown; declare the figure to read it by (recipe: {stages: [...], "
                 "report: probe_accuracy})")
        notes.append(f"{row['recipe']}: {metric} does not apply ({why}); {shown}, and the row is left "
                     f"out of the ranks, the tests and the Pareto fronts on {metric}.")
    return notes


#: Rows timed while the machine's load average exceeded its core count.
BUSY = "⚠"
BUSY_NOTE = (f"{BUSY} speed figures (latency, × teacher, × ref) of marked rows were measured on a busy "
             "machine (load average above the core count) and are unreliable.")


def busy(row: dict[str, Any]) -> bool:
    """Whether any seed of the row was timed with more runnable work than cores (rows stored
    before the load was recorded: never)."""
    per_core = row.get("latency_load_per_core_max")
    return per_core is not None and not math.isnan(per_core) and per_core > 1


@dataclasses.dataclass
class ProtocolGroup:
    """The rows of one table: one value of the ``by`` columns under one protocol."""

    caption: str
    fingerprint: str
    protocol: dict[str, Any]
    rows: pd.DataFrame
    #: Before the group's first table, when its rows were measured under several protocols.
    intro: str | None = None


def protocol_groups(summary: pd.DataFrame, by: Sequence[str] = ("task",)) -> Iterator[ProtocolGroup]:
    """The tables of a leaderboard, in order, whatever it is rendered as."""
    by = list(by)
    for key, group in summary.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        name = ", ".join(f"{b} {k}" for b, k in zip(by, key, strict=True))
        prints = list(dict.fromkeys(group["fingerprint"]))
        intro = None
        if len(prints) > 1:
            protos = [json.loads(group[group.fingerprint == fp].iloc[0]["protocol"]) for fp in prints]
            lines = [f"{fp} vs {prints[0]}: " + "; ".join(differences(protos[0], proto))
                     for fp, proto in zip(prints[1:], protos[1:], strict=True)]
            intro = (f"{name}: rows measured under {len(prints)} protocols are shown in "
                     "separate tables and never ranked together. They differ in " + " | ".join(lines) + ".")
        for fp in prints:
            rows = group[group.fingerprint == fp]
            students = rows[~rows.is_teacher]
            pair = ""
            if rows["teacher"].nunique() == 1 and students["student"].nunique() <= 1:
                pair = f": {rows.iloc[0]['teacher']} → {students.iloc[0]['student'] if len(students) else '-'}"
            yield ProtocolGroup(f"{name}{pair} (protocol {fp})", fp, json.loads(rows.iloc[0]["protocol"]),
                                rows, intro)
            intro = None


def protocol_line(group: ProtocolGroup) -> str:
    """The protocol under a table, with the machine's load while its rows were timed."""
    rows = group.rows
    load = ""
    if "latency_load_max" in rows and "cpu_count_mean" in rows and rows["latency_load_max"].notna().any():
        load = "; " + describe_load(float(rows["latency_load_max"].max()), rows["cpu_count_mean"].tolist())
    # Every pretrained model of the table, not only the first row's (not fingerprinted).
    weights = {k: v for p in rows["protocol"].dropna().unique()
               for k, v in (json.loads(p).get("provenance") or {}).items()}
    return f"Protocol {group.fingerprint}: {describe({**group.protocol, 'provenance': weights})}{load}."


def leaderboard_blocks(summary: pd.DataFrame, by: Sequence[str] = ("task",)) -> list[Block]:
    """Tables per value of ``by`` and per protocol fingerprint, each under a caption that
    names the group and the protocol; a paragraph explains where protocols differ."""
    if summary.empty:
        return [Paragraph("No finished cells in the store yet.")]
    blocks: list[Block] = []
    for group in protocol_groups(summary, by):
        if group.intro:
            blocks.append(Paragraph(group.intro))
        table = leaderboard_table(group.rows, group.caption)
        table.notes.insert(0, protocol_line(group))
        blocks += [table, recipes_table(group.rows)]
    return blocks


def ranks_table(aggregate: pd.DataFrame) -> Table:
    rows = [[r["recipe"], "-" if math.isnan(r["mean_rank"]) else f"{r['mean_rank']:.2f}",
             f"{r['groups']} of {r['of']}", r["ranks"]] for r in aggregate.to_dict("records")]
    return Table(columns=["recipe", "mean rank", "groups", "ranks"], rows=rows,
                 caption="Aggregate rank: mean of the per-group ranks over every (task, pair, protocol) group",
                 notes=["A recipe missing from some groups gets no mean rank: a mean over fewer, "
                        "perhaps easier, groups would flatter it."],
                 numbers=[[None, finite_or_none(r["mean_rank"]), r["groups"], None] for r in aggregate.to_dict("records")])
