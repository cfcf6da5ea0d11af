"""The report's figures: the quality/cost Pareto front of one task, recipes against the
reference recipe, and training curves. Each saves ``<stem>.png`` and ``<stem>.svg`` and
returns what it drew, so captions and tests can check it.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never pyplot:
nothing enters pyplot's global list of open figures, so a report of hundreds of figures leaks
none (each is freed when its function returns), and no screen backend is ever chosen; saving
goes through Agg (PNG) and the SVG backend.

Names from plugins and configs can hold any character. Matplotlib would read ``$...$`` in
them as mathematics and drop legend labels that start with ``_``: every text drawn from data
has ``parse_math=False``, and legends are given their handles explicitly. The SVG backend escapes
XML itself.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .stats import pareto_mask
from .tables import is_fraction

DPI = 150
#: ``svg.fonttype: none`` writes text as ``<text>`` elements (searchable, read by screen
#: readers, checkable by tests) rather than glyph outlines; a fixed hash salt and no date keep
#: an SVG identical from run to run, so a report kept in git changes only when its numbers do.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "kdbench", "font.size": 8, "axes.titlesize": 9,
       "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
       "figure.titlesize": 10}

FRONT = "#0072B2"  # Okabe-Ito blue: the non-dominated points
DOMINATED = "#999999"
TEACHER = "#000000"
#: Few enough dominated points to name them without burying the front's labels.
_NAME_DOMINATED_UP_TO = 6
#: Label offsets (points) cycled along the front, so neighbours' labels go to different sides.
_OFFSETS = [((6, 4), "left", "bottom"), ((-6, -4), "right", "top"),
            ((6, -4), "left", "top"), ((-6, 4), "right", "bottom")]


# --- shared helpers ------------------------------------------------------------------------

def _single(summary: pd.DataFrame, column: str, what: str) -> None:
    """Refuse a frame that mixes values of ``column``: a front or ranking across protocols
    (fingerprints) or tasks compares numbers that were not measured alike."""
    if column not in summary:
        return
    values = list(dict.fromkeys(summary[column].dropna().astype(str)))
    if len(values) > 1:
        raise ValueError(f"{what} draws one {column} at a time, but the summary holds {len(values)}: "
                         f"{', '.join(values)}; split the rows by {column} first")


def _metric(summary: pd.DataFrame, what: str) -> tuple[str, bool]:
    if summary.empty:
        raise ValueError(f"{what}: the summary has no rows")
    _single(summary, "metric", what)
    _single(summary, "higher_is_better", what)
    return str(summary["metric"].iloc[0]), bool(summary["higher_is_better"].iloc[0])


def _scale(metric: str) -> float:
    return 100.0 if is_fraction(metric) else 1.0


def _quality_label(split: str, metric: str, higher: bool) -> str:
    unit = ", %" if is_fraction(metric) else ""
    return f"{split} {metric}{unit} ({'higher' if higher else 'lower'} is better)"


def _flag(summary: pd.DataFrame, column: str, default: bool) -> np.ndarray:
    """A boolean column that may be missing or hold None/NaN (then ``default``)."""
    if column not in summary:
        return np.full(len(summary), default)
    return np.array([default if _missing(v) else bool(v) for v in summary[column]], dtype=bool)


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _numbers(summary: pd.DataFrame, column: str) -> np.ndarray:
    if column not in summary:
        return np.full(len(summary), np.nan)
    return pd.to_numeric(summary[column], errors="coerce").to_numpy(dtype=float)


def _row_labels(summary: pd.DataFrame) -> list[str]:
    """The recipe, plus the student (teacher) when the rows hold more than one."""
    teacher = _flag(summary, "is_teacher", False)
    students = set(summary.loc[~teacher, "student"]) if "student" in summary else set()
    teachers = set(summary.loc[teacher, "teacher"]) if "teacher" in summary else set()
    labels = []
    for is_teacher, (_, row) in zip(teacher, summary.iterrows()):
        if is_teacher:
            labels.append(f"teacher ({row['teacher']})" if len(teachers) > 1 else "teacher")
        else:
            labels.append(f"{row['recipe']} ({row['student']})" if len(students) > 1 else str(row["recipe"]))
    return labels


def _save(fig: Figure, out_stem: Path) -> None:
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a stem such as "pareto.size_bytes" would lose its last part.
    fig.savefig(out_stem.parent / f"{out_stem.name}.png", dpi=DPI, metadata={"Software": None})
    fig.savefig(out_stem.parent / f"{out_stem.name}.svg", metadata={"Date": None})


def _legend(ax, handles: list, **kwargs) -> None:
    """Handles passed explicitly: collected automatically, those labelled '_...' are dropped."""
    legend = ax.legend(handles=handles, **kwargs)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _wrap(title: str, width: int = 80) -> str:
    """Long model labels would run off the canvas."""
    return textwrap.fill(title, width, break_long_words=False, break_on_hyphens=False)


# --- 1. the Pareto front -------------------------------------------------------------------

@mpl.rc_context(_RC)
def pareto_figure(summary: pd.DataFrame, cost: str, cost_label: str, out_stem: Path, title: str) -> list[str]:
    """Test quality against ``{cost}_mean`` for the rows of one task and one fingerprint; the
    non-dominated rows highlighted and joined by a step line. Returns their labels in cost order."""
    for column in ("task", "fingerprint"):
        _single(summary, column, "pareto_figure")
    metric, higher = _metric(summary, "pareto_figure")
    scale = _scale(metric)
    # Rows that ship one architecture share its pooled latency (see summary.architecture_keys).
    x_all = _numbers(summary, f"{cost}_pooled" if f"{cost}_pooled" in summary else f"{cost}_mean")
    y_all = _numbers(summary, f"test_{metric}_mean") * scale
    keep = np.isfinite(x_all) & np.isfinite(y_all)
    x, y = x_all[keep], y_all[keep]
    err = _numbers(summary, f"test_{metric}_ci95")[keep] * scale
    labels = [label for label, k in zip(_row_labels(summary), keep) if k]
    teacher = _flag(summary, "is_teacher", False)[keep]
    real = _flag(summary, "materialized", True)[keep]
    # The teacher takes part: a student that costs more than the teacher and scores worse is
    # no option, and a student that beats the teacher at lower cost is the headline.
    if f"pareto_{cost}" in summary:
        # The summary's front (the leaderboard's ◆), which knows which rows ship the same
        # architecture and so tie on latency whatever the noise.
        front = np.asarray(summary[f"pareto_{cost}"].fillna(False), dtype=bool)[keep]
    else:
        front = np.array(pareto_mask(y, x, higher), dtype=bool)
    # Cost order; among equal costs the better one first, as the step line reads.
    order = sorted(np.flatnonzero(front), key=lambda i: (x[i], -y[i] if higher else y[i]))

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if len(order) > 1:
        ax.step(x[order], y[order], where="post", color=FRONT, lw=1, alpha=0.6, zorder=1)
    name_dominated = (~front).sum() <= _NAME_DOMINATED_UP_TO
    for i in range(len(x)):
        colour = TEACHER if teacher[i] else FRONT if front[i] else DOMINATED
        if np.isfinite(err[i]):
            ax.errorbar(x[i], y[i], yerr=err[i], fmt="none", ecolor=colour, elinewidth=0.8,
                        capsize=2, alpha=0.8, zorder=2)
        ax.plot(x[i], y[i], linestyle="none", marker="*" if teacher[i] else "o",
                markersize=11 if teacher[i] else 6, color=colour,
                markerfacecolor=colour if real[i] else "none", zorder=3)
    for k, i in enumerate(order):
        _annotate(ax, x[i], y[i], labels[i], k, "black")
    rest = [i for i in range(len(x)) if not front[i] and (teacher[i] or name_dominated)]
    for k, i in enumerate(rest):
        _annotate(ax, x[i], y[i], labels[i], k + 1, "black" if teacher[i] else "#777777")

    log = len(x) > 0 and bool((x > 0).all())
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{cost_label} ({'log scale, ' if log else ''}lower is better)", parse_math=False)
    ax.set_ylabel(_quality_label("test", metric, higher), parse_math=False)
    ax.set_title(_wrap(title), parse_math=False)
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=FRONT, marker="o", label="Pareto front (non-dominated)")]
    if (~front & ~teacher).any():
        handles.append(Line2D([], [], color=DOMINATED, marker="o", linestyle="none", label="dominated"))
    if teacher.any():
        handles.append(Line2D([], [], color=TEACHER, marker="*", markersize=9, linestyle="none", label="teacher"))
    if (~real).any():
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="none", linestyle="none",
                              label="simulated (no real saving)"))
    _legend(ax, handles, loc="best", framealpha=0.8)
    _save(fig, out_stem)
    return [labels[i] for i in order]


def _annotate(ax, x: float, y: float, text: str, k: int, colour: str) -> None:
    (dx, dy), ha, va = _OFFSETS[k % len(_OFFSETS)]
    ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=6.5, color=colour, parse_math=False, zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})


# --- 2. recipes against the reference ------------------------------------------------------

BETTER = "significantly better"
WORSE = "significantly worse"
NO_DIFFERENCE = "no significant difference"
TOO_FEW = "too few seeds to test"
NOT_COMPARED = "not compared"
REFERENCE = "reference"
#: Colour and marker per category: the shape repeats the colour's message for readers who
#: cannot tell the colours apart.
_STYLE = {BETTER: ("#009E73", "^", True), WORSE: ("#D55E00", "v", True), NO_DIFFERENCE: ("#0072B2", "o", True),
          TOO_FEW: ("#777777", "o", False), NOT_COMPARED: ("#777777", "s", False),
          REFERENCE: ("#000000", "D", True)}


class Dot(NamedTuple):
    """One plotted row of ``method_bars``, top to bottom."""

    label: str
    category: str


def category(significant, delta: float, higher_is_better: bool, compared: bool = True) -> str:
    """Which way a recipe differs from the reference: the paired test's verdict read in the
    metric's direction (``delta`` = recipe - reference)."""
    if not compared:
        return NOT_COMPARED
    if _missing(significant) or _missing(delta):
        return TOO_FEW
    if not bool(significant):
        return NO_DIFFERENCE
    return BETTER if (delta > 0) == higher_is_better else WORSE


