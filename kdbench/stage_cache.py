"""Trained stages shared between recipes: a prefix of training stages runs once per seed.

Recipes of one experiment often begin alike: ``kd``, ``kd+int8``, ``kd+prune`` and the
control ``kd + 3 epochs`` all start with the same ``distill`` stage on the same student, seed
and teacher, so after it they hold the same weights to the bit. The runner saves the student
after every leading training stage (``train``, ``distill``, ``finetune``) and a cell whose
recipe starts with a saved prefix loads it instead of training it again.

What is saved is what makes the rest of the cell run exactly as it would have: the weights,
the stage log (histories, seconds, teacher-output reads: the row reports the training its
model received, ``from_cache`` marking the stages it did not rerun), the adapters' parameter
count, which parameters training changed (is the head trained?), and the random generators'
states after the prefix. The key hashes everything the
prefix's result depends on: task, student, teacher (its cache key), the prefix's resolved
stages, seed, the teacher-output cache setting, device, precision and the plugin versions. A
file is written atomically with its sha256 and checked on load (see ``teachers``); a bad one is
ignored and recomputed.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TRAINING_OPS, Cell, digest
from .plugins import Plugins
from .teachers import CacheInvalid, read_verified, write_verified

FOLDER = "stage-results"


def training_prefixes(cell: Cell) -> list[int]:
    """Lengths k for which the first k stages of the recipe are all training stages."""
    lengths = []
    for k, stage in enumerate(cell.stages, start=1):
        if stage.op not in TRAINING_OPS:
            break
        lengths.append(k)
    return lengths


def prefix_key(cell: Cell, plugins: Plugins, length: int, device: str, precision: str) -> str:
    config = cell.config(plugins)
    refs = [s.ref for s in cell.stages[:length] if s.ref is not None]
    return digest({"task": config["task"], "student": config["student"], "teacher_key": config["teacher_key"],
                   "stages": config["stages"][:length], "seed": cell.seed,
                   "teacher_cache": config.get("teacher_cache"), "device": device, "precision": precision,
                   "plugins": {r.plugin: r.version for r in [cell.task, cell.pair.student, *refs]},
                   "kdbench": config["kdbench"]})


@dataclass
class Prefix:
    """A student after the leading training stages of a recipe."""

    state: dict[str, torch.Tensor]
    entries: list[dict[str, Any]]
    extra_params: int
    rng: dict[str, Any]
    updates: dict[str, Any]  # ``training.UpdateTracker.state()``: which parameters training changed


def generators() -> dict[str, Any]:
    """The global random generators' states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2]}


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def path_of(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / FOLDER / f"{key}.pt"


def load(cache_dir: Path, key: str) -> Prefix | None:
    """The saved prefix, or None (never saved, or a file that fails its check: recomputed)."""
    path = path_of(cache_dir, key)
    try:
        saved = read_verified(path, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        return None
    except CacheInvalid as err:
        warnings.warn(f"cached stage result {path} is unusable: {err}; training the stages again",
                      stacklevel=2)
        return None
    try:
        return Prefix(saved["state"], saved["entries"], saved["extra_params"], saved["rng"], saved["updates"])
    except (KeyError, TypeError):  # written by an earlier kdbench in another layout: train again
        return None


def save(cache_dir: Path, key: str, model: nn.Module, entries: list[dict], extra_params: int,
         updates: dict[str, Any]) -> None:
    payload = {"state": model.state_dict(), "entries": entries, "extra_params": extra_params,
               "rng": generators(), "updates": updates}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_verified(path_of(cache_dir, key), lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
