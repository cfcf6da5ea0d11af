"""Teachers are trained once per (task, teacher, training, seed) and cached on disk.

The cache key hashes everything that determines the weights (see ``TeacherJob.config``), so
every recipe, every later run and every experiment that needs the same teacher reuses it.
The cache lives in the user's cache directory (``KDBENCH_CACHE_DIR`` or ``--cache-dir``),
never in the repository.

Every cached file (teachers here, teacher outputs in ``logit_cache``) goes through
``load_or_create``: it is written to a temporary file and renamed, its sha256 is written beside
it (``<name>.sha256``, in ``sha256sum`` format) and checked on every load, and a per-file lock
(``<name>.lock``) makes concurrent processes compute it once. A file that is truncated,
corrupt or unreadable is deleted and recomputed, with a warning. A file with no hash (cached
by an earlier kdbench, or whose writer died between the rename and the hash) is complete, since
it was renamed into place whole: if it loads, its hash is written and it is used.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import filelock
import torch
from torch import nn

from .config import TeacherJob
from .contracts import ModelFamily, Task, TaskData
from .training import fit

T = TypeVar("T")
CACHE_ENV = "KDBENCH_CACHE_DIR"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdbench"


@dataclass
class CachedTeacher:
    model: nn.Module
    history: list[dict]
    train_seconds: float
    from_cache: bool


def teacher_path(cache_dir: Path, job: TeacherJob) -> Path:
    return cache_dir / "teachers" / f"{job.teacher_key}.pt"


# ---------------------------------------------------------------- verified cache files
class CacheInvalid(ValueError):
    """A cache file exists but must not be used (no hash, wrong hash, or it does not load)."""


def hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def sha256_of(file: BinaryIO, chunk: int = 1 << 20) -> str:
    """The hex sha256 of an open binary file from its current position, read in 1 MiB chunks
    (a teacher or an LLM's cached outputs can be hundreds of MB)."""
    h = hashlib.sha256()
    while block := file.read(chunk):
        h.update(block)
    return h.hexdigest()


def read_verified(path: Path, load: Callable[[BinaryIO], T], adopt: bool = False) -> T:
    """``load`` the file at ``path`` after checking it against its ``.sha256``.

    Raises FileNotFoundError when there is no file, CacheInvalid for anything else that is
    wrong with it. The hash is computed over the same open file that ``load`` then reads, so a
    concurrent rename of ``path`` can never pair one file's hash with another's contents.
    """
    with open(path, "rb") as file:
        try:
            expected = hash_path(path).read_text().split()[0].lower()
        except (OSError, ValueError, IndexError):  # absent, unreadable, not text, empty
            if not (adopt and not hash_path(path).exists()):
                raise CacheInvalid(f"its sha256 file {hash_path(path).name} is missing or unreadable") from None
            expected = None  # with ``adopt`` (under the lock): hashed below if it loads
        actual = sha256_of(file)
        if expected is not None and actual != expected:
            raise CacheInvalid("its sha256 does not match: the file is truncated or corrupt")
        file.seek(0)
        try:
            value = load(file)
        except Exception as err:  # torch raises several kinds for a file it cannot read
            first = (str(err).strip().splitlines() or [""])[0]  # torch's can run to a page
            first = first if len(first) <= 200 else first[:200] + "..."
            raise CacheInvalid(f"it does not load ({type(err).__name__}: {first})") from err
    if expected is None:
        atomic_write(hash_path(path), lambda tmp: Path(tmp).write_text(f"{actual}  {path.name}\n"))
    return value


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: a
    killed process leaves at most a stray temporary file, never a half-written ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_verified(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically (``write`` fills a temporary file), then its sha256 beside it.

    The hash goes last: a crash in between leaves a file without a hash, which is recomputed.
    No fsync: a file whose data never reached the disk fails its hash on the next load.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    digest: list[str] = []

    def write_and_hash(tmp: str) -> None:
        write(tmp)
        with open(tmp, "rb") as file:
            digest.append(sha256_of(file))

    atomic_write(path, write_and_hash)
    atomic_write(hash_path(path), lambda tmp: Path(tmp).write_text(f"{digest[0]}  {path.name}\n"))


def discard(path: Path) -> None:
    """Delete a cache file, its hash, and temporary files left by writers that were killed
    (only call this holding the file's lock: no live writer owns them then)."""
    for stale in (path, hash_path(path), *path.parent.glob(f"{glob.escape(path.name)}.*.tmp")):
        stale.unlink(missing_ok=True)


def cache_lock(path: Path, what: str) -> filelock.BaseFileLock:
    """The lock that guards ``path``; acquired, saying on stderr when it waits for another process.

    An OS lock (flock, where the file system has it): released by the kernel when its holder
    dies, so a killed run leaves no lock behind that blocks the next one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"kdbench: waiting for another process to finish {what} ({path})", file=sys.stderr,
              flush=True)
        lock.acquire()
    return lock


def load_or_create(path: Path, load: Callable[[BinaryIO], T], create: Callable[[], T],
                   write: Callable[[T, str], None], what: str, redo: str) -> tuple[T, bool]:
    """``load`` the verified file at ``path``, or ``create`` it, ``write`` it and return it.

    Returns ``(value, from_cache)``. A first check runs without the lock, so the common case
    (a valid file) never waits. Otherwise the lock is taken and the file checked again: a
    process that waited on another one's ``create`` loads its file instead of creating it a
    second time. A bad file is deleted (under the lock only: an unlocked reader may see a
    writer between its rename and its hash) with one warning naming it, and recreated.
    """
    try:
        return read_verified(path, load), True
    except (FileNotFoundError, CacheInvalid):
        pass
    lock = cache_lock(path, what)
    try:
        try:
            return read_verified(path, load, adopt=True), True
        except FileNotFoundError:
            discard(path)  # a hash or temporary files without their file
        except CacheInvalid as err:
            warnings.warn(f"cached {what} {path} is unusable: {err}; deleting it and {redo}",
                          stacklevel=3)
            discard(path)
        value = create()
        write_verified(path, lambda tmp: write(value, tmp))
        return value, False
    finally:
        lock.release()


# ---------------------------------------------------------------- teachers
#: ``epoch_bar(epochs, label)`` -> a context manager that yields an ``on_epoch`` callback or None.
EpochBar = Callable[[int, str], contextlib.AbstractContextManager]


def obtain_teacher(job: TeacherJob, task: Task, family: ModelFamily, data: TaskData,
                   cache_dir: Path, device: str = "cpu", epoch_bar: EpochBar | None = None) -> CachedTeacher:
    """Load the teacher from the cache, or train it and cache it (atomically, with its hash).

    Concurrent processes that need the same teacher train it once: the others wait for the
    lock and load its file. ``epoch_bar(epochs, label)``: a context giving the ``on_epoch``
    callback of the training (a progress bar), opened only when the teacher is trained.
    """
    if family.pretrained:
        # A released checkpoint: the family loads (and caches) its weights; nothing to train.
        start = time.perf_counter()
        model = family.build(data)
        for p in model.parameters():
            p.requires_grad_(False)
        return CachedTeacher(model.eval(), [], time.perf_counter() - start, True)

    def load(file: BinaryIO) -> CachedTeacher:
        saved = torch.load(file, map_location="cpu", weights_only=True)
        model = family.build(data)
        model.load_state_dict(saved["state_dict"])
        return CachedTeacher(model.eval(), saved["history"], saved["train_seconds"], True)

    def train() -> CachedTeacher:
        torch.manual_seed(job.seed)
        model = family.build(data)  # built after seeding, so the init depends on the seed alone
        start = time.perf_counter()
        label = f"teacher {job.teacher.label()} seed {job.seed}"
        bar = epoch_bar(job.training.epochs, label) if epoch_bar else contextlib.nullcontext()
        with bar as on_epoch:
            history = fit(model, data, task, job.training, job.seed, device=device, on_epoch=on_epoch)
        return CachedTeacher(model.eval(), history, time.perf_counter() - start, False)

    def write(teacher: CachedTeacher, tmp: str) -> None:
        torch.save({"state_dict": teacher.model.state_dict(), "history": teacher.history,
                    "train_seconds": teacher.train_seconds, "config": job.config()}, tmp)

    teacher, _ = load_or_create(teacher_path(cache_dir, job), load, train, write,
                                f"teacher {job.teacher.label()} (seed {job.seed})", "retraining it")
    return teacher