@mpl.rc_context(_RC)
def method_bars(summary: pd.DataFrame, out_stem: Path, title: str, reference: str | None = None) -> list[Dot]:
    """Each student row's test mean with its 95% interval, best at the top, coloured by its
    paired comparison with the reference recipe. Returns the rows (label, category) in plotted
    order."""
    for column in ("task", "fingerprint"):
        _single(summary, column, "method_bars")
    metric, higher = _metric(summary, "method_bars")
    scale = _scale(metric)
    teacher = _flag(summary, "is_teacher", False)
    rows = summary.loc[~teacher]
    labels = [label for label, t in zip(_row_labels(summary), teacher) if not t]
    mean = _numbers(rows, f"test_{metric}_mean") * scale
    ci = np.nan_to_num(_numbers(rows, f"test_{metric}_ci95") * scale, nan=0.0)
    delta = _numbers(rows, "delta_mean")
    significant = list(rows["significant"]) if "significant" in rows else [None] * len(rows)
    compared = [not _missing(r) for r in rows["reference"]] if "reference" in rows else [True] * len(rows)
    is_reference = np.array([reference is not None and str(r) == reference for r in rows["recipe"]], dtype=bool)
    categories = [REFERENCE if is_reference[i] else category(significant[i], delta[i], higher, compared[i])
                  for i in range(len(rows))]
    # Best first; rows without a number last, in their given order.
    key = np.where(np.isnan(mean), np.inf, -mean if higher else mean)
    order = list(np.argsort(key, kind="stable"))

    fig = Figure(figsize=(7, 1.6 + 0.28 * max(len(rows), 1)), layout="constrained")
    ax = fig.add_subplot()
    # A dot plot, not bars: bars must start at zero to be read by their length, and from zero
    # a one-point difference between 91% and 92% is invisible. Dots with whiskers let the
    # value axis zoom on the data, which is where the differences (and the intervals) are.
    for pos, i in enumerate(order):
        colour, marker, filled = _STYLE[categories[i]]
        if not np.isnan(mean[i]):
            ax.errorbar(mean[i], pos, xerr=ci[i], fmt=marker, color=colour, ecolor=colour, elinewidth=1.2,
                        capsize=3, markersize=6, markerfacecolor=colour if filled else "white", zorder=3)
    ax.set_yticks(range(len(order)), labels=[labels[i] for i in order], parse_math=False)
    ax.set_ylim(len(order) - 0.5, -0.5)  # first row at the top
    handles = [Line2D([], [], color=_STYLE[c][0], marker=_STYLE[c][1], linestyle="none",
                      markerfacecolor=_STYLE[c][0] if _STYLE[c][2] else "white",
                      label=c if c in (REFERENCE, NOT_COMPARED) or reference is None else f"{c} vs {reference}")
               for c in _STYLE if c in categories]
    t_mean = _numbers(summary.loc[teacher], f"test_{metric}_mean") * scale
    for value in sorted(set(t_mean[np.isfinite(t_mean)])):
        ax.axvline(value, color=TEACHER, linestyle="--", lw=1, zorder=1)
    if np.isfinite(t_mean).any():
        handles.append(Line2D([], [], color=TEACHER, linestyle="--", lw=1, label="teacher"))
    for value in sorted(set(mean[is_reference & np.isfinite(mean)])):
        ax.axvline(value, color="#444444", linestyle=":", lw=1.2, zorder=1)
    if (is_reference & np.isfinite(mean)).any():
        handles.append(Line2D([], [], color="#444444", linestyle=":", label=f"reference: {reference}"))
    ax.set_xlabel(_quality_label("test", metric, higher) + ", mean and 95% CI over seeds", parse_math=False)
    ax.set_title(_wrap(title), parse_math=False)
    ax.grid(True, axis="x", alpha=0.3)
    if handles:
        _legend(ax, handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _save(fig, out_stem)
    return [Dot(labels[i], categories[i]) for i in order]


# --- 3. training curves --------------------------------------------------------------------

def epoch_stats(seeds: Sequence[Sequence[dict]], key: str) -> pd.DataFrame:
    """Mean, min and max of ``key`` per epoch over the seeds that recorded it (seeds may stop at
    different epochs; rows are aligned by their ``epoch``, not their position)."""
    values = [(row.get("epoch", i + 1), row.get(key)) for history in seeds for i, row in enumerate(history)]
    frame = pd.DataFrame(values, columns=["epoch", key])
    frame[key] = pd.to_numeric(frame[key], errors="coerce")
    return frame.dropna().groupby("epoch")[key].agg(["mean", "min", "max"])


def _loss_keys(seeds: Sequence[Sequence[dict]]) -> list[str]:
    keys = {k for history in seeds for row in history for k in row if k == "loss" or k.startswith("loss_")}
    return sorted(keys, key=lambda k: (k != "loss", k))  # the total first


@mpl.rc_context(_RC)
def training_curves(histories: dict[str, list[list[dict]]], metric: str, higher_is_better: bool,
                    out_stem: Path, title: str) -> list[str]:
    """The validation metric per epoch for every label (mean over seeds, min-max band, the
    kept epoch of each seed marked), then one small panel of loss terms per label. Returns the
    panel titles, the validation panel first."""
    labels = list(histories)
    scale = _scale(metric)
    ncols = min(4, max(1, len(labels)))
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(max(7.0, 2.6 * ncols + 1.5), 3.4 + 2.1 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.7] + [1] * nrows)
    colours = mpl.colormaps["tab10" if len(labels) <= 10 else "tab20"]

    main = fig.add_subplot(grid[0, :])
    main_title = "validation " + _quality_label("", metric, higher_is_better).strip()
    handles = []
    for k, label in enumerate(labels):
        colour = colours(k % colours.N)
        stats = epoch_stats(histories[label], f"val_{metric}") * scale
        if stats.empty:
            continue
        (line,) = main.plot(stats.index, stats["mean"], color=colour, lw=1.3, label=label)
        main.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.15, lw=0)
        handles.append(line)
        chosen = [(row.get("epoch", i + 1), row.get(f"val_{metric}")) for history in histories[label]
                  for i, row in enumerate(history) if row.get("chosen") and row.get(f"val_{metric}") is not None]
        if chosen:
            ex, ey = zip(*chosen)
            main.plot(ex, np.asarray(ey, dtype=float) * scale, linestyle="none", marker="o", markersize=5,
                      markerfacecolor="none", color=colour, zorder=3)
    if handles:
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="none", linestyle="none",
                              label="kept epoch (one per seed)"))
        _legend(main, handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                ncols=1 if len(handles) <= 12 else 2)
    main.set_title(main_title + ": mean over seeds, band = min to max", parse_math=False)
    main.set_xlabel("epoch")
    main.set_ylabel(f"val {metric}{', %' if is_fraction(metric) else ''}", parse_math=False)
    main.xaxis.set_major_locator(MaxNLocator(integer=True))
    main.grid(True, alpha=0.3)

    # One colour per loss term across all panels, so "kd" reads the same everywhere.
    terms = sorted({k for seeds in histories.values() for k in _loss_keys(seeds)}, key=lambda k: (k != "loss", k))
    term_colour = {k: ("black" if k == "loss" else mpl.colormaps["Dark2"](i % 8)) for i, k in enumerate(terms)}
    for k, label in enumerate(labels):
        ax = fig.add_subplot(grid[1 + k // ncols, k % ncols])
        _loss_panel(ax, histories[label], term_colour)
        ax.set_title(label, parse_math=False)
    fig.suptitle(_wrap(title), parse_math=False)
    _save(fig, out_stem)
    return [main_title, *labels]


def _loss_panel(ax, seeds: Sequence[Sequence[dict]], term_colour: dict[str, tuple]) -> None:
    handles, lows = [], []
    for key in _loss_keys(seeds):
        stats = epoch_stats(seeds, key)
        if stats.empty:
            continue
        # The total wide and pale underneath: with a single term the two coincide, and both show.
        total = key == "loss"
        (line,) = ax.plot(stats.index, stats["mean"], color=term_colour[key], lw=3 if total else 1,
                          alpha=0.3 if total else 1, zorder=1 if total else 2,
                          label="total" if total else key.removeprefix("loss_"))
        handles.append(line)
        lows.append(stats["mean"].min())
    if not handles:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes, color="#777777")
        return
    # Loss terms span decades (a KD term next to a cross-entropy); log shows both, when it can.
    if min(lows) > 0:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=6)
    ax.grid(True, alpha=0.3)
    _legend(ax, handles, fontsize=6, loc="best", framealpha=0.7)
