"""Executor ``processes``: worker processes on this machine.

Each worker limits torch (and the OpenMP/MKL pools of anything it starts) to ``threads``
threads, so that ``workers x threads`` fits the cores.

How workers start (``start_method``): a *forked* worker is ready at once, with torch and the
plugins already imported; a *spawned* one imports them again (1.5 s of CPU per worker), which
on a short grid is much of what parallel workers save. Forking is unsafe only where the child
would use an OpenMP thread pool the parent had started (it hangs at its first parallel
region). A worker limited to one torch thread never enters a parallel region, so ``auto``
forks workers of one thread (on Linux) and spawns the others. All workers are started in
``start``, before the run's own threads (the store's heartbeat) exist.

A worker that dies (killed, out of memory, ``os._exit``) breaks a ``ProcessPoolExecutor``:
every job in flight fails with ``BrokenProcessPool`` and the other workers are terminated.
Each worker therefore reports which job it starts, so that the job whose worker died is
reported lost, while the jobs stopped only because the pool went down with it are run again
on a fresh pool (once: a job caught in two breakdowns is reported lost too).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import uuid
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Literal

from kdbench import hookimpl
from kdbench.contracts import Executor

#: The environment variables that size the thread pools of OpenMP, MKL and OpenBLAS.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """The cores this process may run on (a cgroup or ``taskset`` limit counts, as on SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_slots(workers: int, threads: int, cpus: int | None = None) -> tuple[int, int]:
    """``(workers, threads)`` with the zeros filled in: one worker per core, and the cores
    shared out between the workers, so that the machine is full but not oversubscribed."""
    cpus = cpus or available_cpus()
    workers = workers or cpus
    return workers, threads or max(1, cpus // workers)


def check_slots(workers: int, threads: int) -> None:
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {workers}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = the cores divided between the workers), "
                         f"got {threads}")


def limit_threads(threads: int) -> None:
    """Size torch's pool here, and the pools of any process started from here."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)


def exit_description(code: int | None) -> str:
    """An exit code as a user reads it: a negative code is the signal that killed it."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"exit code {code}: killed by {name}{hint}"
    return f"exit code {code}"


class Shipped:
    """``fn`` pickled once, as sent to workers: each worker process unpickles it once per
    ``map`` (``reuse``), not once per job, so that what it caches (the runner's loaded data
    sets) serves every job there. Plain bytes also pass through a Dask scheduler unopened."""

    def __init__(self, fn):
        self.key = uuid.uuid4().hex
        self.blob = pickle.dumps(fn)


# ------------------------------------------------------------ in the worker
_reused: dict[str, object] = {}
_reused_lock = threading.Lock()  # a Dask worker may run tasks in several threads


def reuse(key: str, blob: bytes):
    with _reused_lock:
        if key not in _reused:
            while len(_reused) >= 2:  # the current phase and the one before; drop older ones
                _reused.pop(next(iter(_reused)))
            _reused[key] = pickle.loads(blob)
        return _reused[key]


_started = None  # the queue on which this worker says which job it starts


def _init_worker(threads: int, started) -> None:
    global _started
    _started = started
    limit_threads(threads)
    from kdbench.training import warm_up

    warm_up()  # at start, while the parent prepares the run


def _ready() -> int:
    return os.getpid()


def choose_start_method(method: str, threads: int) -> str:
    """``auto``: fork workers of one thread on Linux (see the module's docstring), else spawn."""
    if method != "auto":
        return method
    return "fork" if threads == 1 and sys.platform.startswith("linux") else "spawn"


def _call(key: str, blob: bytes, token: int, job):
    # Said before the job runs: if this worker dies now, the parent knows whose job it was.
    _started.put((token, os.getpid()))
    return reuse(key, blob)(job)


