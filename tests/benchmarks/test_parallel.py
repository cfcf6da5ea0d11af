"""Parallel runs scale: ``--workers 2`` against a serial run, Dask against processes.

Slow (about 4 minutes): ``python -m pytest -m slow tests/benchmarks/test_parallel.py``. Each
run is the command a user types, in a fresh process, from an empty cache and store (teachers
are trained in the run), so start-up, the teacher phase and the final table are all counted.
The grid has 2 teachers and 8 student cells of a few seconds each; on 2 idle cores the serial
run's one-off costs (imports, torch's first optimizer, loading the data) bound the speed-up
below 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paired import paired, report

GRID = """\
name: parallel-bench
seeds: [0, 1]
tasks: [mnist5k]
pairs:
  - teacher: {name: mlp, hidden: [256]}
    student: {name: mlp, hidden: [32]}
recipes:
  scratch: [train]
  kd: [{distill: {name: hinton, temperature: 4, alpha: 0.9}}]
  dkd: [{distill: dkd}]
  kd+prune: [{distill: hinton}, {prune: {name: magnitude, sparsity: 0.5}}, {finetune: {epochs: 3}}]
training: {epochs: 30, batch_size: 64}
measure: {latency_repeats: 5}
"""


def command(tmp_path: Path, *args: str):
    def run():
        out = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", *args, "--quiet",
                              "--store", str(tmp_path / "r.db"), "--cache-dir", str(tmp_path / "cache")],
                             capture_output=True, text=True, env=environment())
        assert out.returncode == 0, out.stderr
    return run


def environment() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's Python: modules compiled once
    return env


def fresh(tmp_path: Path):
    def setup():
        for name in ("r.db", "r.db-wal", "r.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    return setup


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    command(tmp_path, str(path))()  # compiles the modules, loads the datasets' packages once
    return str(path)


@pytest.mark.slow
def test_two_workers_run_an_8_cell_grid_at_least_1_6_times_faster_than_serial(benchmark, capsys, tmp_path, grid):
    ratio = benchmark.pedantic(lambda: paired(
        "speed-up of 2 workers (8-cell grid)", ("serial", command(tmp_path, grid)),
        ("--workers 2", command(tmp_path, grid, "--workers", "2")), ">= 1.6", setup=fresh(tmp_path)),
        rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()


@pytest.mark.slow
def test_dask_with_two_workers_is_within_15_percent_of_processes(benchmark, capsys, tmp_path, grid):
    pytest.importorskip("dask.distributed")
    ratio = benchmark.pedantic(lambda: paired(
        "Dask against processes (2 workers, 8-cell grid)",
        ("--executor dask --workers 2", command(tmp_path, grid, "--executor", "dask", "--workers", "2")),
        ("--workers 2", command(tmp_path, grid, "--workers", "2")), "<= 1.15", setup=fresh(tmp_path)),
        rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()


@pytest.mark.slow
def test_the_smoke_grid_with_two_workers(benchmark, capsys, tmp_path):
    """The embedded smoke grid (3 teachers, 18 short cells): what ``--workers 2`` gives a grid
    of short cells. Reported, with no target: its cells are too short for two workers to
    halve it."""
    command(tmp_path, "smoke")()
    ratio = benchmark.pedantic(lambda: paired(
        "speed-up of 2 workers (the smoke grid)", ("serial", command(tmp_path, "smoke")),
        ("--workers 2", command(tmp_path, "smoke", "--workers", "2")), ">= 1.0", setup=fresh(tmp_path)),
        rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
