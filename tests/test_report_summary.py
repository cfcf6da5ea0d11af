"""The summary frame on constructed results: intervals, paired comparisons, relative figures,
ranks, Pareto flags, and protocol fingerprints that keep incomparable rows apart."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from kdbench.report import stats
from kdbench.report.document import Paragraph, Table
from kdbench.report.protocol import differences, fingerprint, protocol
from kdbench.report.summary import aggregate_ranks, frame, latest_configs, summarize
from kdbench.report.tables import leaderboard_blocks
from kdbench.store import Record

BUDGET = {"epochs": 60, "optimizer": "adam", "lr": 0.001, "batch_size": 64}
MEASURE = {"calibration_size": 256, "eval_batch_size": 512, "latency_batch_sizes": [1, 256],
           "latency_repeats": 15}


def record(recipe: str, seed: int, metrics: dict, *, role: str = "student", experiment: str = "exp",
           task: str = "digits", teacher: str = "mlp(hidden=[64])", student: str = "mlp(hidden=[16])",
           budget: dict | None = None, threads: int = 1, finished: str = "2026-01-01T00:00:00") -> Record:
    config = {"task": {"name": task, "split_seed": 0}, "recipe": recipe, "seed": seed,
              "measure": MEASURE, "budget": budget or BUDGET, "task_plugin": task,
              "plugins": {task: "0.1.0"}, "experiment": experiment}
    if role == "teacher":
        student, recipe = "-", "teacher"
    return Record(cell_id=f"{experiment}-{task}-{recipe}-{seed}-{student}", experiment=experiment,
                  role=role, task=task, teacher=teacher, student=student, recipe=recipe, seed=seed,
                  status="done", metrics={"materialized": True, **metrics}, config=config, stages=[],
                  environment={"cpu": "Test CPU", "threads": threads}, started_at=finished,
                  finished_at=finished)


def grid(accuracies: dict[str, list[float]], sizes: dict[str, float] | None = None, **kw) -> list[Record]:
    """A teacher row and one row per (recipe, seed) with the given test accuracies."""
    out = []
    for recipe, values in accuracies.items():
        for seed, acc in enumerate(values):
            size = (sizes or {}).get(recipe, 1000.0)
            metrics = {"test_accuracy": acc, "size_bytes": size, "params": size / 4,
                       "latency_b1_ms": size / 1000}
            out.append(record(recipe, seed, metrics, role="teacher" if recipe == "teacher" else "student", **kw))
    return out


def row(summary, recipe, **match):
    hit = summary[summary.recipe == recipe]
    for key, value in match.items():
        hit = hit[hit[key] == value]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def test_mean_std_and_t_interval_per_figure():
    s = summarize(frame(grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.91, 0.92]})))
    scratch = row(s, "scratch")
    assert scratch.n == 3 and scratch.test_accuracy_mean == pytest.approx(0.91)
    assert scratch.test_accuracy_std == pytest.approx(0.01)
    assert scratch.test_accuracy_ci95 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert row(s, "teacher").is_teacher and not scratch.is_teacher


def test_paired_comparison_against_scratch_with_holm_and_marks():
    s = summarize(frame(grid({
        "teacher": [0.97, 0.98, 0.99],
        "scratch": [0.90, 0.93, 0.91],
        "kd": [0.92, 0.951, 0.929],      # +0.02, +0.021, +0.019: consistent
        "noisy": [0.95, 0.90, 0.93],     # +0.05, -0.03, +0.02: not
    })))
    kd, noisy = row(s, "kd"), row(s, "noisy")
    assert kd.reference == "scratch" and kd.delta_mean == pytest.approx(0.02)
    expected = stats.paired({0: 0.92, 1: 0.951, 2: 0.929}, {0: 0.90, 1: 0.93, 2: 0.91})
    assert kd.p_value == pytest.approx(expected.p_value)
    assert kd.p_holm == pytest.approx(min(1.0, 2 * kd.p_value))  # two rows compared with scratch
    assert kd.significant is True and noisy.significant is False
    assert math.isnan(row(s, "scratch").delta_mean)  # the reference itself


def test_two_seeds_are_reported_but_never_marked_significant():
    s = summarize(frame(grid({"scratch": [0.90, 0.91], "kd": [0.95, 0.96]})))
    kd = row(s, "kd")
    assert kd.delta_mean == pytest.approx(0.05) and kd.pairs == 2
    assert kd.significant is None
    table = next(b for b in leaderboard_blocks(s) if isinstance(b, Table))
    kd_cells = next(r for r in table.rows if r[0].split()[0] == "kd")
    assert "(n=2)" in " ".join(kd_cells) and "✓" not in " ".join(kd_cells)


def test_intervals_are_shown_from_three_seeds_only():
    two = summarize(frame(grid({"teacher": [0.97, 0.98], "scratch": [0.90, 0.91], "kd": [0.95, 0.97]})))
    table = next(b for b in leaderboard_blocks(two) if isinstance(b, Table))
    ci, delta = table.columns.index("95% CI"), next(i for i, c in enumerate(table.columns) if c.startswith("Δ"))
    for cells in table.rows:
        assert cells[ci] == "-"  # a 2-seed t interval is ±12.7 standard errors: not printed
    kd = next(r for r in table.rows if r[0] == "kd")
    assert kd[delta] == "+5.50 (n=2)"  # the difference, without its interval
    assert "Intervals need at least 3 seeds" in " ".join(table.notes)
    # The CSV and JSON keep the computed numbers, beside n and pairs that qualify them.
    assert row(two, "kd").test_accuracy_ci95 == pytest.approx(12.706205 * 0.01, rel=1e-4)
    assert row(two, "kd").delta_ci95 > 0 and row(two, "kd").pairs == 2

    three = summarize(frame(grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.90, 0.91, 0.92],
                                  "kd": [0.95, 0.97, 0.96]})))
    table = next(b for b in leaderboard_blocks(three) if isinstance(b, Table))
    kd = next(r for r in table.rows if r[0] == "kd")
    assert re.fullmatch(r"\[\d+\.\d\d, \d+\.\d\d\]", kd[ci])
    assert re.fullmatch(r"\+5\.00 \[\+\d\.\d\d, \+\d\.\d\d\]( ✓)?", kd[delta])


def test_reference_falls_back_to_dense_then_the_teacher_and_can_be_chosen():
    s = summarize(frame(grid({"teacher": [0.97, 0.98, 0.99], "dense": [0.97, 0.98, 0.99],
                              "int8": [0.96, 0.975, 0.985]})))
    assert row(s, "int8").reference == "dense"
    s = summarize(frame(grid({"teacher": [0.97, 0.98, 0.99], "int8": [0.96, 0.975, 0.985]})))
    assert row(s, "int8").reference == "teacher"
    assert row(s, "int8").delta_mean == pytest.approx(-0.0067, abs=1e-4)
    s = summarize(frame(grid({"teacher": [0.97, 0.98, 0.99], "scratch": [0.9, 0.9, 0.9],
                              "kd": [0.92, 0.92, 0.92]})), reference="teacher")
    assert row(s, "kd").reference == "teacher" and row(s, "kd").delta_mean == pytest.approx(-0.06)


def test_relative_figures_against_teacher_and_reference():
    s = summarize(frame(grid({"teacher": [0.96, 0.96, 0.96], "scratch": [0.90, 0.90, 0.90],
                              "small": [0.84, 0.84, 0.84]},
                             sizes={"teacher": 8000.0, "scratch": 1000.0, "small": 250.0})))
    small = row(s, "small")
    assert small.retained_pct == pytest.approx(100 * 0.84 / 0.96)
    assert small.bytes_ratio_teacher == pytest.approx(32.0)
    assert small.params_ratio_teacher == pytest.approx(32.0)
    assert small.bytes_ratio_reference == pytest.approx(4.0)
    assert small.speedup_reference_b1 == pytest.approx(4.0)  # latency is size/1000 here


def test_lower_is_better_metrics_rank_and_retain_the_right_way():
    recs = []
    for recipe, bpc in (("teacher", 2.5), ("scratch", 2.9), ("kd", 2.8), ("bad", 3.1)):
        for seed in range(3):
            recs.append(record(recipe, seed, {"test_bpc": bpc + seed * 0.01, "size_bytes": 100.0},
                               role="teacher" if recipe == "teacher" else "student", task="shakespeare-char"))
    s = summarize(frame(recs))
    assert row(s, "kd").metric == "bpc" and not row(s, "kd").higher_is_better
    assert [row(s, r)["rank"] for r in ("kd", "scratch", "bad")] == [1.0, 2.0, 3.0]
    assert row(s, "kd").retained_pct == pytest.approx(100 * 2.51 / 2.81)


def test_pareto_flags_over_quality_and_size():
    s = summarize(frame(grid({"teacher": [0.98] * 3, "scratch": [0.90] * 3, "tiny": [0.85] * 3,
                              "worse": [0.80] * 3},
                             sizes={"teacher": 8000.0, "scratch": 1000.0, "tiny": 100.0, "worse": 500.0})))
    front = set(s[s.pareto_size_bytes].recipe)
    assert front == {"teacher", "scratch", "tiny"}


def test_rows_of_different_protocols_are_never_ranked_together():
    # The same recipes in two experiments whose budgets differ (20 vs 60 epochs).
    short = grid({"teacher": [0.97] * 3, "scratch": [0.80, 0.81, 0.82], "kd": [0.85, 0.86, 0.87]},
                 experiment="short", budget={**BUDGET, "epochs": 20})
    long = grid({"teacher": [0.97] * 3, "scratch": [0.90, 0.91, 0.92], "kd": [0.88, 0.89, 0.90]},
                experiment="long")
    s = summarize(frame(short + long))
    assert s.fingerprint.nunique() == 2
    # Each protocol ranks its own rows: kd is first in one, scratch in the other.
    assert row(s, "kd", experiment="short")["rank"] == 1 and row(s, "scratch", experiment="long")["rank"] == 1
    blocks = leaderboard_blocks(s)
    tables = [b for b in blocks if isinstance(b, Table) and not b.caption.startswith("Recipes")]
    assert len(tables) == 2
    why = next(b for b in blocks if isinstance(b, Paragraph)).text
    assert "budget.epochs: 60 vs 20" in why or "budget.epochs: 20 vs 60" in why
    assert "never ranked together" in why


def test_latency_on_another_machine_is_another_protocol():
    a = record("kd", 0, {"test_accuracy": 0.9}, threads=1)
    b = record("kd", 0, {"test_accuracy": 0.9}, threads=8)
    assert fingerprint(protocol(a)) != fingerprint(protocol(b))
    assert differences(protocol(a), protocol(b)) == ["latency.threads: 1 vs 8"]


def test_teacher_rows_join_every_protocol_of_their_students():
    recs = grid({"teacher": [0.97] * 2, "scratch": [0.9] * 2}) + [
        record("scratch", s, {"test_accuracy": 0.9}, threads=4) for s in range(2)]
    s = summarize(frame(recs))
    teachers = s[s.is_teacher]
    assert len(teachers) == 2 and set(teachers.fingerprint) == set(s.fingerprint)


def test_aggregate_rank_needs_every_group():
    recs = (grid({"a": [0.9] * 3, "b": [0.8] * 3, "c": [0.7] * 3}, task="t1")
            + grid({"a": [0.5] * 3, "b": [0.6] * 3}, task="t2"))
    agg = aggregate_ranks(summarize(frame(recs)))
    by = {r.recipe: r for r in agg.itertuples()}
    assert by["a"].mean_rank == pytest.approx(1.5) and by["b"].mean_rank == pytest.approx(1.5)
    assert math.isnan(by["c"].mean_rank) and by["c"].groups == 1 and by["c"].of == 2


def test_latest_configuration_wins_and_the_rest_is_noted():
    old = record("kd", 0, {"test_accuracy": 0.5}, budget={**BUDGET, "epochs": 1}, finished="2026-01-01T00:00:00")
    new = record("kd", 0, {"test_accuracy": 0.9}, finished="2026-02-01T00:00:00")
    kept, notes = latest_configs([old, new])
    assert kept == [new] and "left out 1 result" in notes[0]


def test_every_kdbench_package_ships_in_the_wheel():
    root = Path(__file__).parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(root).parts) for p in (root / "kdbench").rglob("__init__.py")}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages"


def test_epoch_figures_are_dropped_where_a_compression_stage_ends_the_recipe():
    trained = record("kd", 0, {"test_accuracy": 0.9, "last_epoch_test_accuracy": 0.89})
    trained.stages = [{"op": "distill"}]
    quantized = record("kd+int8", 0, {"test_accuracy": 0.88, "last_epoch_test_accuracy": 0.89})
    quantized.stages = [{"op": "distill"}, {"op": "quantize"}]
    df = frame([trained, quantized]).set_index("recipe")
    assert df.loc["kd", "last_epoch_test_accuracy"] == 0.89
    assert math.isnan(df.loc["kd+int8", "last_epoch_test_accuracy"])


def test_latency_front_ignores_noise_between_identical_architectures():
    recs = []
    for recipe, acc, ms in (("scratch", 0.90, 0.9), ("kd", 0.92, 1.0)):
        for seed in range(3):
            recs.append(record(recipe, seed, {"test_accuracy": acc, "latency_b1_ms": ms, "params": 100.0,
                                              "nonzero_params": 100.0, "size_bytes": 400.0, "flops": 200.0}))
    s = summarize(frame(recs))
    assert set(s[s.pareto_latency_b1_ms].recipe) == {"kd"}


def test_rows_of_one_architecture_share_a_pooled_latency():
    recs = []
    for recipe, ms in (("a", 0.5), ("b", 1.5), ("c", 0.6)):
        for seed in range(3):
            recs.append(record(recipe, seed, {"test_accuracy": 0.9, "latency_b1_ms": ms, "params": 100.0,
                                              "nonzero_params": 100.0, "size_bytes": 400.0, "flops": 200.0}))
    s = summarize(frame(recs))
    assert list(s.latency_b1_ms_pooled) == [0.6, 0.6, 0.6]
    assert list(s.latency_b1_ms_mean) == pytest.approx([0.5, 1.5, 0.6])  # each row keeps its own
