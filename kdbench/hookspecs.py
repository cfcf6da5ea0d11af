"""Every hook a kdbench plugin can implement.

Registration hooks receive a ``register`` callable; call it once per class you provide
(``register(MyDistiller)``). Names must be unique within a kind across all plugins.
Lifecycle hooks let a plugin observe a run (log to TensorBoard, MLflow, W&B ...)
without the core knowing about it.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kdbench")


# ------------------------------------------------------------------ registration
@hookspec
def kdbench_register_tasks(register):
    """Register ``Task`` subclasses: datasets with fixed splits, a metric and a budget."""


@hookspec
def kdbench_register_models(register):
    """Register ``ModelFamily`` subclasses that build teachers and students for a task."""


@hookspec
def kdbench_register_distillers(register):
    """Register ``Distiller`` subclasses: response-, feature- or relation-based KD losses."""


@hookspec
def kdbench_register_pruners(register):
    """Register ``Pruner`` subclasses that zero or remove weights."""


@hookspec
def kdbench_register_quantizers(register):
    """Register ``Quantizer`` subclasses that lower numeric precision."""


@hookspec
def kdbench_register_decomposers(register):
    """Register ``Decomposer`` subclasses that factor layers into low-rank parts."""


@hookspec
def kdbench_register_executors(register):
    """Register ``Executor`` subclasses that run the grid's jobs (serially, in parallel ...)."""


# ------------------------------------------------------------------ lifecycle
@hookspec
def kdbench_cell_started(cell):
    """A cell (a teacher job or a student cell) is about to run; ``cell`` is its config."""


@hookspec
def kdbench_cell_finished(cell, record):
    """A cell ended and its ``record`` (status, metrics, error) has been stored."""
