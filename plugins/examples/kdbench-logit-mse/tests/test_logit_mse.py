"""logit-mse: the conformance checks kdbench's own distillers pass, and its registration."""

from kdbench.testing import check_distiller

import kdbench_logit_mse as plugin
from kdbench_logit_mse import LogitMseDistiller


def test_logit_mse_passes_the_distiller_checks():
    check_distiller(LogitMseDistiller)


def test_logit_mse_registers_under_its_name(kdbench_registry, kdbench_register):
    if "kdbench-logit-mse" not in kdbench_registry.versions:  # not installed (pip install -e .) yet
        kdbench_register(plugin, "kdbench-logit-mse")
    assert kdbench_registry.get("distiller", "logit-mse").cls.__name__ == "LogitMseDistiller"
