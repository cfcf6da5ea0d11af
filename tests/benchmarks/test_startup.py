"""Commands start fast: each against ``python -c "import torch"``, the floor of any command
that touches a model.

Slow (about a minute): ``python -m pytest -m slow tests/benchmarks/test_startup.py``. Every
command is a fresh process, timed back to back with the floor; modules are compiled once
beforehand, as a user's Python does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paired import paired, report

FLOOR = [sys.executable, "-c", "import torch"]

GRID_20 = """\
name: resume-bench
seeds: [0, 1, 2, 3]
tasks: [digits]
pairs:
  - teacher: {name: mlp, hidden: [64]}
    student: {name: mlp, hidden: [16]}
recipes:
  scratch: [train]
  kd: [{distill: hinton}]
  dkd: [{distill: dkd}]
  kd+prune: [{distill: hinton}, {prune: {name: magnitude, sparsity: 0.5}}]
  kd+int8: [{distill: hinton}, {quantize: dynamic-int8}]
training: {epochs: 1}
measure: {latency_repeats: 1, latency_warmup: 1}
"""


def environment() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def runs(args: list[str], code: int = 0):
    def run():
        out = subprocess.run(args, capture_output=True, text=True, env=environment())
        assert out.returncode == code, out.stderr
    return run


def kdbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdbench.cli", *args]


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    path = folder / "grid.yaml"
    path.write_text(GRID_20)
    args = ["run", str(path), "--store", str(folder / "r.db"), "--cache-dir", str(folder / "cache"), "--quiet"]
    runs(kdbench(*args))()
    return args


CASES = {
    "kdbench --help": (lambda grid: kdbench("--help"), 0, "<= 1.3"),  # no torch: far below
    "a config error": (lambda grid: kdbench("run", "--set", "training.epoch=1"), 2, "<= 1.3"),
    "resume of a finished 20-cell grid": (lambda grid: kdbench(*grid), 0, "<= 2.0"),
    "kdbench list": (lambda grid: kdbench("list"), 0, "<= 1.3"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_command_start_up_against_the_torch_floor(benchmark, capsys, finished_grid, case):
    build, code, target = CASES[case]
    command = runs(build(finished_grid), code)
    command()  # compiled once
    ratio = benchmark.pedantic(lambda: paired(f"start-up: {case}", (case, command),
                                              ("import torch", runs(FLOOR)), target, repeats=5),
                               rounds=1, iterations=1)
    report(benchmark, ratio, capsys)
    assert ratio.meets(), ratio.line()
