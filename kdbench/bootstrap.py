"""A 95% interval for a test-set figure from one model: the block bootstrap over test windows.

Seeds vary what a run trains and calibrates on; they do not vary the test text. A language
model's perplexity is measured on a few thousand tokens, and which windows of the held-out
plays those are moves it as much as a method does, so even a deterministic row (the released
model, round-to-nearest) whose seeds agree to the last digit has an uncertain figure. The
interval here covers that: how much the figure of these fixed weights would move on another
test sample of the same size from the same text.

How: the per-window sums of cross-entropy and their token counts are resampled, whole windows
with replacement (a non-overlapping block bootstrap: tokens inside a window depend on each
other, so they are never split), ``RESAMPLES`` times with a fixed seed; the figure of each
resample is the exponential (perplexity) or the base-2 scaling (bits) of its mean loss per
token, and the interval is the 2.5th to 97.5th percentile of those figures. Neighbouring
windows of one play also depend on each other, which whole-window resampling ignores: read the
interval as a lower bound on that uncertainty, not as a bound on a difference between two
rows (that needs pairing by window or by seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95


def window_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window (one row of ``targets``, or one example for ``(N,)`` targets): the summed
    cross-entropy in nats over positions whose target is not -100, and how many there are.
    In chunks of windows: float32 copies of every row of a large vocabulary would not fit."""
    n = targets.shape[0]
    logits = logits.reshape(n, -1, logits.shape[-1])
    targets = targets.reshape(n, -1)
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    per_chunk = max(1, 4096 // max(targets.shape[1], 1))
    for start in range(0, n, per_chunk):
        t = targets[start:start + per_chunk]
        keep = t != -100
        loss = F.cross_entropy(logits[start:start + per_chunk].reshape(-1, logits.shape[-1]).float(),
                               t.reshape(-1).clamp(min=0), reduction="none").view_as(t)
        sums[start:start + per_chunk] = (loss * keep).sum(dim=1).double()
        counts[start:start + per_chunk] = keep.sum(dim=1).double()
    return sums, counts


def mean_loss_interval(sums: torch.Tensor, counts: torch.Tensor, resamples: int = RESAMPLES,
                       seed: int = SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of the mean loss per token over ``resamples`` resamples of
    whole windows; (nan, nan) with fewer than two windows that hold a target."""
    used = counts > 0
    sums, counts = sums[used], counts[used]
    if len(sums) < 2:
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(sums), (resamples, len(sums)), generator=generator)
    means = sums[picks].sum(dim=1) / counts[picks].sum(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def loss_intervals(logits: torch.Tensor, targets: torch.Tensor, **kw) -> dict[str, tuple[float, float]]:
    """The 95% block-bootstrap intervals of a language model's test figures: ``perplexity``
    (``exp`` of the mean cross-entropy in nats, which is ``2 ** bits``) and ``bits`` (the mean
    cross-entropy in bits per token or character)."""
    low, high = mean_loss_interval(*window_losses(logits, targets), **kw)
    return {"perplexity": (math.exp(low), math.exp(high)),
            "bits": (low / math.log(2), high / math.log(2))}


def interval_figures(name: str, interval: tuple[float, float]) -> dict[str, float]:
    """``{name}_ci95_low`` and ``{name}_ci95_high``, as a task's ``extra_metrics`` reports them
    (stored as ``test_{name}_ci95_low`` ...; tables show them beside ``test_{name}``)."""
    return {f"{name}_ci95_low": interval[0], f"{name}_ci95_high": interval[1]}
