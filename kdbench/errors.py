"""Errors a user can act on. Each names the bad value, what is allowed, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdbenchError(Exception):
    """Base class: the CLI prints these without a traceback and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(KdbenchError):
    """Bad input in an experiment file (or the parameters of a plugin reference).

    ``where`` is the path inside the file, e.g. ``recipes.kd[0].distill.temprature``.
    """

    def __init__(self, message: str, where: str = "", source: str | None = None):
        self.message = message
        self.where = where
        self.source = source
        super().__init__(str(self))

    def located(self, source: str | None = None, prefix: str = "") -> "ConfigError":
        """The same error, placed inside a file and/or under a parent path."""
        where = ".".join(p for p in (prefix, self.where) if p).replace(".[", "[")
        return ConfigError(self.message, where, source or self.source)

    def __str__(self) -> str:
        place = ": ".join(p for p in (self.source, self.where) if p)
        return f"{place}: {self.message}" if place else self.message


class PluginError(KdbenchError):
    """A plugin is broken or conflicts with another one."""


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """'; did you mean X?' when something close exists, else ''."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown(what: str, value: str, allowed: Iterable[str]) -> str:
    """The standard message for a name that is not one of the allowed ones."""
    allowed = sorted(allowed)
    listing = ", ".join(allowed) if allowed else "(none registered)"
    return f"unknown {what} '{value}'{did_you_mean(value, allowed)} (allowed: {listing})"
