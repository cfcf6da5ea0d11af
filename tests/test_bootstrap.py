"""The block-bootstrap interval over test windows: what a perplexity of fixed weights would be
on another test sample of the same size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.bootstrap import interval_figures, loss_intervals, mean_loss_interval, window_losses
from kdbench.report.document import Table
from kdbench.report.summary import frame, summarize
from kdbench.report.tables import WINDOWS_CI, leaderboard_blocks
from kdbench.store import Record


def language_model_outputs(windows: int, length: int = 16, vocab: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(windows, length, vocab, generator=g) * 2
    targets = torch.randint(0, vocab, (windows, length), generator=g)
    targets[-1, length // 2:] = -100  # the padded tail of the last window
    return logits, targets


def test_window_losses_are_the_cross_entropy_of_each_window():
    logits, targets = language_model_outputs(5)
    sums, counts = window_losses(logits, targets)
    for w in range(5):
        keep = targets[w] != -100
        assert sums[w].item() == pytest.approx(F.cross_entropy(logits[w][keep], targets[w][keep],
                                                               reduction="sum").item(), rel=1e-5)
        assert counts[w].item() == int(keep.sum())
    total = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100).item()
    assert (sums.sum() / counts.sum()).item() == pytest.approx(total, rel=1e-5)


def test_the_interval_brackets_the_figure_is_seeded_and_shrinks_with_more_windows():
    logits, targets = language_model_outputs(64)
    perplexity = math.exp(F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100).item())
    low, high = loss_intervals(logits, targets)["perplexity"]
    assert low < perplexity < high
    assert loss_intervals(logits, targets)["perplexity"] == (low, high)  # same seed, same interval
    bits = loss_intervals(logits, targets)["bits"]
    assert bits == pytest.approx((math.log2(low), math.log2(high)))
    wide = high - low
    many = language_model_outputs(1024, seed=1)
    low4, high4 = loss_intervals(*many)["perplexity"]
    assert 0.15 * wide < high4 - low4 < 0.4 * wide  # 16x the windows: about a quarter the width
    # Identical windows: nothing to resample; one window: no interval.
    same_logits, same_targets = logits[:1].repeat(8, 1, 1), targets[:1].repeat(8, 1)
    low1, high1 = loss_intervals(same_logits, same_targets)["perplexity"]
    assert low1 == pytest.approx(high1)
    assert all(math.isnan(v) for v in loss_intervals(logits[:1], targets[:1])["perplexity"])
    assert interval_figures("perplexity", (1.0, 2.0)) == {"perplexity_ci95_low": 1.0, "perplexity_ci95_high": 2.0}


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Test sets of 64 windows drawn from one text (window losses of known mean): the interval
    of each covers the text's mean loss per token in roughly 95 of 100."""
    g = torch.Generator().manual_seed(0)
    covered, trials = 0, 200
    for trial in range(trials):
        sums = 128 * (3.0 + 0.4 * torch.randn(64, generator=g, dtype=torch.float64))
        low, high = mean_loss_interval(sums, torch.full((64,), 128.0, dtype=torch.float64),
                                       resamples=500, seed=trial)
        covered += low <= 3.0 <= high
    assert 0.88 <= covered / trials <= 0.99


def test_the_language_tasks_report_it(plugins):
    logits, targets = language_model_outputs(32)
    char = plugins.build("task", "shakespeare-char").extra_metrics(logits, targets)
    bpc = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100).item() / math.log(2)
    assert char["bpc_ci95_low"] < bpc < char["bpc_ci95_high"]
    assert char["perplexity_ci95_low"] < char["perplexity"] < char["perplexity_ci95_high"]
    tokens = plugins.build("task", "shakespeare-tokens").extra_metrics(logits, targets)
    assert tokens["perplexity_ci95_low"] == pytest.approx(char["perplexity_ci95_low"])


def perplexity_row(recipe: str, seed: int, ppl: float, low: float | None = None, high: float | None = None):
    metrics = {"test_perplexity": ppl, "materialized": True}
    if low is not None:
        metrics.update(test_perplexity_ci95_low=low, test_perplexity_ci95_high=high)
    return Record(cell_id=f"{recipe}-{seed}", experiment="llm", role="student", task="shakespeare-tokens",
                  teacher="smollm2", student="smollm2", recipe=recipe, seed=seed, status="done", metrics=metrics,
                  config={"task": {"name": "shakespeare-tokens"}, "measure": {}, "budget": {"epochs": 4},
                          "plugins": {}, "experiment": "llm"},
                  stages=[], environment={"cpu": "Test CPU", "threads": 1}, started_at="t", finished_at="t")


def table(records) -> Table:
    return next(b for b in leaderboard_blocks(summarize(frame(records))) if isinstance(b, Table))


def test_tables_show_it_beside_the_perplexity_even_for_one_seed():
    shown = table([perplexity_row("dense", 0, 66.4, 61.0, 72.5), perplexity_row("rtn", 0, 82.0, 75.25, 89.5)])
    column = shown.columns.index(WINDOWS_CI)
    assert [r[column] for r in shown.rows] == ["[61.000, 72.500]", "[75.250, 89.500]"]
    assert [r[shown.columns.index("95% CI")] for r in shown.rows] == ["-", "-"]  # one seed: no t interval
    assert any(n.startswith(WINDOWS_CI) for n in shown.notes)
    # Over seeds: the mean of the seeds' bounds.
    seeds = table([perplexity_row("gptq", s, 76.0, 70.0 + s, 83.0 + s) for s in range(3)])
    assert seeds.rows[0][seeds.columns.index(WINDOWS_CI)] == "[71.000, 84.000]"
    # Rows stored without it: no column, no note.
    bare = table([perplexity_row("dense", 0, 66.4)])
    assert WINDOWS_CI not in bare.columns and not any(n.startswith(WINDOWS_CI) for n in bare.notes)
