"""Teachers are trained once per (task, teacher, training, seed) and cached on disk.

The cache key hashes everything that determines the weights (see ``TeacherJob.config``), so
every recipe, every later run and every experiment that needs the same teacher reuses it.
The cache lives in the user's cache directory (``KDBENCH_CACHE_DIR`` or ``--cache-dir``),
never in the repository.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TeacherJob
from .contracts import ModelFamily, Task, TaskData
from .training import fit

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


def obtain_teacher(job: TeacherJob, task: Task, family: ModelFamily, data: TaskData,
                   cache_dir: Path, device: str = "cpu") -> CachedTeacher:
    """Load the teacher from the cache, or train it and cache it (atomically)."""
    if family.pretrained:
        # A released checkpoint: the family loads (and caches) its weights; nothing to train.
        start = time.perf_counter()
        model = family.build(data)
        for p in model.parameters():
            p.requires_grad_(False)
        return CachedTeacher(model.eval(), [], time.perf_counter() - start, True)
    path = teacher_path(cache_dir, job)
    model = family.build(data)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return CachedTeacher(model.eval(), saved["history"], saved["train_seconds"], True)
    torch.manual_seed(job.seed)
    model = family.build(data)  # rebuilt after seeding, so the init depends on the seed alone
    start = time.perf_counter()
    history = fit(model, data, task, job.training, job.seed, device=device)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename: a killed run never leaves a half-written teacher.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"state_dict": model.state_dict(), "history": history, "train_seconds": seconds,
                "config": job.config()}, tmp)
    os.replace(tmp, path)
    return CachedTeacher(model.eval(), history, seconds, False)
