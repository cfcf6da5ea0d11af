"""The report's figures, on summary frames built by hand: the Pareto set drawn is the one we
know, the dot plot orders and colours recipes as their statistics say, the files are real
images with their labels as text."""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

import matplotlib.image as mpimg
import matplotlib.pyplot as plt  # only to ask for the figures left open: none should be
import pandas as pd
import pytest

from kdbench.report import figures
from kdbench.report.figures import (
    Dot,
    draw_pareto,
    draw_training_curves,
    epoch_stats,
    method_bars,
    pareto_figure,
    training_curves,
)

NAN = math.nan


def summary(rows: list[dict], metric: str = "accuracy", higher: bool = True) -> pd.DataFrame:
    """A summary frame with the interface's columns; each row gives recipe, quality, size and
    whatever it overrides."""
    base = {"experiment": "e", "task": "digits", "teacher": "big", "student": "small", "is_teacher": False,
            "n": 3, "materialized": True, "metric": metric, "higher_is_better": higher, "fingerprint": "fp1",
            "reference": "scratch", "delta_mean": NAN, "delta_ci95": NAN, "p_value": NAN, "significant": None,
            "rank": NAN}
    out = []
    for row in rows:
        row = dict(row)
        quality, size, ci = row.pop("q"), row.pop("size", NAN), row.pop("ci", NAN)
        out.append({**base, f"test_{metric}_mean": quality, f"test_{metric}_ci95": ci, f"test_{metric}_std": NAN,
                    "size_bytes_mean": size, **row})
    return pd.DataFrame(out)


def teacher(q: float, size: float) -> dict:
    return {"recipe": "teacher", "student": "-", "is_teacher": True, "q": q, "size": size, "reference": None}


def svg_text(stem) -> str:
    return (stem.parent / f"{stem.name}.svg").read_text(encoding="utf-8")