# ------------------------------------------------------------ in the parent
class Processes(Executor):
    name = "processes"
    description = "worker processes on this machine (spawn); a worker that dies loses only its job"

    @dataclasses.dataclass(frozen=True)
    class Params:
        workers: int = 0  # 0 = one per CPU core
        threads: int = 0  # torch threads per worker; 0 = the cores divided between the workers
        # auto: fork workers of one thread on Linux (ready at once), spawn the others
        start_method: Literal["auto", "fork", "spawn", "forkserver"] = "auto"

        def __post_init__(self):
            check_slots(self.workers, self.threads)

    def __init__(self, params=None):
        super().__init__(params)
        self.workers, self.threads = resolve_slots(self.params.workers, self.params.threads)
        self.start_method = choose_start_method(self.params.start_method, self.threads)
        self._context = multiprocessing.get_context(self.start_method)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._started = None
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._running: dict[cf.Future, tuple[int, object, int]] = {}
        self._tokens = itertools.count()

    def start(self) -> None:
        self._new_pool()
        # Start every worker now, before the run starts threads of its own (a fork context
        # starts them all at the first job, spawn one per job while none is idle); they warm up
        # while the run prepares.
        for _ in range(self.workers):
            self._pool.submit(_ready)
        self._note_processes()

    def _new_pool(self) -> None:
        self._started = self._context.SimpleQueue()
        self._processes = {}
        self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=self._context,
                                            initializer=_init_worker,
                                            initargs=(self.threads, self._started))

    def _note_processes(self) -> None:
        # Workers are spawned as jobs are submitted; keep them to read their exit codes.
        self._processes.update(getattr(self._pool, "_processes", None) or {})

    def _started_on(self) -> dict[int, int]:
        """Which worker (pid) started each job (token) so far."""
        started = {}
        while not self._started.empty():
            token, pid = self._started.get()
            started[token] = pid
        return started

    def map(self, fn, jobs, lost):
        if self._pool is None:
            self.start()
        fn, jobs = Shipped(fn), iter(jobs)
        again: deque = deque()  # (job, attempts): jobs stopped by another worker's death
        started: dict[int, int] = {}
        exhausted = False
        while True:
            broken = False
            while len(self._running) < self.workers:  # take a job only when a worker is free
                if again:
                    job, attempts = again.popleft()
                elif not exhausted:
                    try:
                        job, attempts = next(jobs), 0
                    except StopIteration:
                        exhausted = True
                        break
                else:
                    break
                token = next(self._tokens)
                try:
                    future = self._pool.submit(_call, fn.key, fn.blob, token, job)
                except BrokenProcessPool:  # broke since the last look: this job never started
                    again.appendleft((job, attempts))
                    broken = True
                    break
                self._running[future] = (token, job, attempts)
                self._note_processes()
            if not self._running and not broken:
                return
            if not broken:
                done, _ = cf.wait(self._running, return_when=cf.FIRST_COMPLETED)
                started.update(self._started_on())  # drained often: the pipe must not fill
                for future in done:
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken = True
                        continue
                    token, job, _ = self._running.pop(future)
                    started.pop(token, None)
                    yield job, self._outcome(future, job, lost)
            if broken:
                yield from self._recover(started, again, lost)
                started = {}
                if self._pool is None:  # closed meanwhile
                    return

    @staticmethod
    def _outcome(future: cf.Future, job, lost):
        error = future.exception()
        if error is None:
            return future.result()
        # fn never raises: this is the transport (a job, fn or result that cannot be pickled).
        return lost(job, f"it could not be passed to or back from its worker process: "
                         f"{type(error).__name__}: {error}")

    def _recover(self, started: dict[int, int], again: deque, lost):
        """The pool broke: report the job whose worker died, requeue the others, and start a
        fresh pool for the rest."""
        running, self._running = self._running, {}
        if self._pool is None:  # closed: the jobs in flight were stopped on purpose
            return
        cf.wait(running)  # every job in flight is settled once the pool has broken
        self._note_processes()
        self._pool.shutdown(wait=True, cancel_futures=True)  # joins the workers: exit codes
        self._pool = None
        started.update(self._started_on())
        codes = {pid: process.exitcode for pid, process in self._processes.items()}
        # The pool terminates the surviving workers itself (SIGTERM) once one has died.
        died = {pid: code for pid, code in codes.items() if code not in (None, 0, -signal.SIGTERM)}
        summary = ", ".join(sorted({exit_description(c) for c in died.values()})) or \
            ", ".join(sorted({exit_description(c) for c in codes.values() if c})) or "exit code unknown"
        for future, (token, job, attempts) in running.items():
            if not isinstance(future.exception(), BrokenProcessPool):
                yield job, self._outcome(future, job, lost)
                continue
            pid = started.get(token)
            if pid in died:
                yield job, lost(job, f"its worker process died ({exit_description(died[pid])})")
            elif died and attempts == 0:
                again.append((job, attempts + 1))
            else:
                yield job, lost(job, f"a worker process died ({summary}) while this job was in "
                                     f"flight, and took the pool down with it")
        self._new_pool()

    def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if any(not f.done() for f in self._running):
            # Closing after an error with jobs still running: stop them rather than wait.
            self._note_processes()
            for process in self._processes.values():
                if process.is_alive():
                    process.terminate()
        self._running = {}
        pool.shutdown(wait=True, cancel_futures=True)


@hookimpl
def kdbench_register_executors(register):
    register(Processes)
