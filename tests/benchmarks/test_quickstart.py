"""The default ``kdbench run`` end to end, timed, from an empty cache and store.

Slow (about half a minute on 2 cores): run with ``python -m pytest -m slow tests/benchmarks``.
It also checks the figures a new user should see from the embedded experiment.
"""

from __future__ import annotations

import pytest

from kdbench.cli import main
from kdbench.report.summary import frame, summarize
from kdbench.store import Store


@pytest.mark.slow
def test_default_run_from_scratch(benchmark, tmp_path, monkeypatch, capsys):
    rounds = iter(range(100))

    def fresh():
        i = next(rounds)
        monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / f"cache{i}"))
        return (str(tmp_path / f"results{i}.db"),), {}

    def run(store):
        assert main(["run", "--store", store, "--quiet"]) == 0
        return store

    store = benchmark.pedantic(run, setup=fresh, rounds=1, iterations=1)
    with Store(store) as s:
        table = summarize(frame(s.records())).set_index("recipe")
    assert table.loc["teacher", "test_accuracy_mean"] > 0.95
    assert table.loc["kd", "weight_bytes_mean"] >= 3 * table.loc["kd+int8", "weight_bytes_mean"]
    assert table.loc["kd+prune", "nonzero_params_mean"] <= 0.52 * table.loc["kd", "nonzero_params_mean"]
    assert table.loc["kd+svd", "params_mean"] < table.loc["kd", "params_mean"]