def assert_real_png(stem) -> None:
    image = mpimg.imread(stem.parent / f"{stem.name}.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.01, "the PNG is one flat colour"


# --- Pareto --------------------------------------------------------------------------------

def test_pareto_front_higher_is_better_with_the_teacher(tmp_path):
    rows = summary([
        {"recipe": "a", "q": 0.80, "size": 100, "ci": 0.01},
        {"recipe": "b", "q": 0.85, "size": 200, "ci": 0.02},
        {"recipe": "c", "q": 0.83, "size": 300},  # dominated by b
        {"recipe": "d", "q": 0.90, "size": 400},
        {"recipe": "e", "q": 0.88, "size": 500},  # dominated by d
        teacher(0.95, 1000),
    ])
    stem = tmp_path / "new" / "dir" / "pareto.size_bytes"
    # Rows come in any order; the front is returned in cost order.
    front = pareto_figure(rows.iloc[::-1], "size_bytes", "file size (bytes)", stem, "digits")
    assert front == ["a", "b", "d", "teacher"]
    assert_real_png(stem)
    svg = svg_text(stem)
    for label in ["a", "b", "d", "teacher", "test accuracy, % (higher is better)",
                  "file size (bytes) (log scale, lower is better)"]:
        assert f">{label}<" in svg
    assert "simulated" not in svg  # every row is materialized


def test_pareto_front_lower_is_better(tmp_path):
    # Read as higher-is-better, only "a" (best bpc number at the least cost) would be on it.
    rows = summary([
        {"recipe": "a", "q": 2.0, "size": 100},
        {"recipe": "b", "q": 1.8, "size": 200},
        {"recipe": "c", "q": 1.9, "size": 300},
        {"recipe": "d", "q": 1.5, "size": 400},
        {"recipe": "e", "q": 1.6, "size": 500},
    ], metric="bpc", higher=False)
    stem = tmp_path / "bpc"
    assert pareto_figure(rows, "size_bytes", "size", stem, "text") == ["a", "b", "d"]
    assert ">test bpc (lower is better)<" in svg_text(stem)


def test_pareto_skips_nan_rows_and_marks_simulated_ones(tmp_path):
    rows = summary([
        {"recipe": "a", "q": 0.80, "size": 100, "materialized": False},
        {"recipe": "b", "q": 0.85, "size": 200},
        {"recipe": "no-quality", "q": NAN, "size": 50},
        {"recipe": "no-cost", "q": 0.99, "size": NAN},
    ])
    stem = tmp_path / "nan"
    assert pareto_figure(rows, "size_bytes", "size", stem, "t") == ["a", "b"]
    svg = svg_text(stem)
    assert "no-quality" not in svg and "no-cost" not in svg
    assert ">simulated (no real saving)<" in svg
    assert ">size (log scale, lower is better)<" in svg  # a NaN cost does not turn the log scale off


def test_pareto_labels_students_and_keeps_odd_names_as_text(tmp_path):
    odd = "kd $T$_4 <&> 'q'"  # mathtext, XML specials and quotes
    rows = summary([
        {"recipe": odd, "student": "s1", "q": 0.80, "size": 100},
        {"recipe": "kd", "student": "s2", "q": 0.85, "size": 200},
    ])
    stem = tmp_path / "odd"
    front = pareto_figure(rows, "size_bytes", "size", stem, "title $x$")
    assert front == [f"{odd} (s1)", "kd (s2)"]
    svg = svg_text(stem)
    assert f">{escape(odd)} (s1)<" in svg  # drawn literally, not as mathematics
    assert ">title $x$<" in svg


@pytest.mark.parametrize("column", ["fingerprint", "task"])
def test_pareto_refuses_two_protocols_or_tasks(tmp_path, column):
    rows = summary([{"recipe": "a", "q": 0.8, "size": 1}, {"recipe": "b", "q": 0.9, "size": 2}])
    rows.loc[1, column] = "other"
    with pytest.raises(ValueError, match=column):
        pareto_figure(rows, "size_bytes", "size", tmp_path / "x", "t")
    assert not (tmp_path / "x.png").exists()


def _boxes(artists, renderer) -> list:
    return [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text()]


@pytest.mark.parametrize("crowd", [8, 24])
def test_pareto_names_touch_neither_each_other_nor_the_axis_texts(crowd):
    # A crowd of long names on nearly the same spot: drawn at a fixed offset they pile up on
    # each other, and the outermost run over the axis labels and the title.
    rows = summary([{"recipe": f"kd-variant-{i}+int8", "q": 0.90 + 0.0004 * i, "size": 1000 + 2 * i, "ci": 0.002}
                    for i in range(crowd)] + [teacher(0.95, 5000)])
    fig, front = draw_pareto(rows, "size_bytes", "file size (bytes)", "digits: accuracy against size")
    assert len(front) == crowd + 1
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    names = _boxes(ax.texts, renderer)
    assert len(names) >= min(crowd + 1, 8)  # most points are still named
    for k, box in enumerate(names):
        assert not any(box.overlaps(other) for other in names[k + 1:]), "two names overlap"
    frame = ax.get_window_extent(renderer)
    axis_texts = _boxes([ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(which="both"),
                         *ax.get_yticklabels(), *ax.get_legend().get_texts()], renderer)
    page = fig.bbox
    for box in names:
        assert not any(box.overlaps(other) for other in axis_texts), "a name covers an axis text"
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    # A point left unnamed is said to be; the teacher, named first, always keeps its name.
    assert (len(names) < crowd + 1) == (figures.LABELS_LEFT_OUT in legend)
    assert "teacher" in [t.get_text() for t in ax.texts]


def test_a_name_too_long_for_the_axes_is_left_out_without_squeezing_them(recwarn):
    rows = summary([{"recipe": "x" * 300, "q": 0.90, "size": 100}, {"recipe": "short", "q": 0.95, "size": 200}])
    fig, _ = draw_pareto(rows, "size_bytes", "size", "t")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["short"]
    assert figures.LABELS_LEFT_OUT in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_position().width > 0.4  # the axes keep their room
    assert not [w for w in recwarn if "constrained_layout" in str(w.message)]


def test_pareto_draws_no_interval_from_two_seeds():
    rows = summary([{"recipe": "two-seeds", "q": 0.80, "size": 100, "ci": 0.30, "n": 2},
                    {"recipe": "three-seeds", "q": 0.85, "size": 200, "ci": 0.01, "n": 3}])
    fig, _ = draw_pareto(rows, "size_bytes", "size", "t")
    whiskers = fig.axes[0].containers
    assert len(whiskers) == 1  # only the 3-seed row's interval
    _, caps, (bars,) = whiskers[0]
    assert bars.get_segments()[0][:, 1].tolist() == pytest.approx([84.0, 86.0])


# --- the dot plot against the reference ----------------------------------------------------

def comparison(higher: bool) -> pd.DataFrame:
    sign = 1 if higher else -1  # the same story told for a lower-is-better metric
    return summary([
        {"recipe": "scratch", "q": 0.880 * sign, "ci": 0.01},
        {"recipe": "kd", "q": 0.900 * sign, "ci": 0.01, "significant": True, "delta_mean": 0.02 * sign},
        {"recipe": "at", "q": 0.850 * sign, "ci": 0.01, "significant": True, "delta_mean": -0.03 * sign},
        {"recipe": "fitnet", "q": 0.881 * sign, "ci": 0.02, "significant": False, "delta_mean": 0.001 * sign},
        {"recipe": "tiny", "q": 0.870 * sign, "significant": NAN, "delta_mean": NAN, "n": 1},
        teacher(0.95 * sign, 1000),
    ], metric="accuracy" if higher else "loss", higher=higher)


def test_method_bars_order_and_categories(tmp_path):
    stem = tmp_path / "bars"
    dots = method_bars(comparison(True), stem, "digits", reference="scratch")
    assert dots == [Dot("kd", figures.BETTER), Dot("fitnet", figures.NO_DIFFERENCE),
                    Dot("scratch", figures.REFERENCE), Dot("tiny", figures.TOO_FEW), Dot("at", figures.WORSE)]
    assert_real_png(stem)
    svg = svg_text(stem)
    for text in ["teacher", "reference: scratch", "significantly better vs scratch",
                 "too few seeds to test vs scratch"]:
        assert f">{text}<" in svg


def test_method_bars_lower_is_better_reads_deltas_the_other_way(tmp_path):
    dots = method_bars(comparison(False), tmp_path / "bars", "t", reference="scratch")
    # Negated numbers: kd has the lowest loss and a negative delta, which is better here.
    assert [d.label for d in dots] == ["kd", "fitnet", "scratch", "tiny", "at"]
    assert dict(dots)["kd"] == figures.BETTER and dict(dots)["at"] == figures.WORSE


def test_method_bars_refuses_two_tasks(tmp_path):
    rows = comparison(True)
    rows.loc[0, "task"] = "cifar"
    with pytest.raises(ValueError, match="task"):
        method_bars(rows, tmp_path / "x", "t")


# --- training curves -----------------------------------------------------------------------

def history(epochs: int, start: float, kd: bool, chosen: int) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "lr": 0.1, "loss_ce": start / e, "val_accuracy": 0.5 + 0.1 * e, "seconds": 1.0}
        if kd:
            row["loss_kd"] = 0.1 * start / e
        row["loss"] = row["loss_ce"] + row.get("loss_kd", 0.0)
        if e == chosen:
            row["chosen"] = True
        rows.append(row)
    return rows


