"""Ratios of two timed things, measured back to back in one run.

Absolute seconds on a shared machine drift from minute to minute (the same grid took 14 s
and 19 s an hour apart here); the ratio of a candidate to its baseline timed right after it
holds. Each repeat times both, alternating which goes first (ABBA), and the ratios of the
repeats give the median and the range reported in ``tests/benchmarks/README.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Ratio:
    """``candidate / baseline`` per repeat, with what the machine was doing."""

    name: str
    candidate: str
    baseline: str
    target: str  # e.g. "<= 1.10"
    seconds: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average around each repeat

    @property
    def ratios(self) -> list[float]:
        return [c / b for c, b in zip(self.seconds[self.candidate], self.seconds[self.baseline], strict=True)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def meets(self) -> bool:
        op, value = self.target.split()
        return self.median <= float(value) if op == "<=" else self.median >= float(value)

    def info(self) -> dict:
        """What the benchmark JSON keeps (pytest-benchmark's ``extra_info``)."""
        return {"ratio": self.name, "candidate": self.candidate, "baseline": self.baseline,
                "target": self.target, "median": round(self.median, 3),
                "min": round(min(self.ratios), 3), "max": round(max(self.ratios), 3),
                "repeats": len(self.ratios), "met": self.meets(),
                "seconds": {k: [round(v, 3) for v in vs] for k, vs in self.seconds.items()},
                "load_max": round(max(self.load), 2) if self.load else None,
                "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "cpu": cpu_model(), "python": platform.python_version()}

    def line(self) -> str:
        return (f"{self.name}: {self.candidate} / {self.baseline} = {self.median:.2f} "
                f"(range {min(self.ratios):.2f}-{max(self.ratios):.2f}, {len(self.ratios)} repeats, "
                f"load <= {max(self.load):.1f}; target {self.target})")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(name: str, candidate: tuple[str, Callable[[], object]], baseline: tuple[str, Callable[[], object]],
           target: str, repeats: int = 3, setup: Callable[[], object] | None = None) -> Ratio:
    """Time ``candidate`` and ``baseline`` ``repeats`` times each, alternating their order;
    ``setup`` runs before every timing, untimed (a fresh store, an empty cache)."""
    result = Ratio(name, candidate[0], baseline[0], target,
                   seconds={candidate[0]: [], baseline[0]: []})
    for i in range(repeats):
        order = [candidate, baseline] if i % 2 == 0 else [baseline, candidate]
        result.load.append(os.getloadavg()[0])
        for label, fn in order:
            if setup is not None:
                setup()
            result.seconds[label].append(timed(fn))
        result.load.append(os.getloadavg()[0])
    return result


def report(benchmark, ratio: Ratio, capsys) -> None:
    """Attach the ratio to pytest-benchmark's record and print it."""
    benchmark.extra_info.update(ratio.info())
    with capsys.disabled():
        print("\n" + ratio.line())
