"""Conformance checks and pytest fixtures for kdbench plugin authors.

``check_task``, ``check_model``, ``check_distiller``, ``check_pruner``, ``check_quantizer``,
``check_decomposer`` and ``check_executor`` each take a registered class (and optional
parameters), run it for real on tiny seeded data in seconds and raise ``AssertionError``
naming the plugin, the property it breaks and the fix; ``tiny_task_data()`` is that data.
The fixtures (``kdbench_registry``, ``kdbench_register``, ``tiny_task_data``, ``tiny_pair``)
load with pytest through the ``pytest11`` entry point (``kdbench.testing.fixtures``).

Names resolve on first use, so that pytest loading the fixtures does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["check_task", "check_model", "check_distiller", "check_pruner", "check_quantizer",
           "check_decomposer", "check_executor", "tiny_task_data"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kdbench.testing.checks"), name)
    raise AttributeError(f"module 'kdbench.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
