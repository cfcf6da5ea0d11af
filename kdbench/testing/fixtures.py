"""pytest fixtures for kdbench plugins, loaded through the ``pytest11`` entry point.

``kdbench_registry`` is a freshly loaded registry that ``kdbench.plugins.get_plugins()``
returns for the duration of the test, so that code under test (the runner, parameter
validation) sees exactly what the test registered, and nothing registered leaks into
other tests. ``kdbench_register(plugin, name)`` adds a plugin module or object to it until
the test ends (``Plugins.temporary``). ``tiny_task_data`` and ``tiny_pair`` are the seeded
data and teacher/student pair the conformance checks use.

Heavy imports happen inside the fixtures: every pytest run in an environment with kdbench
loads this module.
"""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture
def kdbench_registry(monkeypatch):
    """A fresh ``Plugins`` loaded from entry points (allow/block lists honoured), installed
    as the process-wide registry for this test."""
    from kdbench import plugins

    fresh = plugins.load_plugins()
    monkeypatch.setattr(plugins, "_loaded", fresh)
    return fresh


@pytest.fixture
def kdbench_register(kdbench_registry):
    """``register(plugin, name, version="0")``: register a plugin module or object in
    ``kdbench_registry`` until the test ends; returns the registry."""
    with contextlib.ExitStack() as stack:
        def register(plugin, name: str, version: str = "0"):
            stack.enter_context(kdbench_registry.temporary(plugin, name, version))
            return kdbench_registry

        yield register


@pytest.fixture
def tiny_task_data():
    """Seeded Gaussian blobs: train/val/test TensorDatasets, 64 features, 10 classes."""
    from kdbench.testing.checks import tiny_task_data as make

    return make()


@pytest.fixture
def tiny_pair():
    """``(teacher, student)`` nn.Modules (registry MLPs) for ``tiny_task_data``; the teacher
    is trained for a few epochs, so its outputs are not uniform."""
    from kdbench.testing.checks import tiny_pair as make

    return make()
