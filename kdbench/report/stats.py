"""The statistics behind every leaderboard number: intervals over seeds, paired tests against
a reference recipe, Pareto sets and ranks.

Seeds are few (3 is common), so intervals use Student's t, not the normal approximation, and
a comparison with fewer than ``MIN_PAIRS`` seed pairs reports its numbers but claims nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence

import numpy as np

# scipy.special, not scipy.stats: the same Student-t functions at a third of the import time
# (0.17 s against 0.54 s), which every leaderboard printed by 'kdbench run' pays.
from scipy.special import stdtr, stdtrit

#: Below this many seed pairs a paired test has almost no power (with 2 pairs, t has one
#: degree of freedom and a 95% interval is ±12.7 standard errors): report, do not mark.
MIN_PAIRS = 3
CONFIDENCE = 0.95


def t_halfwidth(values: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided t confidence interval of the mean; NaN for fewer than 2
    values. Zero spread gives a zero-width interval."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) < 2:
        return math.nan
    sem = x.std(ddof=1) / math.sqrt(len(x))
    return float(stdtrit(len(x) - 1, 0.5 + confidence / 2) * sem)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A recipe against the reference, paired by seed: mean of (recipe - reference)."""

    n: int  # seed pairs
    mean: float
    ci95: float  # half-width; NaN with fewer than 2 pairs
    p_value: float  # two-sided paired t-test; NaN with fewer than 2 pairs or no spread
    significant: bool | None  # None: too few pairs to say (n < MIN_PAIRS)

    @property
    def verdict(self) -> str:
        if self.significant is None:
            return f"n={self.n}: too few seeds to test"
        return "significant" if self.significant else "not significant"


def paired(values: dict[int, float], reference: dict[int, float], alpha: float = 1 - CONFIDENCE,
           min_pairs: int = MIN_PAIRS) -> Paired:
    """Paired t-test of ``values`` against ``reference`` over the seeds both have.

    Pairing by seed removes what the seed shares (data order, initialisation, the teacher of
    that seed), which is why it is much more sensitive than comparing two means.
    """
    seeds = sorted(s for s in values if s in reference
                   and not math.isnan(values[s]) and not math.isnan(reference[s]))
    d = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return Paired(0, math.nan, math.nan, math.nan, None)
    mean = float(d.mean())
    if len(d) < 2:
        return Paired(1, mean, math.nan, math.nan, None)
    half = t_halfwidth(d)
    sd = d.std(ddof=1)
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal up to rounding: 0.92 - 0.90 vs 0.93 - 0.91
        # Identical differences: the t statistic is undefined. Zero difference is no effect;
        # a constant non-zero difference is as certain as it gets.
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (sd / math.sqrt(len(d)))
        p = float(2 * stdtr(len(d) - 1, -abs(t)))  # two-sided one-sample t-test of d against 0
    significant = None if len(d) < min_pairs else bool(p < alpha)
    return Paired(len(d), mean, half, p, significant)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN): controls the family-wise error when
    many recipes are each tested against one reference."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    m = len(order)
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pareto_mask(quality: Sequence[float], cost: Sequence[float], higher_is_better: bool = True,
                same_cost: Sequence[Hashable | None] | None = None) -> list[bool]:
    """True for the points no other point dominates: at least as good in quality and at most
    as costly, strictly better in one. NaN points are never on the front.

    Points with equal ``same_cost`` keys (not None) count as equally costly: two rows that ship
    the same architecture differ in measured latency only by noise, and noise must not put
    one of them on the front; their quality decides.
    """
    q = np.asarray(quality, dtype=float) * (1 if higher_is_better else -1)
    c = np.asarray(cost, dtype=float)
    keys = list(same_cost) if same_cost is not None else [None] * len(q)
    valid = ~(np.isnan(q) | np.isnan(c))
    mask = []
    for i in range(len(q)):
        if not valid[i]:
            mask.append(False)
            continue
        tie = np.array([keys[i] is not None and k == keys[i] for k in keys]) | (c == c[i])
        cheaper = (c < c[i]) & ~tie
        dominated = valid & (q >= q[i]) & (cheaper | tie) & ((q > q[i]) | cheaper)
        mask.append(not dominated.any())
    return mask


def ranks(quality: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """Rank 1 = best; ties share the mean of their ranks (as MTEB does); NaN stays unranked."""
    q = np.asarray(quality, dtype=float)
    out = np.full(len(q), math.nan)
    valid = ~np.isnan(q)
    if valid.any():
        key = -q[valid] if higher_is_better else q[valid]
        # Average ranks: 1 + how many are better + half of the others that tie.
        below = (key[None, :] < key[:, None]).sum(axis=1)
        ties = (key[None, :] == key[:, None]).sum(axis=1)
        out[valid] = 1 + below + (ties - 1) / 2
    return out.tolist()
