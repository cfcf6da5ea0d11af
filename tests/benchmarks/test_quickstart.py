"""The default ``kdbench run`` end to end, timed, from an empty cache and store.

Slow (about 80 s on 2 cores): ``python -m pytest -m slow tests/benchmarks/test_quickstart.py``.
Besides its wall time (the default run must finish in under 90 s on 2 cores), it checks what
the embedded experiment was chosen to show a new user, with 3 seeds: every row converged by
kdbench's rule, a teacher at least 5 points above the scratch student, Hinton KD significantly
above scratch after Holm's correction, and a compression row within 1 point of its parent at
half its bytes or less.
"""

from __future__ import annotations

import os
import time

import pytest

from kdbench.cli import main
from kdbench.report.summary import frame, summarize
from kdbench.store import Store

#: The default run's time limit on a 2-core machine, from an empty cache.
LIMIT_S = 90.0


@pytest.mark.slow
def test_default_run_from_scratch(benchmark, tmp_path, monkeypatch, capsys):
    rounds = iter(range(100))
    wall = []

    def fresh():
        i = next(rounds)
        monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / f"cache{i}"))
        return (str(tmp_path / f"results{i}.db"),), {}

    def run(store):
        start = time.perf_counter()
        assert main(["run", "--store", store, "--quiet"]) == 0
        wall.append(time.perf_counter() - start)
        return store

    store = benchmark.pedantic(run, setup=fresh, rounds=1, iterations=1)
    with Store(store) as s:
        table = summarize(frame(s.records())).set_index("recipe")
    benchmark.extra_info.update(wall_s=round(wall[0], 1), cores=os.cpu_count(),
                                load=round(os.getloadavg()[0], 2))
    with capsys.disabled():
        print(f"\nthe default run: {wall[0]:.1f} s on {os.cpu_count()} cores (limit {LIMIT_S:.0f} s)")

    acc = table["test_accuracy_mean"]
    assert table["converged_mean"].eq(1.0).all(), table.loc[table["converged_mean"] < 1, "converged_mean"]
    assert not table["still_improving"].fillna(False).any()
    assert acc["teacher"] >= acc["scratch"] + 0.05
    assert table.loc["kd", "reference_label"] == "scratch" and table.loc["kd", "significant"]
    assert table.loc["kd", "p_holm"] < 0.05 and acc["kd"] > acc["scratch"]
    # int8 keeps KD's accuracy within a point, at a third of its bytes.
    assert table.loc["kd+int8", "reference_label"] == "kd" and abs(acc["kd+int8"] - acc["kd"]) <= 0.01
    assert table.loc["kd", "size_bytes_mean"] >= 2 * table.loc["kd+int8", "size_bytes_mean"]
    assert table.loc["kd+prune", "nonzero_params_mean"] <= 0.52 * table.loc["kd", "nonzero_params_mean"]
    assert table.loc["kd+svd", "params_mean"] < table.loc["kd", "params_mean"]
    if (os.cpu_count() or 1) >= 2:
        assert wall[0] < LIMIT_S, f"the default run took {wall[0]:.0f} s, over its {LIMIT_S:.0f} s limit"
