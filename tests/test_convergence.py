"""The convergence verdict every trained stage records: still improving over its last 20 %?"""

from __future__ import annotations

import math

import pytest

from kdbench.config import Training
from kdbench.convergence import MIN_EPOCHS, convergence, row_converged, stage_convergence, window

ONE_EXAMPLE = 1 / 360  # one example of digits' validation split


def test_the_window_is_20_percent_of_the_epochs_rounded_up():
    assert [window(e) for e in (1, 5, 10, 11, 20, 150)] == [1, 1, 2, 3, 4, 30]


def test_too_few_epochs_give_no_verdict():
    rising = [0.1 * i for i in range(1, MIN_EPOCHS)]
    verdict = convergence(rising, True, 0.005)
    assert verdict.converged is None and verdict.improvement is None
    assert convergence(rising + [1.0], True, 0.005).converged is False  # from 5 epochs on


def test_a_flat_curve_with_one_example_of_noise_has_converged_by_default():
    # 20 epochs at 90 %; the last 4 epochs' best is one validation example higher.
    values = [0.9] * 16 + [0.9, 0.9 + ONE_EXAMPLE, 0.9, 0.9]
    default = Training().converge_tolerance
    verdict = convergence(values, True, default)
    assert verdict.converged is True
    assert verdict.improvement == pytest.approx(ONE_EXAMPLE / 0.9)
    assert convergence(values, True, 0.0).converged is False  # 0: any gain counts
    # Two examples are more than the tolerance: still improving.
    assert convergence([0.9] * 16 + [0.9 + 2 * ONE_EXAMPLE] * 4, True, default).converged is False


def test_a_rising_curve_is_still_improving_with_its_relative_gain():
    values = [0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.85, 0.86, 0.88]  # window: the last 2
    verdict = convergence(values, True, 0.005)
    assert verdict.converged is False and verdict.window == 2 and verdict.epochs == 10
    assert verdict.improvement == pytest.approx((0.88 - 0.85) / 0.85)


def test_a_best_reached_before_the_window_is_converged_with_a_negative_gain():
    values = [0.5, 0.7, 0.9, 0.85, 0.8]
    verdict = convergence(values, True, 0.005)
    assert verdict.converged is True and verdict.improvement == pytest.approx((0.8 - 0.9) / 0.9)


def test_lower_is_better_metrics_improve_downwards():
    falling = [3.0, 2.8, 2.6, 2.5, 2.4]  # bpc still going down
    assert convergence(falling, False, 0.005).converged is False
    assert convergence(falling, False, 0.005).improvement == pytest.approx((2.5 - 2.4) / 2.5)
    rising = [2.4, 2.5, 2.6, 2.8, 3.0]  # getting worse: the best was early
    assert convergence(rising, False, 0.005).converged is True


def test_non_finite_epochs_take_no_part_and_histories_are_read_by_metric():
    history = [{"val_accuracy": v} for v in (0.5, 0.6, math.nan, 0.7, 0.7, 0.7)]
    assert stage_convergence(history, "accuracy", True, 0.005).converged is True
    assert stage_convergence([{"val_accuracy": math.nan}] * 6, "accuracy", True, 0.005).converged is None


def test_a_rows_verdict_is_the_worst_of_its_stages():
    assert row_converged([True, None, True]) == 1.0
    assert row_converged([True, False]) == 0.0
    assert row_converged([None, None]) is None
