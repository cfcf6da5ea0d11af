"""Checks of the paths a command will write, made before any work.

A run that finds out after its first cell that its cache folder is read-only stores failed
rows; a report that fails after minutes of plotting loses them. So every command checks each
path it will write (a file or a folder, existing or to be created) first, and stops with
exit 2 and the fix. The check *tries*: it creates and removes a temporary entry in the
nearest existing folder, since permission bits alone do not tell (root ignores them, a
read-only mount or /proc does not).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import KdbenchError


def _nearest_existing(path: Path) -> Path | None:
    return next((p for p in [path, *path.parents] if p.exists()), None)


def _can_create_in(folder: Path) -> str | None:
    """None if a folder can be created inside ``folder`` (and removed), else the OS's reason."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".kdbench-check-"))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_file_writable(path: Path, flag: str) -> None:
    """``path`` can be written as a file: it is a writable file, or it can be created."""
    path = Path(path)
    if path.is_dir():
        raise KdbenchError(f"{flag} {path}: is a folder; name a file, e.g. {path / 'results.db'}")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise KdbenchError(f"{flag} {path}: the file cannot be written ({exc.strerror}); fix its "
                               "permissions or choose another path") from None
        return
    _check_creatable(path.parent if str(path.parent) else Path("."), flag, path, "file")


def check_dir_writable(path: Path, flag: str) -> None:
    """``path`` can hold new files: it is a writable folder, or it can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdbenchError(f"{flag} {path}: is a file, not a folder; choose a folder")
    if path.is_dir():
        reason = _can_create_in(path)
        if reason:
            raise KdbenchError(f"{flag} {path}: cannot write in the folder ({reason}); fix its "
                               "permissions or choose another folder")
        return
    _check_creatable(path, flag, path, "folder")


def _check_creatable(folder: Path, flag: str, path: Path, what: str) -> None:
    existing = _nearest_existing(folder)
    if existing is not None and not existing.is_dir():
        raise KdbenchError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    reason = "nothing on the path exists" if existing is None else _can_create_in(existing)
    if reason:
        raise KdbenchError(f"{flag} {path}: cannot create the {what}, {existing} is not writable "
                           f"({reason}); choose a path in a folder you can write")
