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

import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from .stats import pareto_mask
from .tables import MIN_INTERVAL_SEEDS, interval_shown, is_fraction

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
#: Iterations of the label placement: a fixed count (not a time limit) so that a figure is
#: the same from run to run; a dozen names settle in well under that.
_LABEL_ITERATIONS = 200
#: Pixels kept free around a label when checking that it touches nothing (its white box).
_LABEL_PAD = 2.0
#: Legend note of a Pareto figure too crowded to name every point.
LABELS_LEFT_OUT = "some points left unnamed (no room)"


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


def _intervals(summary: pd.DataFrame, metric: str) -> np.ndarray:
    """The 95% half-widths of the test metric, NaN (no whisker) for rows of too few seeds: the
    tables show no interval for them either."""
    ci = _numbers(summary, f"test_{metric}_ci95")
    if "n" in summary:
        shown = np.array([not _missing(n) and interval_shown(n) for n in summary["n"]], dtype=bool)
        ci = np.where(shown, ci, np.nan)
    return ci


def _row_labels(summary: pd.DataFrame) -> list[str]:
    """The recipe (with what tells two of its configurations apart), plus the student (teacher)
    when the rows hold more than one."""
    teacher = _flag(summary, "is_teacher", False)
    students = set(summary.loc[~teacher, "student"]) if "student" in summary else set()
    teachers = set(summary.loc[teacher, "teacher"]) if "teacher" in summary else set()
    labels = []
    for is_teacher, (_, row) in zip(teacher, summary.iterrows()):
        if is_teacher:
            labels.append(f"teacher ({row['teacher']})" if len(teachers) > 1 else "teacher")
        else:
            recipe = row["label"] if isinstance(row.get("label"), str) else str(row["recipe"])
            labels.append(f"{recipe} ({row['student']})" if len(students) > 1 else recipe)
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
    fig, front = draw_pareto(summary, cost, cost_label, title)
    _save(fig, out_stem)
    return front


@mpl.rc_context(_RC)
def draw_pareto(summary: pd.DataFrame, cost: str, cost_label: str, title: str) -> tuple[Figure, list[str]]:
    """The figure of :func:`pareto_figure`, not saved, and the front's labels in cost order."""
    for column in ("task", "fingerprint"):
        _single(summary, column, "pareto_figure")
    metric, higher = _metric(summary, "pareto_figure")
    scale = _scale(metric)
    # Rows that ship one architecture share its pooled latency (see summary.architecture_keys).
    x_all = _numbers(summary, f"{cost}_pooled" if f"{cost}_pooled" in summary else f"{cost}_mean")
    y_all = _numbers(summary, f"test_{metric}_mean") * scale
    keep = np.isfinite(x_all) & np.isfinite(y_all)
    x, y = x_all[keep], y_all[keep]
    err = _intervals(summary, metric)[keep] * scale
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
    FigureCanvasAgg(fig)  # a renderer to measure the labels with, still without pyplot
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
    # Named in order of importance: when a label finds no free place, the later ones yield.
    named = ([i for i in range(len(x)) if teacher[i]] + [i for i in order if not teacher[i]]
             + [i for i in range(len(x)) if not front[i] and not teacher[i] and name_dominated])
    colours = ["black" if teacher[i] or front[i] else "#777777" for i in named]
    # Outside the axes: a legend inside would be one more thing for the labels to collide with.
    _legend(ax, handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    args = (x[named], y[named], [labels[i] for i in named], colours, x, y)
    names = place_labels(ax, *args)
    if drop_colliding(ax, names):
        # Say so in the legend. A longer legend narrows the axes, and the names' places were
        # found for the wider ones: place them again from the start on the final layout.
        handles.append(Line2D([], [], linestyle="none", label=LABELS_LEFT_OUT))
        ax.get_legend().remove()
        _legend(ax, handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        _remove_names(ax, names)
        drop_colliding(ax, place_labels(ax, *args))
    return fig, [labels[i] for i in order]


def place_labels(ax, x: np.ndarray, y: np.ndarray, texts: Sequence[str], colours: Sequence[str],
                 points_x: np.ndarray, points_y: np.ndarray) -> list[Text]:
    """Name the points (x, y), each name pushed away from the other names and from every
    plotted point (``points_x``, ``points_y``) and kept inside the axes, so that none covers
    the axis labels, the ticks or the title; a moved name is joined to its point by a thin
    line. Call it once everything else is drawn. Returns the names' artists."""
    if not len(texts):
        return []
    from adjustText import adjust_text  # imported here: only figures with named points need it

    # Out of the layout: the names go inside the axes, and a name too long to fit there must
    # not shrink the axes (it is dropped by drop_colliding instead).
    artists = [ax.text(px, py, text, fontsize=6.5, color=colour, parse_math=False, zorder=4, in_layout=False,
                       bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
               for px, py, text, colour in zip(x, y, texts, colours)]
    # Fix the view first: the joining lines are added as patches, which would otherwise widen
    # the autoscaled limits and move every point out from under its name.
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    quiet = logging.getLogger("adjustText")  # "labels too long" at every step; handled below
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        adjust_text(artists, x=points_x, y=points_y, ax=ax, expand=(1.15, 1.4), iter_lim=_LABEL_ITERATIONS,
                    ensure_inside_axes=True, arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.5})
    finally:
        quiet.setLevel(level)
    return artists


def drop_colliding(ax, names: Sequence[Text]) -> list[Text]:
    """Remove the names that still touch an earlier one or leave the axes, with their joining
    lines (adjustText's search can end with a crowd still touching); earlier names are kept
    first. Returns the names removed."""
    fig = ax.figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    kept, removed = [], []
    for name in names:
        # adjustText may leave a name flush with the frame: inside counts up to the frame.
        text = name.get_window_extent(renderer)
        fits = (inside.x0 - 0.5 <= text.x0 and text.x1 <= inside.x1 + 0.5
                and inside.y0 - 0.5 <= text.y0 and text.y1 <= inside.y1 + 0.5)
        box = text.padded(_LABEL_PAD)
        if fits and not any(box.overlaps(other) for other in kept):
            kept.append(box)
        else:
            removed.append(name)
    _remove_names(ax, removed)
    return removed


def _remove_names(ax, names: Sequence[Text]) -> None:
    """Remove names drawn by :func:`place_labels` and the lines that join them to their points."""
    for patch in list(ax.patches):
        if any(getattr(patch, "patchA", None) is name for name in names):
            patch.remove()
    for name in names:
        if name.axes is not None:
            name.remove()


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
    ci = np.nan_to_num(_intervals(rows, metric) * scale, nan=0.0)
    delta = _numbers(rows, "delta_mean")
    significant = list(rows["significant"]) if "significant" in rows else [None] * len(rows)
    compared = [not _missing(r) for r in rows["reference"]] if "reference" in rows else [True] * len(rows)
    if "uncontrolled" in rows:  # extra training without an equal-budget control: not compared
        compared = [c and r is not True for c, r in zip(compared, rows["uncontrolled"], strict=True)]
    # The reference named, and any row that is its own (each row has its own reference).
    names = rows["label"] if "label" in rows else rows["recipe"]
    own = ([isinstance(r, str) and r == name for r, name in zip(rows["reference_label"], names, strict=True)]
           if "reference_label" in rows else [False] * len(rows))
    is_reference = np.array([(reference is not None and str(r) == reference) or o
                             for r, o in zip(rows["recipe"], own, strict=True)], dtype=bool)
    if reference is None and "reference_label" in rows:  # rows with references of their own: named
        labels = [lab if is_reference[i] or not isinstance(r, str) else f"{lab} vs {r}"
                  for i, (lab, r) in enumerate(zip(labels, rows["reference_label"], strict=True))]
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
        handles.append(Line2D([], [], color="#444444", linestyle=":",
                              label=f"reference: {reference}" if reference else "reference"))
    ax.set_xlabel(_quality_label("test", metric, higher)
                  + f", mean and 95% CI over seeds (CI from {MIN_INTERVAL_SEEDS} seeds)", parse_math=False)
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


#: Line styles and markers cycled over the recipes, so that a curve drawn under an identical
#: one (two recipes with the same history) still shows through: dashes and markers differ.
_LINESTYLES = ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2))]
_MARKERS = ["s", "^", "v", "D", "P", "X", "<", ">"]
#: Markers per curve: few enough to read the line, staggered so coinciding curves alternate.
_MARKS_PER_CURVE = 8


