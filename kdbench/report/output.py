"""The folder ``kdbench report --output DIR`` writes: missing, empty, or an earlier report.

An earlier report is replaced whole, so that no figure of it survives next to the new ones
(and is linked or counted as if it were new). It is recognised by ``MARKER``, a file each
report writes listing the files it wrote; a report written before the marker existed, by its
layout: the four main files and the figures its README links. A folder holding anything else
is refused before anything is written or deleted: nothing of the user's is ever deleted.

The new report is written into a staging folder inside DIR first and moved into place only
once complete, so a report that fails halfway leaves the earlier one as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from .. import __version__
from ..errors import KdbenchError

#: Written last into every report folder: JSON with the kdbench version and the files written.
MARKER = ".kdbench-report"
MAIN_FILES = ("README.md", "index.html", "leaderboard.csv", "leaderboard.json")
_STAGING = ".kdbench-staging-"
#: A figure link of a report README: ``(figures/<stem>.png)`` and ``(figures/<stem>.svg)``.
_FIGURE_LINK = re.compile(r"\((figures/[^()\s]+?\.(?:png|svg))\)")
_FIX = "choose a new or empty folder with --output"


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """Check ``out``, then yield an empty folder to write the new report into; when the block
    ends without error, remove the earlier report's files from ``out`` and move the new ones in.
    Raises KdbenchError, before anything is written, for a folder that is no earlier report."""
    out = Path(out)
    earlier = earlier_report(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out))
    try:
        yield staging
        _remove(out, earlier)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    except BaseException:
        if created:  # leave no empty folder behind where there was none
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_marker(folder: Path, files: Sequence[str]) -> None:
    """Record the files of the report written to ``folder`` (paths relative to it), so that
    the next report into the same folder can replace exactly them."""
    text = json.dumps({"written_by": f"kdbench {__version__} (kdbench report)",
                       "files": sorted(set(files))}, indent=1)
    (Path(folder) / MARKER).write_text(text + "\n")


def earlier_report(out: Path) -> set[str]:
    """The files of the earlier report in ``out`` (relative POSIX paths, the marker included),
    empty for a missing or empty folder. Refuses a folder that is anything else."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise KdbenchError(f"report folder {out}: exists and is not a folder; {_FIX}")
    if not out.exists():
        return set()
    files, folders = _entries(out)
    if not files and not folders:
        return set()
    owned = _report_files(out)
    if owned is None:
        raise KdbenchError(f"report folder {out} is not empty and holds no kdbench report "
                           f"(it holds {_listing(files + folders)}); kdbench replaces only a report it "
                           f"wrote itself: {_FIX}, or empty this one yourself")
    parents = {str(p) for f in owned for p in PurePosixPath(f).parents if str(p) != "."} | {"figures"}
    foreign = [f for f in files if f not in owned] + [d for d in folders if d not in parents]
    if foreign:
        raise KdbenchError(f"report folder {out} holds an earlier kdbench report and also "
                           f"{_listing(foreign)}, which the report did not write; move those out of "
                           f"the folder, or {_FIX} (nothing was deleted)")
    return owned


def _entries(out: Path) -> tuple[list[str], list[str]]:
    """Every file and every folder under ``out``, relative; a link counts as a file (it is
    never followed) and the staging folders of interrupted reports are left out."""
    files, folders = [], []
    for root, dirs, names in os.walk(out):
        rel = Path(root).relative_to(out)
        if rel == Path(".") and dirs:
            dirs[:] = [d for d in dirs if not d.startswith(_STAGING)]
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                dirs.remove(d)
                names.append(d)
            else:
                folders.append((rel / d).as_posix())
        files += [(rel / n).as_posix() for n in names]
    return sorted(files), sorted(folders)


def _report_files(out: Path) -> set[str] | None:
    """What the earlier report in ``out`` wrote, from its marker, else from the layout of a
    report written before markers; None when ``out`` holds no report."""
    marker = out / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(files, list) or not all(_inside(f) for f in files):
            return None
        return set(files) | {MARKER}
    if not all((out / name).is_file() for name in MAIN_FILES):
        return None
    readme = (out / "README.md").read_text(errors="replace")
    return set(MAIN_FILES) | {unquote(link) for link in _FIGURE_LINK.findall(readme)}


def _inside(path: object) -> bool:
    """A marker entry names a file inside the folder: relative, without '..'."""
    if not isinstance(path, str) or not path:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


def _remove(out: Path, files: set[str]) -> None:
    """Delete the earlier report's files, then the folders they leave empty (deepest first)."""
    for rel in sorted(files):
        path = out / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
    folders = {p for rel in files for p in PurePosixPath(rel).parents if str(p) != "."} | {PurePosixPath("figures")}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        path = out / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _listing(paths: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")
