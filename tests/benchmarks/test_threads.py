"""The default thread count, from measurements: one torch thread per cell against two.

Slow (about 3 minutes): ``python -m pytest -m slow tests/benchmarks/test_threads.py``. The
embedded smoke grid (every recipe kind on digits, short cells) with ``--threads 1`` and
``--threads 2``: on an idle machine (wall time and CPU time) and with one core taken by another
process, as on a shared workstation or a laptop doing something else.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paired import paired, report


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class SmokeRun:
    """``kdbench run`` from an empty cache and store; keeps each run's CPU time."""

    def __init__(self, folder: Path):
        self.folder, self.cpu = folder, {}

    def clean(self):
        shutil.rmtree(self.folder / "cache", ignore_errors=True)
        for name in ("r.db", "r.db-wal", "r.db-shm"):
            (self.folder / name).unlink(missing_ok=True)

    def run(self, threads: int, *overrides: str):
        def go():
            env = dict(os.environ)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            before = cpu_seconds()
            out = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", "smoke", "--quiet", "--threads", str(threads),
                                  "--store", str(self.folder / "r.db"), "--cache-dir", str(self.folder / "cache"),
                                  *overrides],
                                 capture_output=True, text=True, env=env)
            assert out.returncode == 0, out.stderr
            self.cpu.setdefault(threads, []).append(cpu_seconds() - before)
        return go


@pytest.mark.slow
def test_a_second_thread_on_an_idle_machine(benchmark, capsys, tmp_path):
    quick = SmokeRun(tmp_path)
    quick.run(1)()  # compiled once
    ratio = benchmark.pedantic(lambda: paired(
        "wall time, 2 threads against 1 (the smoke grid, idle machine)", ("--threads 2", quick.run(2)),
        ("--threads 1", quick.run(1)), "<= 1.0", setup=quick.clean), rounds=1, iterations=1)
    cpu = [two / one for two, one in zip(quick.cpu[2], quick.cpu[1][1:], strict=True)]
    benchmark.extra_info["cpu_ratio"] = [round(c, 2) for c in cpu]
    report(benchmark, ratio, capsys)
    with capsys.disabled():
        print(f"CPU time, 2 threads against 1: {sorted(cpu)[len(cpu) // 2]:.2f}")


#: A shorter smoke run for the busy machine, where two threads take minutes.
SHORT = ("--set", "seeds=[0]", "--set", "training.epochs=5")


@pytest.mark.slow
def test_two_threads_when_another_process_takes_a_core(benchmark, capsys, tmp_path):
    quick = SmokeRun(tmp_path)
    quick.run(1, *SHORT)()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        ratio = benchmark.pedantic(lambda: paired(
            "wall time, 2 threads against 1 (the smoke grid, 1 seed, 5 epochs, one core busy)",
            ("--threads 2", quick.run(2, *SHORT)), ("--threads 1", quick.run(1, *SHORT)), ">= 1.0",
            setup=quick.clean), rounds=1, iterations=1)
    finally:
        busy.kill()
        busy.wait()
    report(benchmark, ratio, capsys)
