"""The documentation's examples and claims stay true."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from urllib.parse import unquote

import torch

from kdbench import hookspecs
from kdbench.contracts import Outputs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_plugin_example_registers_and_computes_a_loss(plugins, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "hookimpl" in block)
    module = types.ModuleType("readme_example")
    monkeypatch.setitem(sys.modules, "readme_example", module)  # dataclasses look the module up
    exec(compile(code, "README.md", "exec"), module.__dict__)
    with plugins.temporary(module, "readme-example"):
        distiller = plugins.build("distiller", "soft-only", {"temperature": 2.0})
        logits = torch.randn(4, 10)
        terms = distiller.loss(Outputs(logits, {}), Outputs(logits, {}), torch.zeros(4, dtype=torch.long))
        assert terms["kd"].item() < 1e-6


def test_every_hook_is_documented_in_contributing():
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("kdbench_")]
    assert hooks and all(f"`{hook}(" in contributing for hook in hooks)


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("pip install torch==2.13.0 -e \".[dev]\"", "python -m pytest", "kdbench report"):
        assert command in readme and command in ci


def test_every_relative_link_of_the_readme_and_the_reports_exists():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "leaderboards").glob("*/README.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / unquote(target.split("#")[0])).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
