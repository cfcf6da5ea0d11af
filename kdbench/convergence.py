"""Whether a training run had stopped improving: the verdict every trained stage records.

A row whose validation metric was still climbing when its epochs ran out reports a number
its method had not reached; a leaderboard marks it (PROTOCOL rule 1). The verdict, for a
stage of ``E`` epochs with window ``w = max(1, ceil(0.2 E))``:

- fewer than ``MIN_EPOCHS`` epochs: no verdict (``None``); a 3-epoch smoke run says nothing;
  nor while the model's head is untrained (the runner withholds it): the metric is chance;
- otherwise the stage is *still improving* when the best validation value of its last ``w``
  epochs beats the best of the ``E - w`` epochs before by more than ``tolerance`` times the
  size of that earlier best, in the metric's direction (higher for accuracy, lower for bpc).
  ``tolerance`` 0 flags any gain at all.

The improvement is recorded relative to the earlier best (0.012: 1.2 % better in the last
20 %; negative: the last epochs never matched the earlier best), so it reads against the
tolerance directly. A compressor's own fine-tuning between its steps (gradual pruning) is
not judged: each call restarts from a model the compressor has just changed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .errors import KdbenchError

#: Share of a stage's epochs that form its final window.
WINDOW = 0.2
#: Fewest epochs a verdict is given for.
MIN_EPOCHS = 5


@dataclasses.dataclass(frozen=True)
class Convergence:
    """A stage's verdict: ``converged`` None when there is none to give."""

    converged: bool | None
    improvement: float | None  # relative to the earlier best, in the metric's direction
    epochs: int
    window: int

    def withheld(self) -> "Convergence":
        """No verdict: the validation metric meant nothing (it read an untrained head)."""
        return dataclasses.replace(self, converged=None, improvement=None)

    def log(self) -> dict[str, Any]:
        """The entries a stage log records."""
        return {"converged": self.converged, "improvement_last_20pct": self.improvement,
                "convergence_window": self.window}


def window(epochs: int) -> int:
    """The final epochs judged: 20 % of them, rounded up, at least one."""
    return max(1, math.ceil(WINDOW * epochs))


def convergence(values: Sequence[float], higher_is_better: bool, tolerance: float) -> Convergence:
    """The verdict on one stage's per-epoch validation values (see the module docstring).
    Non-finite values (a diverged epoch) take no part; a part with none left gives no verdict."""
    epochs = len(values)
    w = window(epochs)
    if epochs < MIN_EPOCHS:
        return Convergence(None, None, epochs, w)
    sign = 1.0 if higher_is_better else -1.0
    before = [sign * v for v in values[:epochs - w] if _finite(v)]
    last = [sign * v for v in values[epochs - w:] if _finite(v)]
    if not before or not last:
        return Convergence(None, None, epochs, w)
    best_before, best_last = max(before), max(last)
    gain = best_last - best_before
    still = gain > tolerance * abs(best_before)
    improvement = gain / abs(best_before) if best_before else None  # no scale to divide by
    return Convergence(not still, improvement, epochs, w)


def stage_convergence(history: Sequence[dict], metric: str, higher_is_better: bool,
                      tolerance: float) -> Convergence:
    """The verdict on a stage's history (``fit``'s per-epoch rows, ``val_<metric>`` in each)."""
    return convergence([row.get(f"val_{metric}", math.nan) for row in history], higher_is_better, tolerance)


def row_converged(verdicts: Sequence[bool | None]) -> float | None:
    """A cell's ``converged`` figure over its trained stages: 0.0 when any was still
    improving, 1.0 when every judged one had stopped, None when none was judged."""
    judged = [v for v in verdicts if v is not None]
    if not judged:
        return None
    return 1.0 if all(judged) else 0.0


class NotConverged(KdbenchError):
    """A trained stage was still improving and the training asked for ``require_converged``."""


def not_converged_message(stage: str, verdict: Convergence, tolerance: float) -> str:
    """The error of a cell that ``require_converged`` fails."""
    gain = "" if verdict.improvement is None else f" by {100 * verdict.improvement:.2f} %"
    return (f"stage '{stage}' was still improving after {verdict.epochs} epochs: the best validation "
            f"value of its last {verdict.window} epochs beat the best before{gain} (tolerance "
            f"{100 * tolerance:g} %); give it more epochs (training.epochs or the stage's own), "
            f"or set require_converged: false to keep the row marked instead")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
