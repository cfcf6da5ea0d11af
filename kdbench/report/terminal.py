"""The leaderboard as a terminal shows it: a few aligned plain-text columns per table.

The full table (``--wide``, the Markdown of :mod:`kdbench.report.tables`) has over twenty
columns and wraps into noise in an 80-120 column terminal. This view keeps what a reader
decides by: the task metric with its spread and interval, the paired difference to the
reference with its verdict, the size ratio, the paired speed ratio and the marks, with a
legend for every mark a table uses. Same tables, captions and protocol lines as the wide
view; every number is in the wide view too.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .tables import (BUSY, BUSY_NOTE, DERIVED, DERIVED_NOTE, STILL_IMPROVING, STILL_IMPROVING_NOTE,
                     UNCONTROLLED_NOTE, ProtocolGroup, _differs_from_teacher, busy, finite_or_none, is_fraction,
                     is_own_reference, main_figure_notes, main_label, mark, protocol_groups, protocol_line,
                     row_label, row_references, shown_figure, stats_direction, still_improving,
                     uncontrolled_text)
from .treatment import treatment_note

#: The width every line but a table's rows is wrapped to; the quickstart's rows fit in it too.
WIDTH = 100
GAP = "  "
#: The marks of the note column, in order, with their legend.
MARKS = [
    ("†", "simulated compression (masks, fake quantization): not faster, never on the latency front"),
    ("‡", "sparse weights stored in CSR form"),
    ("◆", "on the Pareto front of quality against file size or batch-1 latency"),
    (DERIVED, DERIVED_NOTE.removeprefix(f"{DERIVED} ")),
]
#: Tables with at most this many student rows list each row's resolved stages under the
#: legend; larger ones point to ``--wide``, whose recipes table has them.
MAX_RECIPE_LINES = 12


def terminal_view(summary: pd.DataFrame, by: Sequence[str] = ("task",), width: int = WIDTH) -> str:
    """Every table of the leaderboard, with its caption, protocol line and legend."""
    if summary.empty:
        return "No finished cells in the store yet.\n"
    parts = []
    for group in protocol_groups(summary, by):
        if group.intro:
            parts.append(_wrap(group.intro, width))
        parts.append(table_text(group, width))
    parts.append(_wrap("Every column (p-values, ranks, sizes, latencies, train time): add --wide.", width))
    return "\n\n".join(parts) + "\n"


def table_text(group: ProtocolGroup, width: int = WIDTH) -> str:
    rows = group.rows
    first = rows.iloc[0]
    figure = first["compared"] if "compared" in rows else f"test_{first['metric']}"
    metric = figure.removeprefix("test_")
    arrow = "↑" if stats_direction(rows, figure) else "↓"
    records = rows.to_dict("records")

    # Rows of several teachers or students: one heading line per (teacher, student), the
    # recipes indented under it, so that no column carries a 20-character model label. Rows
    # compared with different references: one heading per reference (a Holm family), after
    # the reference's own row, so that the table says what each row is compared with.
    multi_teacher = rows["teacher"].nunique() > 1
    multi_student = rows.loc[~rows.is_teacher, "student"].nunique() > 1
    references = row_references(rows)
    per_group_reference = len(references) > 1
    headed = multi_teacher or multi_student or per_group_reference
    keys = _headings(records)

    size_key, size_label = (("bytes_ratio_reference", "ref/file") if _differs_from_teacher(rows)
                            else ("bytes_ratio_teacher", "teacher/file"))
    speed = "speedup_b1_mean" in rows and rows["speedup_b1_mean"].notna().any()
    values = _metric_texts(records, figure)
    deltas = _delta_texts(records, figure)

    header = ["recipe", "n", f"{metric}{' %' if is_fraction(metric) else ''} {arrow}",
              "Δ vs " + (references[0] if len(references) == 1 else "ref"), size_label]
    header += ["× teacher b1"] if speed else []
    header += ["note"]
    right = [False, True, False, False, True] + ([True] if speed else []) + [False]
    lines: list[tuple[str | None, list[str]]] = []  # (heading, []) or (None, a row's cells)
    for (teacher, student, reference), members in keys.items():
        # The teacher's row of a table with one teacher stays on top, under no heading.
        under_heading = headed and (student is not None or multi_teacher)
        if under_heading:
            model = teacher if student is None else (f"{teacher} → {student}" if multi_teacher else student)
            if not (multi_teacher or multi_student):
                label = f"Δ vs {reference or '-'}"
            else:
                label = model + (f" (Δ vs {reference})" if per_group_reference and reference else "")
            lines.append((label, []))
        for r in members:
            cells = [("  " if under_heading else "") + row_label(r) + main_label(r, figure), str(r["n"]),
                     values[id(r)], deltas[id(r)],
                     _ratio(r.get(size_key))]
            cells += ["-" if r["is_teacher"] else _ratio(r.get("speedup_b1_mean"))] if speed else []
            cells += [" ".join(_marks(r))]
            lines.append((None, cells))

    table_rows = [cells for heading, cells in lines if heading is None]
    widths = [max(len(c) for c in column) for column in zip(header, *table_rows, strict=True)]

    def join(cells: list[str]) -> str:
        return GAP.join(c.rjust(w) if r else c.ljust(w)
                        for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    out = [_wrap(group.caption, width), _wrap(protocol_line(group), width, "  "), "", join(header),
           "─" * (sum(widths) + len(GAP) * (len(widths) - 1))]
    out += [heading if heading is not None else join(cells) for heading, cells in lines]
    out += [_wrap(text, width, "  ") for text in legend(records, size_label, speed, figure)]
    if (unequal := treatment_note(rows)) is not None:  # compressed rows not treated alike
        out.append(_wrap(unequal, width, "  "))
    out += recipe_lines(records, width)
    return "\n".join(out)


def _headings(records: list[dict[str, Any]]) -> dict[tuple, list[dict]]:
    """The rows by (teacher, student, reference): the teacher's rows first, then per student
    the rows compared with each reference, the groups in the order of their reference's row
    (the teacher's first), so that a reference is read before the rows compared with it."""
    position = {(r["teacher"], None if r["is_teacher"] else r["student"], row_label(r)): i
                for i, r in enumerate(records)}
    keys: dict[tuple, list[dict]] = {}
    for r in records:
        reference = None if r["is_teacher"] else r.get("reference_label", r.get("reference"))
        keys.setdefault((r["teacher"], None if r["is_teacher"] else r["student"],
                         reference if isinstance(reference, str) else None), []).append(r)

    def order(key: tuple) -> tuple:
        teacher, student, reference = key
        first = min(records.index(r) for r in keys[key])
        if student is None:
            return (-1, first, 0)
        own = position.get((teacher, student, reference))
        at = (own if own is not None else -1) if reference else len(records)
        student_first = min(i for i, r in enumerate(records) if not r["is_teacher"] and r["student"] == student)
        return (student_first, at, first)

    return {key: keys[key] for key in sorted(keys, key=order)}


def recipe_lines(records: list[dict[str, Any]], width: int = WIDTH) -> list[str]:
    """Each row's resolved stages (``kd+prune: distill:hinton > prune:magnitude(sparsity=0.5) >
    finetune(3)``), for tables small enough; else where to find them."""
    if not any(isinstance(r.get("stages"), str) for r in records):
        return []
    if sum(not r["is_teacher"] for r in records) > MAX_RECIPE_LINES:
        return [_wrap("Resolved stages of every row: add --wide (the recipes table).", width)]
    seen = dict.fromkeys(f"{row_label(r)}: {r['stages']}" for r in records if isinstance(r.get("stages"), str))
    return ["Recipes (resolved stages):"] + [_wrap("  " + line, width, "      ") for line in seen]


def legend(records: list[dict[str, Any]], size_label: str = "teacher/file", speed: bool = True,
           figure: str | None = None) -> list[str]:
    """What the columns hold, then one line per note mark the table uses."""
    whose = "the reference's" if size_label.startswith("ref") else "the teacher's"
    lines = ["Mean ± std over n seeds [95% t interval, from 3 seeds]. Δ: paired by seed; ✓ significant "
             f"(Holm, 0.05); {_keep('(n=k)')} too few seeds to test.",
             f"{_keep(size_label)}: {whose} file size over the row's"
             + (f"; {_keep('× teacher b1')}: the teacher's batch-1 time over the row's, timed back to back."
                if speed else ".")]
    used = {m for r in records for m in _marks(r)}
    lines += [f"{m} {text}" for m, text in MARKS if m in used]
    if STILL_IMPROVING in used:
        lines.append(STILL_IMPROVING_NOTE)
    if BUSY in used:
        lines.append(BUSY_NOTE)
    if figure is not None:
        lines += main_figure_notes(records, figure)
    if any(r.get("uncontrolled") is True for r in records):
        lines.append(UNCONTROLLED_NOTE)
    return lines


def _marks(row: dict[str, Any]) -> list[str]:
    marks = [] if row.get("materialized", True) else ["†"]
    marks += ["‡"] if (row.get("sparse_tensors_mean") or 0) > 0 else []
    marks += ["◆"] if row.get("pareto_size_bytes") or row.get("pareto_latency_b1_ms") else []
    marks += [STILL_IMPROVING] if still_improving(row) else []
    marks += [DERIVED] if row.get("derived") is True else []
    return marks + ([BUSY] if busy(row) else [])


def _metric_texts(records: list[dict[str, Any]], figure: str) -> dict[int, str]:
    """``91.39 ± 0.56 [90.01, 92.77]``, the parts aligned down the column; the interval only
    from 3 seeds on (with 2 it is ±12.7 standard errors wide and says little), the spread
    from 2."""
    parts = {}
    for r in records:
        shown = shown_figure(r, figure)  # a row whose task metric does not apply: its main figure
        scale, digits = (100, 2) if is_fraction(shown or figure) else (1, 3)
        mean, std, ci = (finite_or_none(r.get(f"{shown}_{s}")) for s in ("mean", "std", "ci95"))
        if mean is None:
            parts[id(r)] = ("-", "", "")
            continue
        spread = f"± {std * scale:.{digits}f}" if std is not None and r["n"] >= 2 else ""
        interval = (f"[{(mean - ci) * scale:.{digits}f}, {(mean + ci) * scale:.{digits}f}]"
                    if ci is not None and r["n"] >= 3 else "")
        parts[id(r)] = (f"{mean * scale:.{digits}f}", spread, interval)
    return _aligned(parts, [True, True, False])


def _delta_texts(records: list[dict[str, Any]], figure: str) -> dict[int, str]:
    """``−4.91 ✓``: the paired mean difference to the reference and its verdict mark."""
    scale, digits = (100, 2) if is_fraction(figure) else (1, 3)
    parts = {}
    for r in records:
        delta = finite_or_none(r.get("delta_mean"))
        if r["is_teacher"] or r.get("reference") is None:
            parts[id(r)] = ("-", "")
        elif r.get("uncontrolled") is True:
            parts[id(r)] = (uncontrolled_text(r), "")
        elif delta is None:
            parts[id(r)] = ("(reference)" if is_own_reference(r) else "-", "")
        else:
            parts[id(r)] = (f"{delta * scale:+.{digits}f}".replace("-", "−"), mark(r).strip())
    return _aligned(parts, [True, False])


def _aligned(parts: dict[int, tuple[str, ...]], right: list[bool]) -> dict[int, str]:
    """Join each row's parts so that every part starts in the same place down the column."""
    widths = [max((len(p[i]) for p in parts.values()), default=0) for i in range(len(right))]
    out = {}
    for key, p in parts.items():
        if (p[0] in ("-", "(reference)") or p[0].startswith("untested")) and not any(p[1:]):
            out[key] = p[0].rjust(widths[0]) if p[0] == "-" else p[0]
            continue
        out[key] = " ".join(x.rjust(w) if r else x.ljust(w)
                            for x, w, r in zip(p, widths, right, strict=True) if w).rstrip()
    return out


def _ratio(value: Any) -> str:
    value = finite_or_none(value)
    return "-" if value is None else f"{value:.2f}×"


def _keep(text: str) -> str:
    """``text`` that a wrapped line must not break (a column's name)."""
    return text.replace(" ", NBSP)


NBSP = "\u00a0"  # textwrap breaks at ASCII whitespace only


def _wrap(text: str, width: int, indent: str = "") -> str:
    lines = textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [text]
    return "\n".join(lines).replace(NBSP, " ")