@mpl.rc_context(_RC)
def training_curves(histories: dict[str, list[list[dict]]], metric: str, higher_is_better: bool,
                    out_stem: Path, title: str) -> list[str]:
    """The validation metric per epoch for every label (mean over seeds, min-max band, the
    kept epoch of each seed marked), then one small panel of loss terms per label. Returns the
    panel titles, the validation panel first."""
    fig, titles = draw_training_curves(histories, metric, higher_is_better, title)
    _save(fig, out_stem)
    return titles


@mpl.rc_context(_RC)
def draw_training_curves(histories: dict[str, list[list[dict]]], metric: str, higher_is_better: bool,
                         title: str) -> tuple[Figure, list[str]]:
    """The figure of :func:`training_curves`, not saved, and its panel titles."""
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
    drawn: dict[str, pd.Series] = {}
    for k, label in enumerate(labels):
        colour = colours(k % colours.N)
        stats = epoch_stats(histories[label], f"val_{metric}") * scale
        if stats.empty:
            continue
        same = next((other for other, curve in drawn.items() if _coincide(curve, stats["mean"])), None)
        drawn[label] = stats["mean"]
        step = max(1, math.ceil(len(stats) / _MARKS_PER_CURVE))
        (line,) = main.plot(stats.index, stats["mean"], color=colour, lw=1.3,
                            linestyle=_LINESTYLES[k % len(_LINESTYLES)], marker=_MARKERS[k % len(_MARKERS)],
                            markersize=3.5, markevery=(k % step, step),
                            label=label if same is None else f"{label} (coincides with {same})")
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
    return fig, [main_title, *labels]


def _coincide(a: pd.Series, b: pd.Series) -> bool:
    """Two mean curves over the same epochs that no reader could tell apart (equal up to
    rounding): the later one is drawn exactly over the earlier."""
    if len(a) != len(b) or not (a.index == b.index).all():
        return False
    size = max(float(np.nanmax(np.abs(a.to_numpy()))), 1e-12)
    return bool(np.allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-6 * size, equal_nan=True))


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
