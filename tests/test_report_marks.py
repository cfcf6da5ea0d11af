"""What a leaderboard must say about a row before it compares it (PROTOCOL rules 1, 4 and 6):
rows still improving are marked everywhere and in every finding; rows whose task metric does
not apply show their main figure and are left out of ranks, tests, fronts and findings on it;
speed claims come from paired ratios, and simulated compression has the dense model's speed."""

from __future__ import annotations

import math

import pytest

from kdbench.report.document import Paragraph, Table
from kdbench.report.folder import findings
from kdbench.report.summary import frame, summarize
from kdbench.report.tables import STILL_IMPROVING_NOTE, leaderboard_blocks
from kdbench.report.terminal import terminal_view
from test_report_summary import record, row

ACCURACY = {"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.93, 0.91], "kd": [0.92, 0.951, 0.929],
            "noisy": [0.95, 0.90, 0.93]}


def records(accuracies: dict[str, list[float]], extra: dict[str, list[dict]] | None = None, **kw):
    """A teacher row and one row per (recipe, seed); ``extra`` adds metrics per seed."""
    out = []
    for recipe, values in accuracies.items():
        for seed, acc in enumerate(values):
            metrics = {"test_accuracy": acc, **((extra or {}).get(recipe, [{}] * 3)[seed])}
            out.append(record(recipe, seed, metrics, role="teacher" if recipe == "teacher" else "student", **kw))
    return out


def table_of(summary) -> Table:
    return next(b for b in leaderboard_blocks(summary) if isinstance(b, Table))


def cells_of(table: Table, recipe: str) -> list[str]:
    return next(r for r in table.rows if r[table.columns.index("recipe")].split()[0] == recipe)


def findings_text(summary) -> str:
    return " ".join(b.text for b in findings(summary) if isinstance(b, Paragraph))


# ---------------------------------------------------------------- 1. converged or marked
def still_improving_grid():
    one_seed_climbing = [{"converged": 1.0}, {"converged": 0.0}, {"converged": 1.0}]
    converged = [{"converged": 1.0}] * 3
    return records(ACCURACY, {"teacher": converged, "scratch": converged, "kd": one_seed_climbing,
                              "noisy": converged})


def test_a_row_with_a_seed_still_improving_is_marked_in_the_wide_table():
    s = summarize(frame(still_improving_grid()))
    assert row(s, "kd").still_improving and not row(s, "scratch").still_improving
    assert row(s, "kd").converged_mean == pytest.approx(2 / 3)  # the share of converged seeds, in the CSV
    table = table_of(s)
    assert "↗" in cells_of(table, "kd")[table.columns.index("recipe")]
    assert "↗" not in cells_of(table, "scratch")[table.columns.index("recipe")]
    assert STILL_IMPROVING_NOTE in table.notes
    # Rows stored before convergence was measured carry no mark and no note.
    plain = table_of(summarize(frame(records(ACCURACY))))
    assert not any("↗" in " ".join(r) for r in plain.rows) and STILL_IMPROVING_NOTE not in plain.notes


def test_the_teacher_row_is_marked_too():
    recs = records(ACCURACY, {"teacher": [{"converged": 0.0}] * 3})
    table = table_of(summarize(frame(recs)))
    assert cells_of(table, "teacher")[table.columns.index("recipe")] == "teacher ↗"


def test_the_terminal_view_marks_the_row_and_explains_the_mark():
    view = terminal_view(summarize(frame(still_improving_grid())))
    kd = next(line for line in view.splitlines() if line.startswith("kd "))
    assert kd.rstrip().endswith("↗")
    assert "↗ still improving:" in view
    assert "↗" not in next(line for line in view.splitlines() if line.startswith("scratch "))


def test_findings_never_name_a_row_still_improving_without_saying_so():
    s = summarize(frame(still_improving_grid()))
    assert row(s, "kd").significant is True
    text = findings_text(s)
    assert "`kd` (still improving at the end of its training) vs `scratch` (+2.00 points)" in text
    assert "best accuracy from `kd` (still improving at the end of its training);" in text
    assert "A recipe marked still improving" in text
    # The reference still improving: every difference to it says so.
    recs = records(ACCURACY, {"scratch": [{"converged": 0.0}] * 3})
    text = findings_text(summarize(frame(recs)))
    assert "`kd` vs `scratch` (still improving at the end of its training) (+2.00 points)" in text
    # Nothing marked: nothing said.
    assert "still improving" not in findings_text(summarize(frame(records(ACCURACY))))


