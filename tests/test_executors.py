"""The processes and dask executors: the same results as local, jobs taken only when a worker
is free, a worker that dies loses only its own job, settings that cannot work fail early."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time

import pytest
import torch

from kdbench.errors import ConfigError, KdbenchError
from kdbench.plugins import get_plugins
from kdbench_plugins.executors.processes import available_cpus, choose_start_method, resolve_slots

JOBS = list(range(8))


def square(x):
    """Module level, so that worker processes unpickle it by reference."""
    return os.getpid(), torch.get_num_threads(), x * x


def slow_square(x):
    time.sleep(0.2)
    return square(x)


def die_on_negative(x):
    if x < 0:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    time.sleep(0.2)
    return square(x)


class Tally:
    """A picklable callable that counts how often it is unpickled in each process."""

    unpickled = 0

    def __init__(self):
        self.name = "tally"

    def __setstate__(self, state):
        type(self).unpickled += 1
        self.__dict__.update(state)

    def __call__(self, x):
        time.sleep(0.1)
        return os.getpid(), Tally.unpickled, x * x


def lost(job, reason):
    return ("lost", reason)


def build(name, **params):
    return get_plugins().build("executor", name, params)


def squares(pairs):
    return {(job, result[2]) for job, result in pairs}


class Pulls:
    """A lazy job source that checks, at every pull, how many jobs are out and unfinished."""

    def __init__(self, jobs):
        self.jobs, self.pulled, self.finished, self.most_ahead = list(jobs), 0, 0, 0

    def __iter__(self):
        for job in self.jobs:
            self.pulled += 1
            self.most_ahead = max(self.most_ahead, self.pulled - self.finished)
            yield job

    def run(self, executor, fn):
        out = []
        for pair in executor.map(fn, self, lost):
            self.finished += 1
            out.append(pair)
        return out


@pytest.fixture(scope="module")
def processes():
    executor = build("processes", workers=2, threads=2)
    executor.start()
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def dask_executor():
    pytest.importorskip("dask.distributed")
    import dask

    # A task whose worker dies is reported at once instead of killing three more workers.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        executor = build("dask", workers=2, threads=2)
        executor.start()
    yield executor
    executor.close()


# ------------------------------------------------------------ processes
def test_processes_match_local_use_two_workers_and_set_threads(processes):
    local = list(build("local").map(square, JOBS, lost))
    pairs = list(processes.map(slow_square, JOBS, lost))
    assert sorted(job for job, _ in pairs) == JOBS
    assert squares(pairs) == squares(local)
    assert len({pid for _, (pid, _, _) in pairs} - {os.getpid()}) == 2
    assert {threads for _, (_, threads, _) in pairs} == {2}


def test_processes_take_a_job_only_when_a_worker_is_free(processes):
    source = Pulls(range(6))
    pairs = source.run(processes, slow_square)
    assert squares(pairs) == {(x, x * x) for x in range(6)}
    assert source.most_ahead <= 2


def test_processes_a_dead_worker_loses_only_its_job(processes):
    jobs = [0, 1, -1, 2, 3, 4]
    source = Pulls(jobs)
    pairs = source.run(processes, die_on_negative)
    assert sorted(job for job, _ in pairs) == sorted(jobs)  # each job comes back exactly once
    results = dict(pairs)
    assert results[-1][0] == "lost"
    assert "its worker process died (exit code -9: killed by SIGKILL" in results[-1][1]
    assert {job: r[2] for job, r in results.items() if job >= 0} == {x: x * x for x in jobs if x >= 0}
    assert source.most_ahead <= 2
    # The fresh pool serves the next phase.
    assert squares(processes.map(square, [5, 6], lost)) == {(5, 25), (6, 36)}


def test_processes_unpickle_fn_once_per_worker_and_phase(processes):
    """So that what the runner caches in a worker (loaded data sets) serves every job there."""
    for _ in range(2):  # a second phase unpickles its own fn once more
        pairs = list(processes.map(Tally(), range(6), lost))
        assert squares(pairs) == {(x, x * x) for x in range(6)}
        per_worker = {}
        for _, (pid, count, _) in pairs:
            per_worker.setdefault(pid, set()).add(count)
        assert all(len(counts) == 1 for counts in per_worker.values())


def test_processes_close_after_an_error_stops_running_jobs_and_is_idempotent():
    executor = build("processes", workers=2, threads=1)
    executor.start()
    pairs = executor.map(time.sleep, [0.1, 60], lost)
    assert next(pairs) == (0.1, None)  # the caller fails here, with a job still running
    started = time.monotonic()
    executor.close()
    executor.close()
    assert time.monotonic() - started < 10


def parallel_matmul(x):
    """Work that runs an OpenMP parallel region wherever torch has two threads or more."""
    a = torch.randn(600, 600)
    return os.getpid(), torch.get_num_threads(), float((a @ a).sum() * 0) + x * x


def test_one_thread_workers_are_forked_and_ready_before_the_first_job():
    """Forked workers of one thread (torch already imported, nothing to re-import) give the
    results local gives; forking them is safe even from a parent whose OpenMP pool runs,
    because a one-thread worker never enters a parallel region (a two-thread one would hang)."""
    torch.set_num_threads(2)
    a = torch.randn(1000, 1000)
    (a @ a).sum()  # this process has an OpenMP pool now
    executor = build("processes", workers=2, threads=1)
    assert executor.start_method == ("fork" if sys.platform.startswith("linux") else "spawn")
    def hung(*_):
        raise TimeoutError("a forked worker hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a hang fails the test instead of stalling the suite
    try:
        executor.start()
        assert len(executor._processes) == 2  # every worker exists before any job
        pairs = list(executor.map(parallel_matmul, JOBS, lost))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        executor.close()
    assert squares(pairs) == squares(build("local").map(square, JOBS, lost))
    assert {threads for _, (_, threads, _) in pairs} == {1}
    assert len({pid for _, (pid, _, _) in pairs}) == 2


def test_workers_with_several_threads_are_spawned():
    assert choose_start_method("auto", 2) == "spawn"
    assert choose_start_method("auto", 1) == ("fork" if sys.platform.startswith("linux") else "spawn")
    assert choose_start_method("forkserver", 1) == "forkserver"
    assert build("processes", workers=2, threads=2).start_method == "spawn"


def test_worker_and_thread_defaults_fill_the_machine_without_oversubscribing():
    assert resolve_slots(0, 0, cpus=8) == (8, 1)
    assert resolve_slots(2, 0, cpus=8) == (2, 4)
    assert resolve_slots(3, 0, cpus=2) == (3, 1)
    assert resolve_slots(2, 3, cpus=8) == (2, 3)


@pytest.mark.parametrize("name,params,message", [
    ("processes", {"workers": -1}, "workers must be >= 0"),
    ("processes", {"threads": -2}, "threads must be >= 0"),
    ("dask", {"workers": -1}, "workers must be >= 0"),
    ("dask", {"connect_timeout": 0}, "connect_timeout must be > 0"),
    ("dask", {"scheduler": "tcp://h:8786", "workers": 4}, "drop workers"),
])
def test_params_out_of_range_name_the_fix(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build(name, **params)


# ------------------------------------------------------------ dask
def test_dask_matches_local_and_sets_threads(dask_executor):
    local = list(build("local").map(square, JOBS, lost))
    source = Pulls(JOBS)
    pairs = source.run(dask_executor, slow_square)
    assert squares(pairs) == squares(local)
    assert len({pid for _, (pid, _, _) in pairs}) == 2
    assert {threads for _, (_, threads, _) in pairs} == {2}
    assert source.most_ahead <= 2


def test_dask_unpickles_fn_once_per_worker(dask_executor):
    pairs = list(dask_executor.map(Tally(), range(6), lost))
    assert squares(pairs) == {(x, x * x) for x in range(6)}
    per_worker = {}
    for _, (pid, count, _) in pairs:
        per_worker.setdefault(pid, set()).add(count)
    assert all(len(counts) == 1 for counts in per_worker.values())


def test_dask_a_dead_worker_loses_only_its_job(dask_executor):
    jobs = [0, -1, 1, 2]
    pairs = list(dask_executor.map(die_on_negative, jobs, lost))
    assert sorted(job for job, _ in pairs) == sorted(jobs)
    results = dict(pairs)
    assert results[-1][0] == "lost" and "its Dask worker died" in results[-1][1]
    assert {job: r[2] for job, r in results.items() if job >= 0} == {0: 0, 1: 1, 2: 4}


def test_dask_connects_to_a_running_scheduler_and_leaves_it_running(dask_executor):
    address = dask_executor._cluster.scheduler_address
    executor = build("dask", scheduler=address, connect_timeout=5)
    executor.start()  # also checks the scheduler's and workers' kdbench version
    try:
        pairs = list(executor.map(square, JOBS, lost))
    finally:
        executor.close()
        executor.close()
    assert squares(pairs) == {(x, x * x) for x in JOBS}
    # threads: 0 on a cluster: each task gets its worker's cores (one task per worker here).
    assert {threads for _, (_, threads, _) in pairs} == {available_cpus()}
    assert squares(dask_executor.map(square, [3], lost)) == {(3, 9)}  # the cluster still serves


def test_dask_refuses_workers_that_run_another_kdbench(dask_executor, monkeypatch):
    import importlib.metadata

    address = dask_executor._cluster.scheduler_address
    installed = importlib.metadata.version("kdbench")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")  # this side only
    executor = build("dask", scheduler=address, connect_timeout=5)
    with pytest.raises(KdbenchError, match=rf"need kdbench 9\.9 .*tcp://.*: kdbench {re.escape(installed)}"):
        executor.start()
    executor.close()


def test_dask_unreachable_scheduler_fails_fast_naming_address_and_fix():
    pytest.importorskip("dask.distributed")
    with socket.socket() as s:  # a local port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    executor = build("dask", scheduler=address, connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(KdbenchError, match=f"no Dask scheduler answered at {address} within 1 s"
                                           ".*check that the scheduler is running"):
        executor.start()
    assert time.monotonic() - started < 10
    executor.close()


def test_dask_without_dask_still_registers_and_says_how_to_install(monkeypatch):
    import sys

    executor = build("dask")
    monkeypatch.setitem(sys.modules, "dask", None)  # import dask now fails
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(KdbenchError, match=r'pip install "kdbench\[dask\]"'):
        executor.start()
    executor.close()
