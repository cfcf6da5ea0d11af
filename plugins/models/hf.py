"""Placeholder: filled in next."""

from kdbench import hookimpl


@hookimpl
def kdbench_register_models(register):
    pass