# ---------------------------------------------------------------- 4. the metric must apply
def untrained_grid(declared: bool):
    """scratch, kd, noisy and ``embed``, whose head was never trained in one seed (chance
    accuracy); ``declared``: its recipe reports probe_accuracy."""
    recs = records({**ACCURACY, "embed": [0.2, 0.21, 0.19]},
                   {"embed": [{"head_trained": 0.0, "probe_accuracy": p, "size_bytes": 10.0}
                              for p in (0.80, 0.82, 0.81)]})
    for r in recs:
        r.metrics.setdefault("size_bytes", 1000.0)
        if r.recipe == "embed" and declared:
            r.config["report"] = "probe_accuracy"
    return recs


@pytest.mark.parametrize("declared", [True, False])
def test_a_row_whose_metric_does_not_apply_is_not_ranked_or_tested_on_it(declared):
    s = summarize(frame(untrained_grid(declared)))
    embed = row(s, "embed")
    assert not embed.metric_applies and embed.head_untrained
    assert math.isnan(embed["rank"]) and math.isnan(embed.p_value) and embed.pairs == 0
    assert embed.significant is None and math.isnan(embed.retained_pct)
    assert not embed.pareto_size_bytes  # the cheapest file, but its accuracy means nothing
    # The others are ranked and Holm-corrected as if it were not there.
    without = summarize(frame([r for r in untrained_grid(declared) if r.recipe != "embed"]))
    for recipe in ("kd", "noisy", "scratch"):
        assert row(s, recipe)["rank"] == row(without, recipe)["rank"]
    assert row(s, "kd").p_holm == pytest.approx(row(without, "kd").p_holm)
    assert row(s, "kd").p_holm == pytest.approx(min(1.0, 2 * row(s, "kd").p_value))  # a family of two
    # Compared on a figure that does apply, it takes part.
    probe = summarize(frame(untrained_grid(declared)), metric="teacher_agreement")
    assert row(probe, "embed").compared == "teacher_agreement"


def test_a_declared_main_figure_is_shown_in_its_place_with_a_note():
    s = summarize(frame(untrained_grid(True)))
    assert row(s, "embed").main_figure == "probe_accuracy"
    table = table_of(s)
    cells = cells_of(table, "embed")
    value = next(c for c in table.columns if c.startswith("accuracy"))
    assert cells[table.columns.index("recipe")] == "embed [probe_accuracy]"
    assert cells[table.columns.index(value)] == "81.00 ± 1.00"  # the probe's, not 20 % chance
    assert cells[table.columns.index("rank")] == "-" and cells[table.columns.index("p")] == "-"
    assert next(c for c in cells if c.startswith(("-", "("))) == "-"  # no Δ
    note = next(n for n in table.notes if n.startswith("embed:"))
    assert "accuracy does not apply (training never updated its head" in note
    assert "shows probe_accuracy instead" in note and "left out of the ranks, the tests" in note
    numbers = table.numbers[table.rows.index(cells)]
    assert numbers[table.columns.index(value)] == pytest.approx(0.81)

    view = terminal_view(s)
    line = next(x for x in view.splitlines() if x.startswith("embed [probe_accuracy]"))
    assert "81.00 ± 1.00" in line and "20.00" not in line
    assert "embed: accuracy does not apply" in view.replace("\n  ", " ")


def test_an_untrained_head_without_a_declared_figure_shows_nothing_on_the_metric():
    table = table_of(summarize(frame(untrained_grid(False))))
    cells = cells_of(table, "embed")
    assert cells[table.columns.index("recipe")] == "embed [untrained head]"
    assert cells[table.columns.index(next(c for c in table.columns if c.startswith("accuracy")))] == "-"
    assert any("report: probe_accuracy" in n for n in table.notes)


