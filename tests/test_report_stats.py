"""The statistics of the reports, on data with answers known in closed form."""

from __future__ import annotations

import math

import pytest

from kdbench.report import stats


def test_t_interval_uses_students_t_not_the_normal():
    # n = 3, sd = 1: half-width = t(0.975, df=2) * 1 / sqrt(3); t(0.975, 2) = 4.302653.
    assert stats.t_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert stats.t_halfwidth([5.0, 5.0]) == 0.0
    assert math.isnan(stats.t_halfwidth([1.0]))
    assert stats.t_halfwidth([1.0, 2.0, 3.0, math.nan]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_paired_test_pairs_by_seed_and_matches_the_closed_form():
    # Differences 0.5, 1.0, 1.5 (seed 3 has no partner): mean 1, sd 0.5, t = 2*sqrt(3), df = 2.
    # For df = 2 the two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12/14).
    result = stats.paired({0: 1.0, 1: 2.0, 2: 3.5, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert result.n == 3 and result.mean == pytest.approx(1.0)
    assert result.p_value == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-6)
    assert result.ci95 == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-6)
    assert result.significant is False  # p = 0.074


def test_a_consistent_difference_is_significant_and_two_seeds_claim_nothing():
    sure = stats.paired({0: 1.10, 1: 1.21, 2: 1.32}, {0: 1.0, 1: 1.1, 2: 1.2})
    assert sure.significant is True and sure.p_value < 0.01
    few = stats.paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 1.0})
    assert few.significant is None and few.n == 2 and "too few" in few.verdict
    assert not math.isnan(few.p_value)  # reported, just not marked
    none = stats.paired({0: 1.0}, {1: 1.0})
    assert none.n == 0 and none.significant is None


def test_identical_differences_do_not_divide_by_zero():
    same = stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert same.mean == 0 and same.p_value == 1.0 and same.significant is False
    shifted = stats.paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert shifted.p_value == 0.0 and shifted.significant is True


def test_holm_adjusts_in_order_and_keeps_monotone():
    # Sorted 0.01, 0.03, 0.04 -> 3*0.01, max(.03, 2*0.03), max(.06, 1*0.04).
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = stats.holm([0.5, math.nan, 0.9])
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1]) and out[2] == pytest.approx(1.0)


def test_pareto_set_for_both_directions():
    quality = [0.90, 0.95, 0.93, 0.80, 0.95, math.nan]
    cost = [10, 100, 50, 5, 200, 1]
    # 0.95@200 is dominated by 0.95@100 (same quality, cheaper); NaN never on the front.
    assert stats.pareto_mask(quality, cost) == [True, True, True, True, False, False]
    bpc = [2.5, 2.6, 2.4, 2.7]
    size = [10, 5, 20, 6]
    # Lower bpc is better: 2.7@6 is dominated by 2.6@5.
    assert stats.pareto_mask(bpc, size, higher_is_better=False) == [True, True, True, False]


def test_ranks_share_ties_and_follow_the_direction():
    assert stats.ranks([0.9, 0.95, 0.9, math.nan]) == pytest.approx([2.5, 1.0, 2.5, math.nan], nan_ok=True)
    assert stats.ranks([2.5, 2.4, 2.6], higher_is_better=False) == [2.0, 1.0, 3.0]


def test_rows_of_the_same_architecture_tie_on_latency():
    # Two students of one architecture timed at 1.0 and 0.9 ms: the faster-looking one is
    # not on the front through noise; the better one is. Without the keys both would be.
    quality, latency = [0.92, 0.90, 0.80], [1.0, 0.9, 0.2]
    assert stats.pareto_mask(quality, latency) == [True, True, True]
    keys = [("mlp", 32), ("mlp", 32), ("mlp", 8)]
    assert stats.pareto_mask(quality, latency, same_cost=keys) == [True, False, True]
