"""Executor ``local``: runs jobs one after another in this process."""

from __future__ import annotations

from kdbench import hookimpl
from kdbench.contracts import Executor


class Local(Executor):
    name = "local"
    description = "serial, in this process; results in grid order"

    def map(self, fn, jobs, lost):
        for job in jobs:
            yield job, fn(job)


@hookimpl
def kdbench_register_executors(register):
    register(Local)