@pytest.mark.parametrize("declared", [True, False])
def test_findings_leave_the_row_out_and_say_so(declared):
    text = findings_text(summarize(frame(untrained_grid(declared))))
    assert "not ranked or tested on accuracy, which does not apply to them (see the table's notes): `embed`" in text
    assert "too few seeds" not in text  # it is not counted as untested either
    assert "`embed` (" not in text.split("not ranked")[0]


# ---------------------------------------------------------------- 6. speed from paired ratios
def speed_grid():
    """scratch and kd (the dense student), int8 (materialized: same parameters and FLOPs, a
    quarter of the weight bytes, slower here), masked (simulated pruning: timed fast by noise,
    the best accuracy) and csr (simulated, its file really smaller)."""
    dense = {"params": 100.0, "flops": 200.0, "nonzero_params": 100.0, "size_bytes": 400.0, "weight_bytes": 400.0}
    rows = {
        "scratch": ({**dense, "latency_b1_ms": 1.0}, True, 0.90),
        "kd": ({**dense, "latency_b1_ms": 1.2}, True, 0.91),
        "int8": ({**dense, "weight_bytes": 100.0, "size_bytes": 150.0, "latency_b1_ms": 3.0}, True, 0.89),
        "masked": ({**dense, "nonzero_params": 50.0, "latency_b1_ms": 0.4}, False, 0.95),
        "csr": ({**dense, "nonzero_params": 10.0, "size_bytes": 120.0, "latency_b1_ms": 0.9}, False, 0.92),
        "orphan": ({**dense, "params": 70.0, "latency_b1_ms": 0.3}, False, 0.80),
    }
    return [record(recipe, seed, {**metrics, "test_accuracy": acc + 0.001 * seed, "materialized": real})
            for recipe, (metrics, real, acc) in rows.items() for seed in range(3)]


def test_simulated_rows_take_the_dense_models_latency_and_are_never_on_its_front():
    s = summarize(frame(speed_grid()))
    # The dense model: the materialized rows of the same parameters and FLOPs with the most
    # weight bytes (scratch and kd, pooled: 1.1), not the int8 row.
    assert row(s, "scratch").latency_b1_ms_pooled == pytest.approx(1.1)
    assert row(s, "masked").latency_b1_ms_pooled == pytest.approx(1.1)
    assert row(s, "csr").latency_b1_ms_pooled == pytest.approx(1.1)
    assert math.isnan(row(s, "orphan").latency_b1_ms_pooled)  # no dense model measured: left out
    assert row(s, "masked").latency_b1_ms_mean == pytest.approx(0.4)  # its own timing is kept
    front = set(s[s.pareto_latency_b1_ms].recipe)
    assert not front & {"masked", "csr", "orphan"}
    assert front == {"kd"}  # and a simulated row pushes no real one off it
    # The size front is the files' own: a CSR file that really is smaller is on it (and the
    # masked row, the most accurate at the dense file's size).
    assert set(s[s.pareto_size_bytes].recipe) == {"csr", "masked"}
    table = table_of(s)
    assert "◆" in cells_of(table, "csr")[table.columns.index("recipe")]
    assert "◆" not in cells_of(table, "orphan")[table.columns.index("recipe")]
    assert "never on the latency front" in " ".join(table.notes)


def test_no_speed_ratio_that_is_not_paired_reads_as_paired():
    sizes = {"teacher": 8000.0, "scratch": 1000.0, "small": 250.0}
    recs = []
    for recipe, size in sizes.items():
        for seed in range(3):
            recs.append(record(recipe, seed, {"test_accuracy": 0.9, "size_bytes": size, "params": size / 4,
                                              "latency_b1_ms": size / 1000, "speedup_b1": 8000 / size},
                               role="teacher" if recipe == "teacher" else "student"))
    s = summarize(frame(recs))
    table = table_of(s)
    assert "× ref b1 (unpaired)" in table.columns and "× teacher b1" in table.columns
    assert "× ref b1 (unpaired): the same against the reference row (a ratio of medians" in " ".join(table.notes)
    # The terminal shows only the paired ratio, timed back to back.
    view = terminal_view(s)
    assert "× teacher b1" in view and "× ref" not in view
