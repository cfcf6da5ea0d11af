"""Executor ``dask``: jobs on a Dask distributed cluster.

Without ``scheduler`` it starts a ``LocalCluster`` of ``workers`` worker processes, one task at
a time each (``threads`` torch threads per task), which is ``processes`` with Dask's nanny:
a worker that dies is restarted, and its task is retried elsewhere. With ``scheduler`` it
connects to a running cluster (``tcp://HOST:8786``), so one run spreads over many machines.

The scheduler and every worker need kdbench and its plugins installed, at the same versions
as the machine that runs ``kdbench run``: a job is pickled by reference, the scheduler
unpickles each task, and the worker rebuilds the job from its own installed plugins (``start``
checks the versions of the scheduler and of the workers already connected). Results travel
back to the one process that writes the store; workers never open the store, so it can stay
on the submitting machine's disk.

Getting a cluster
-----------------
SLURM or PBS, with ``dask-jobqueue`` (``pip install dask-jobqueue``), from the login node::

    from dask_jobqueue import SLURMCluster          # PBSCluster for PBS
    cluster = SLURMCluster(cores=8, processes=1, memory="32GB", walltime="04:00:00",
                           job_script_prologue=["source ~/venv/bin/activate"])
    cluster.scale(jobs=4)                            # four batch jobs, one worker each
    print(cluster.scheduler_address)                 # pass it as --scheduler

and, while that Python session stays open, ``kdbench run exp.yaml --scheduler tcp://...``.
Or without Python on the login node: one batch job runs ``dask scheduler
--scheduler-file sched.json`` and each worker job runs ``dask worker --scheduler-file
sched.json --nworkers 1 --nthreads 1``; then ``--scheduler`` gets the address in sched.json.

Kubernetes: ``dask-kubernetes`` (``KubeCluster(name=..., image=..., n_workers=4)``) or the Dask
Helm chart (``helm install my-dask dask/dask``) with an image that has kdbench installed; then
``--scheduler tcp://<scheduler service>:8786`` from a pod or through a port-forward.

Threads: with ``threads: 0`` a task's torch threads are its worker's cores divided by the
worker's Dask threads, so a worker never oversubscribes its cores: ``SLURMCluster(cores=8,
processes=1)`` runs 8 jobs at a time per batch job with 1 torch thread each, ``dask worker
--nthreads 1`` one job at a time with every core. Several worker processes on one machine
(``processes=4``, ``--nworkers 4``) each see all its cores: set ``threads`` then.

A worker that dies while running a task (killed, out of memory) makes the scheduler retry the
task on another worker, up to ``distributed.scheduler.allowed-failures`` times (3 by
default); after that the job is reported lost.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from typing import Literal

from kdbench import hookimpl
from kdbench.contracts import Executor
from kdbench.errors import KdbenchError

from .processes import (Shipped, available_cpus, check_slots, choose_start_method, limit_threads,
                        resolve_slots, reuse)

MISSING = 'executor dask needs dask.distributed: pip install "kdbench[dask]"'
#: Settings of a local cluster whose every core runs a cell: Dask's own periodic work is CPU
#: taken from the cells (tests/benchmarks/README.md: Dask against processes). The
#: statistical profiler samples each worker's stack 100 times a
#: second, every event loop ticks 50 times a second, nannies poll memory 10 times a second,
#: and work stealing is moot when each worker is given a job only when it is free.
QUIET = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
         "distributed.worker.memory.monitor-interval": "1s", "distributed.scheduler.work-stealing": False}


def _run(key: str, blob: bytes, threads: int, job_blob: bytes):
    """One job on a worker, with torch's threads set first: a worker that joined the cluster
    after the run started is sized like the others. ``fn`` and the job travel as pickled
    bytes: the scheduler unpickles every task it receives, and need not build a job."""
    if not threads:
        from dask.distributed import get_worker

        threads = max(1, available_cpus() // max(1, get_worker().state.nthreads))
    import torch

    if torch.get_num_threads() != threads:
        limit_threads(threads)
    return reuse(key, blob)(pickle.loads(job_blob))


def _warm_up() -> None:
    from kdbench.training import warm_up

    warm_up()


def _worker_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("kdbench")


class Dask(Executor):
    name = "dask"
    description = "a Dask distributed cluster (SLURM, PBS, Kubernetes ...), or a local one"

    @dataclasses.dataclass(frozen=True)
    class Params:
        scheduler: str = ""  # tcp://HOST:PORT of a running cluster; empty = a LocalCluster here
        workers: int = 0  # LocalCluster worker processes; 0 = one per CPU core
        threads: int = 0  # torch threads per task; 0 = the cores divided between the workers
        connect_timeout: float = 10.0  # seconds to wait for the scheduler
        # LocalCluster workers: auto forks workers of one thread on Linux (see processes)
        start_method: Literal["auto", "fork", "spawn", "forkserver"] = "auto"

        def __post_init__(self):
            check_slots(self.workers, self.threads)
            if self.scheduler and self.workers:
                raise ValueError(f"workers ({self.workers}) sizes the local cluster, but scheduler "
                                 f"{self.scheduler!r} names a running one, whose own workers run the "
                                 "jobs: drop workers (or drop scheduler for a local cluster)")
            if not self.connect_timeout > 0:
                raise ValueError(f"connect_timeout must be > 0 seconds, got {self.connect_timeout}")

    def __init__(self, params=None):
        super().__init__(params)
        self._client = None
        self._cluster = None
        self._running: dict = {}  # future key -> (future, job)
        self._warming: list = []  # futures of the local workers' warm-up
        self.threads = self.params.threads

    def start(self) -> None:
        if self._client is not None:
            return
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise KdbenchError(MISSING) from None
        p = self.params
        if p.scheduler:
            self.threads = p.threads
            try:
                self._client = Client(p.scheduler, timeout=p.connect_timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise KdbenchError(
                    f"executor dask: no Dask scheduler answered at {p.scheduler} within "
                    f"{p.connect_timeout:g} s ({type(exc).__name__}: {exc}); check that the "
                    "scheduler is running (dask scheduler, or your cluster's job) and that the "
                    "address and port are right, or raise connect_timeout") from None
            self._check_workers()
        else:
            import dask

            workers, self.threads = resolve_slots(p.workers, p.threads)
            # Workers forked rather than spawned, on the rule of the processes executor: ready
            # at once, with torch and the plugins imported (a restarted worker is spawned).
            method = choose_start_method(p.start_method, self.threads)
            try:  # one task per worker process: torch, not Dask, uses the threads
                with dask.config.set({"distributed.worker.multiprocessing-method": method, **QUIET}):
                    self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                 dashboard_address="127.0.0.1:0")  # any free port
                self._client = Client(self._cluster, set_as_default=False)
                # Workers pay torch's one-off costs now, while the run prepares (as the
                # processes executor's workers do).
                self._warming = [self._client.submit(_warm_up, pure=False, workers=[address])
                                 for address in self._client.scheduler_info()["workers"]]
            except Exception as exc:
                self.close()
                raise KdbenchError(f"executor dask: the local cluster of {workers} workers did not "
                                   f"start ({type(exc).__name__}: {exc}); try fewer workers, or the "
                                   "processes executor") from None

    def _check_workers(self) -> None:
        """The scheduler (it unpickles each task) and the workers already connected (they
        rebuild each job from their installed plugins) must run this kdbench."""
        from importlib.metadata import version

        mine = version("kdbench")
        theirs = dict(self._client.run(_worker_version, on_error="return"))
        try:
            theirs["the scheduler"] = self._client.run_on_scheduler(_worker_version)
        except Exception as exc:  # raised there: kdbench is missing or broken
            theirs["the scheduler"] = exc
        wrong = {where: (f"{type(v).__name__}: {v}" if isinstance(v, BaseException) else f"kdbench {v}")
                 for where, v in theirs.items() if v != mine}
        if wrong:
            listing = "; ".join(f"{where}: {what}" for where, what in sorted(wrong.items()))
            self.close()
            raise KdbenchError(f"executor dask: the scheduler and workers at {self.params.scheduler} need "
                               f"kdbench {mine} and its plugins installed ({listing}); install the same "
                               "versions in the cluster's environment")

    def _slots(self) -> int:
        """How many jobs may be in flight: the cluster's task threads (it may grow)."""
        return max(1, sum(self._client.nthreads().values()))

    def map(self, fn, jobs, lost):
        from dask.distributed import KilledWorker, as_completed

        if self._client is None:
            self.start()
        fn, jobs = Shipped(fn), iter(jobs)
        finished = as_completed(loop=self._client.loop)
        running = self._running = {}
        exhausted = False
        slots, counted = self._slots(), time.monotonic()
        while True:
            while not exhausted and len(running) < slots:  # a job only for a free thread
                try:
                    job = next(jobs)
                except StopIteration:
                    exhausted = True
                    break
                future = self._client.submit(_run, fn.key, fn.blob, self.threads, pickle.dumps(job),
                                             pure=False)
                running[future.key] = (future, job)
                finished.add(future)
            if not running:
                return
            if not finished.has_ready():
                time.sleep(0.05)
                if time.monotonic() - counted > 2:  # workers join and leave a cluster
                    slots, counted = self._slots(), time.monotonic()
                continue
            for future in finished.next_batch(block=False):
                _, job = running.pop(future.key)
                try:
                    result = future.result()
                except KilledWorker as exc:
                    result = lost(job, f"its Dask worker died while running it (the scheduler "
                                       f"gave up retrying it: {exc})")
                except Exception as exc:  # lost with the scheduler, or a result that cannot travel
                    result = lost(job, f"it did not come back from the Dask cluster: "
                                       f"{type(exc).__name__}: {exc}")
                future.release()
                yield job, result

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        self._warming = []
        if client is not None:
            for future, _ in self._running.values():  # after an error: free a shared cluster
                future.cancel()
            self._running = {}
            client.close()
        if cluster is not None:
            cluster.close()


@hookimpl
def kdbench_register_executors(register):
    register(Dask)
