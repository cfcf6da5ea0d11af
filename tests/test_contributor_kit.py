"""The contributor kit: hooks documented and exercised, plugins described and cited, the trace
switch, generated plugin packages that pass their own tests, and the example package
installed and run in a real grid."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import hookspecs
from kdbench.cli import main
from kdbench.plugins import get_plugins
from kdbench.scaffold import KIND_NAMES, new_plugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "examples" / "kdbench-logit-mse"
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("kdbench_")]
METHOD_KINDS = ("distiller", "pruner", "quantizer", "decomposer")


def kdbench(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


# ---------------------------------------------------------------- meta-tests
def test_every_hook_is_documented_in_contributing():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    assert len(HOOKS) == 9
    missing = [hook for hook in HOOKS if f"`{hook}(" not in text]
    assert not missing, f"hooks not documented in CONTRIBUTING.md: {missing}"


def test_every_hook_is_implemented_by_a_test():
    """Each hook has an implementation in the test suite (the generated packages implement the
    seven registration hooks; test_runner's recorder the two observers)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    sources += "\n".join(template for template in importlib.import_module("kdbench.scaffold").MODULES.values())
    missing = [hook for hook in HOOKS if not re.search(rf"def {hook}\(", sources)]
    assert not missing, f"hooks no test implements: {missing}"


def test_every_registered_plugin_is_described_and_every_method_cites_its_paper():
    plugins = get_plugins()
    for kind, entries in plugins.entries.items():
        for name, entry in entries.items():
            assert len(entry.cls.description) >= 10, f"{kind} {name}: describe it in one line"
            if kind in METHOD_KINDS:
                text = " ".join([getattr(entry.cls, "paper", ""), entry.cls.__doc__ or "",
                                 inspect.getmodule(entry.cls).__doc__ or ""])
                assert re.search(r"\b(19|20)\d\d\b", text), f"{kind} {name}: cite the paper it comes from"
            if kind == "distiller":
                assert entry.cls.paper, f"distiller {name}: set its paper"


# ---------------------------------------------------------------- trace switch
def test_the_trace_switch_prints_every_hook_call_with_its_plugin_and_result(tmp_path):
    out = kdbench("list", "distiller", env={"KDBENCH_TRACE": "1"})
    assert out.returncode == 0
    assert "kdbench trace: kdbench_register_distillers(register=" in out.stderr
    assert "plugin 'distill-response' 0.1.0 registers distiller 'hinton' (kdbench_plugins.distill.response.Hinton)" in out.stderr
    assert "kdbench trace: kdbench_register_distillers returned []" in out.stderr
    quiet = kdbench("list", "distiller")
    assert "kdbench trace" not in quiet.stderr


# ---------------------------------------------------------------- generated packages
def test_new_plugin_refuses_bad_names_kinds_and_existing_folders(tmp_path, capsys):
    assert main(["new-plugin", "Bad Name", "--kind", "distiller", "--output", str(tmp_path)]) == 2
    assert "lower-case letters" in capsys.readouterr().err
    assert main(["new-plugin", "hinton", "--kind", "distiller", "--output", str(tmp_path)]) == 2
    assert "already registered by plugin 'distill-response'" in capsys.readouterr().err
    assert main(["new-plugin", "my-kd", "--kind", "distiller", "--output", str(tmp_path)]) == 0
    assert main(["new-plugin", "my-kd", "--kind", "distiller", "--output", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_every_kind_of_generated_package_passes_its_own_tests(tmp_path):
    roots = [new_plugin(f"gen-{kind}", kind, tmp_path) for kind in KIND_NAMES]
    assert {p.name for p in (roots[0]).rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "__init__.py", "test_gen_task.py"}
    env = {"PYTHONPATH": os.pathsep.join(map(str, roots)), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--import-mode=importlib", *[str(r / "tests") for r in roots]],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{2 * len(KIND_NAMES)} passed" in result.stdout


# ---------------------------------------------------------------- the example package
@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example package, installed as a user would (pip, through its pyproject), into a
    folder of its own that the subprocesses below put on their path."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                             "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {"PYTHONPATH": str(target)}


def test_the_example_package_passes_its_tests(installed_example, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(EXAMPLE / "tests")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **installed_example, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout


def test_the_example_package_is_listed_and_runs_in_a_grid_beside_the_built_ins(installed_example, tmp_path):
    listing = kdbench("plugins", env=installed_example)
    assert listing.returncode == 0
    assert re.search(r"kdbench-logit-mse\s+0\.1\.0", listing.stdout), listing.stdout
    experiment = tmp_path / "mimic.yaml"
    experiment.write_text(
        "name: mimic\nseeds: [0]\ntasks: [digits]\n"
        "pairs: [{teacher: {name: mlp, hidden: [64]}, student: {name: mlp, hidden: [16]}}]\n"
        "recipes:\n  kd: [{distill: hinton}]\n  mimic: [{distill: logit-mse}]\n"
        "  mimic+ce: [{distill: {name: logit-mse, ce_weight: 0.5}}]\n"
        "training: {epochs: 3, batch_size: 64}\nmeasure: {latency_repeats: 2, latency_batch_sizes: [1]}\n")
    store = tmp_path / "r.db"
    env = {**installed_example, "KDBENCH_CACHE_DIR": str(tmp_path / "cache")}
    run = kdbench("run", experiment, "--store", store, "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    board = kdbench("leaderboard", "--store", store, "--format", "csv", env=env)
    assert board.returncode == 0 and "mimic" in board.stdout and "mimic+ce" in board.stdout, board.stdout
    without = kdbench("run", experiment, "--store", tmp_path / "other.db", env={"KDBENCH_CACHE_DIR": str(tmp_path / "c2")})
    assert without.returncode == 2 and "unknown distiller 'logit-mse'" in without.stderr