def test_training_curves_panels_and_no_leak(tmp_path):
    histories = {
        "kd": [history(4, 2.0, True, 4), history(4, 2.2, True, 3), history(3, 1.8, True, 3)],
        "_scratch $x$": [history(4, 2.0, False, 4), history(4, 2.1, False, 4), history(2, 2.3, False, 2)],
    }
    stem = tmp_path / "curves"
    titles = training_curves(histories, "accuracy", True, stem, "digits")
    assert titles == ["validation accuracy, % (higher is better)", "kd", "_scratch $x$"]
    assert_real_png(stem)
    svg = svg_text(stem)
    # A leading underscore would hide a legend entry; mathtext would rewrite the name.
    assert svg.count(">_scratch $x$<") == 1  # the panel title
    assert svg.count(">_scratch $x$ (coincides with kd)<") == 1  # the legend: same mean curve as kd
    assert ">kd<" in svg and ">total<" in svg
    assert plt.get_fignums() == []  # nothing left open in pyplot after any of the figures


def test_epoch_stats_align_seeds_of_different_lengths_by_epoch():
    seeds = [[{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 2.0}, {"epoch": 3, "x": 3.0}],
             [{"epoch": 2, "x": 4.0}, {"epoch": 3, "x": None}],  # starts late, one value missing
             [{"epoch": 1, "x": 5.0}]]
    stats = epoch_stats(seeds, "x")
    assert list(stats.index) == [1, 2, 3]
    assert stats["mean"].tolist() == [3.0, 3.0, 3.0]
    assert stats["min"].tolist() == [1.0, 2.0, 3.0] and stats["max"].tolist() == [5.0, 4.0, 3.0]


def test_identical_training_curves_both_show_and_say_so():
    same = [history(6, 2.0, True, 6), history(6, 2.1, True, 5)]
    histories = {"kd": same, "kd-copy": [list(h) for h in same], "other": [
        [{**row, "val_accuracy": row["val_accuracy"] - 0.05} for row in h] for h in same]}
    fig, _ = draw_training_curves(histories, "accuracy", True, "digits")
    main = fig.axes[0]
    curves = {line.get_label(): line for line in main.get_lines() if not line.get_label().startswith("_")}
    kd, copy = curves["kd"], curves["kd-copy (coincides with kd)"]
    assert (kd.get_ydata() == copy.get_ydata()).all()
    # Drawn exactly on top of each other, they still differ in dashes and markers, so the
    # lower curve shows through.
    assert kd.get_linestyle() != copy.get_linestyle() and kd.get_marker() != copy.get_marker()
    assert "other" in curves  # a different curve gets no note
    legend = [t.get_text() for t in main.get_legend().get_texts()]
    assert "kd-copy (coincides with kd)" in legend and "kd" in legend and "other" in legend
